"""The adapter library: one folder per adapter, each a plain PEFT folder plus Tailor's manifest.

Layout under the library root:
    adapters/<name>/   adapter_config.json, adapter_model.safetensors, tailor.json (manifest), training_log.json
    runs/<name>/       an unfinished training run: its config and last checkpoint (what --resume continues)
    trash/             deleted adapters, until the trash is emptied
    .staging/          half-written folders; they only become visible by an atomic rename into adapters/
    .lock              the cross-process write lock (see Library.lock)

Several writers (the app, CLIs, the server, a training publishing) may share one library. Every mutation takes the
library's file lock and ends in one atomic rename, so a reader, who never takes the lock, sees each adapter either
whole or not at all, and two writers never pick the same name or empty a trash the other is filling.

Nothing here loads torch: listing a library of hundreds of adapters, or checking which of them fit a base model
(from the safetensors headers alone), must stay instant.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from app.core.config import validate_adapter_name
from app.core.diskspace import disk_space_errors, require_free_space
from app.core.errors import AdapterError
from app.core.models import config_fingerprint

LIBRARY_VERSION = 1
LOCK_NAME = ".lock"
LOCK_TIMEOUT_S = 120.0
"""How long a writer waits for another to finish (a publish or an import takes seconds, not minutes)."""
STALE_STAGING_S = 24 * 3600
"""Staging folders older than this were left by a killed process and are removed by the next writer."""
MANIFEST_NAME = "tailor.json"
TRAINING_LOG_NAME = "training_log.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
# The files that make up an adapter; anything else in a foreign folder (pickles, scripts, checkpoints) stays behind.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, TRAINING_LOG_NAME, "README.md")
# peft saves a causal LM's tensors under this prefix, followed by the module path as the base model names it.
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter folder as found on disk; `problem` says why it cannot be used, if it cannot."""

    name: str
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None
    size_bytes: int

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def system_prompt(self) -> str | None:
        return (self.manifest or {}).get("system_prompt")

    @property
    def sampling(self) -> dict[str, Any] | None:
        """The decoding the persona recommends for chat ({"temperature": 0.7, "top_k": 40, ...}), if it says;
        app.core.chat.GenerationSettings.with_sampling reads it."""
        sampling = (self.manifest or {}).get("sampling")
        return sampling if isinstance(sampling, dict) else None

    @property
    def base_fingerprint(self) -> str | None:
        return ((self.manifest or {}).get("base_model") or {}).get("fingerprint")

    @property
    def kind(self) -> str:
        """'trained' here, 'mix' of other adapters, or 'imported' from another tool."""
        return (self.manifest or {}).get("kind") or ("imported" if self.ok else "unknown")

    @property
    def base_model_id(self) -> str | None:
        return ((self.manifest or {}).get("base_model") or {}).get("id")

    @property
    def trained_with(self) -> tuple[str | None, str | None]:
        """(base as the user named it, quantisation) the adapter was made with, where the manifest says."""
        manifest = self.manifest or {}
        model = (manifest.get("config") or {}).get("model") or {}
        return (model.get("base") or (manifest.get("base_model") or {}).get("source"),
                model.get("quant") or manifest.get("quant"))

    @property
    def created(self) -> str | None:
        """When the adapter was made, as 'YYYY-MM-DD HH:MM' local time of the machine that made it."""
        created = (self.manifest or {}).get("created")
        return created[:16].replace("T", " ") if isinstance(created, str) else None

    @property
    def final_loss(self) -> float | None:
        loss = (self.manifest or {}).get("final_loss")
        return float(loss) if isinstance(loss, (int, float)) else None

    @property
    def dataset_rows(self) -> int | None:
        return ((self.manifest or {}).get("dataset") or {}).get("rows")

    @property
    def rank(self) -> int | None:
        try:
            return int(self.adapter_config()["r"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.path / ADAPTER_CONFIG).read_text())

    def training_log(self) -> list[dict[str, Any]]:
        log = self.path / TRAINING_LOG_NAME
        return json.loads(log.read_text()) if log.is_file() else []


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename it over the target: readers see old or new, never half."""
    with disk_space_errors(path.parent, f"write {path.name}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def human_size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.0f} kB"


def folder_size(path: Path) -> int:
    """Bytes in the folder's files; a file removed meanwhile (another writer) counts as 0 instead of failing."""
    total = 0
    for folder, _, files in os.walk(path):  # os.walk skips a folder that vanishes; Path.rglob would raise
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(value, None), or (None, why the file cannot be read as JSON). Never raises."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (ValueError, OSError, RecursionError) as exc:  # ValueError covers bad JSON and bad UTF-8
        return None, f"{path.name} is damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def lora_config_problem(config: Any) -> str | None:
    """What makes an adapter_config.json unusable as a LoRA config (peft would fail or misread it), or None."""
    if not isinstance(config, dict):
        return f"{ADAPTER_CONFIG} is not a JSON object"
    if "peft_type" not in config:  # peft cannot tell which kind of adapter to build without it
        return f"{ADAPTER_CONFIG} does not say what kind of adapter it is (no peft_type)"
    if config["peft_type"] != "LORA":
        return f"it is a {config['peft_type']!s:.40} adapter; Tailor works with LoRA adapters only"
    rank = config.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= 65536:
        return f"{ADAPTER_CONFIG} gives the rank r as {rank!r:.40}; it must be a positive whole number"
    for key, kinds in _LORA_CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
            return f"{ADAPTER_CONFIG} has '{key}' = {value!r:.40}, which is not {_LORA_CONFIG_KINDS[key]}"
    targets = config.get("target_modules")
    if isinstance(targets, list) and not all(isinstance(target, str) for target in targets):
        return f"{ADAPTER_CONFIG} lists target_modules that are not layer names"
    dropout = config.get("lora_dropout") or 0
    if not 0 <= dropout < 1:
        return f"{ADAPTER_CONFIG} has lora_dropout {dropout}; it must be at least 0 and below 1"
    return None


# The adapter_config.json fields peft reads for a LoRA adapter, by the JSON types they may hold (None is always fine).
_LORA_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "lora_alpha": (int, float), "lora_dropout": (int, float), "target_modules": (list, str),
    "modules_to_save": (list,), "rank_pattern": (dict,), "alpha_pattern": (dict,), "use_dora": (bool,),
    "use_rslora": (bool,), "fan_in_fan_out": (bool,), "bias": (str,), "task_type": (str,),
    "base_model_name_or_path": (str,), "layers_to_transform": (list, int),
}
_JSON_KIND_NAMES = {int: "a number", float: "a number", list: "a list", str: "text", dict: "a table", bool: "true/false"}
_LORA_CONFIG_KINDS = {key: " or ".join(dict.fromkeys(_JSON_KIND_NAMES[kind] for kind in kinds))
                      for key, kinds in _LORA_CONFIG_TYPES.items()}
# What the manifest's fields must hold for the library, chat and export to read them (None is always fine).
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "system_prompt": (str,), "created": (str,), "final_loss": (int, float),
    "steps": (int,), "planned_steps": (int,), "quant": (str,), "base_model": (dict,), "dataset": (dict,),
    "config": (dict,), "sampling": (dict,),
}
_MANIFEST_PART_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "base_model": {"id": (str,), "source": (str,), "fingerprint": (str,), "architecture": (str,)},
    "dataset": {"path": (str,), "fingerprint": (str,), "format": (str,), "rows": (int,), "usable_rows": (int,)},
    "config": {"model": (dict,), "lora": (dict,), "training": (dict,), "data": (dict,)},
}


def manifest_problem(manifest: Any) -> str | None:
    """What in a tailor.json would make the library, chat or export misread it, or None."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST_NAME} is not a JSON object"
    for key, kinds in _MANIFEST_TYPES.items():
        if not _holds(manifest.get(key), kinds):
            return f"{MANIFEST_NAME} has '{key}' = {manifest[key]!r:.40}, which is not what Tailor writes there"
        parts = _MANIFEST_PART_TYPES.get(key, {})
        for part, part_kinds in parts.items():
            if not _holds((manifest.get(key) or {}).get(part), part_kinds):
                return f"{MANIFEST_NAME} has '{key}.{part}' = {manifest[key][part]!r:.40}, which is not what Tailor writes there"
    return None


def _holds(value: Any, kinds: tuple[type, ...]) -> bool:
    """JSON's true/false are not numbers here, though Python's bool is an int."""
    return value is None or isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def inspect_adapter_folder(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read the manifest and say what, if anything, makes the folder unusable. Never raises.

    A manifest that is not what Tailor writes is reported as the problem and returned as None, so nothing reads it.
    """
    if not (path / ADAPTER_CONFIG).is_file():
        return None, f"{ADAPTER_CONFIG} is missing (half-written or not an adapter)"
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS).is_file():
            return None, f"weights are a pickle ({PICKLE_WEIGHTS}), which can run code when loaded"
        return None, f"{ADAPTER_WEIGHTS} is missing"
    config, problem = _read_json(path / ADAPTER_CONFIG)
    problem = problem or lora_config_problem(config)
    if problem:
        return None, problem
    problem = _safetensors_problem(weights)
    manifest = None
    if (path / MANIFEST_NAME).is_file():
        manifest, manifest_damage = _read_json(path / MANIFEST_NAME)
        manifest_damage = manifest_damage or manifest_problem(manifest)
        if manifest_damage:
            manifest, problem = None, problem or manifest_damage
    return manifest, problem


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (name -> dtype, shape, offsets), checking the file is as long as the
    header says, without loading any tensor. Raises ValueError naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if header_length <= 0 or 8 + header_length > size:
            raise ValueError(f"{path.name} is truncated or not a safetensors file")
        try:
            header = json.loads(handle.read(header_length))
            header.pop("__metadata__", None)
            data_end = max((meta["data_offsets"][1] for meta in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            raise ValueError(f"{path.name} is damaged: {exc}") from exc
    if not isinstance(data_end, int) or 8 + header_length + data_end > size:
        raise ValueError(f"{path.name} is truncated ({size} bytes, needs {8 + header_length + data_end})")
    _check_with_safetensors(path)
    return header


def _check_with_safetensors(path: Path) -> None:
    """Let the safetensors library itself validate the header (known dtypes, shapes that match their byte ranges,
    ranges that tile the file exactly): a header that lies would otherwise pass here and fail at load time."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _safetensors_problem(weights: Path) -> str | None:
    try:
        safetensors_header(weights)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class BaseProfile:
    """What decides whether an adapter fits a base model, read from the model's folder without loading it."""

    model_id: str
    fingerprint: str
    """Architecture and shapes hash (models.config_fingerprint); adapters record the one they were trained on."""
    weight_shapes: dict[str, tuple[int, ...]]
    """Every floating-point weight's shape by name, e.g. 'model.layers.0.self_attn.q_proj.weight' -> (576, 576)."""

    @classmethod
    def from_folder(cls, folder: Path, model_id: str) -> BaseProfile:
        folder = Path(folder)
        shapes: dict[str, tuple[int, ...]] = {}
        for weights in sorted(folder.glob("*.safetensors")):
            for name, meta in safetensors_header(weights).items():
                # Pre-quantised checkpoints store packed integers whose shapes are not the layer's shape.
                if meta["dtype"] in ("F32", "F16", "BF16"):
                    shapes[name] = tuple(meta["shape"])
        config = json.loads((folder / "config.json").read_text())
        return cls(model_id=model_id, fingerprint=config_fingerprint(config), weight_shapes=shapes)


def adapter_fit(entry: AdapterEntry, base: BaseProfile) -> str | None:
    """Why the adapter cannot run on this base (damaged, trained for another model, shapes that differ), or None.

    The shapes come from the safetensors headers, so an adapter from another tool, without a manifest, is judged
    as surely as one of ours, and a load never fails half-way on a size mismatch.
    """
    if entry.problem:
        return f"damaged: {entry.problem}"
    if entry.base_fingerprint and entry.base_fingerprint != base.fingerprint:
        return f"trained for {entry.base_model_id or 'another base model'}, a different architecture or size than {base.model_id}"
    try:
        tensors = safetensors_header(entry.path / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as exc:
        return f"damaged: {exc}"
    missing, mismatched = [], []
    for key, meta in tensors.items():
        module, _, part = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
        if not part or part.startswith("magnitude"):
            continue
        base_shape = base.weight_shapes.get(f"{module}.weight")
        if base_shape is None:
            missing.append(module)
            continue
        # lora_A is (rank, inputs) and lora_B (outputs, rank); an embedding's A/B are the transposes.
        shape = tuple(meta["shape"])
        if part.startswith("A"):
            fits = len(base_shape) == 2 and shape[-1] == base_shape[1]
        elif part.startswith("B"):
            fits = len(base_shape) == 2 and shape[0] == base_shape[0]
        elif part.startswith("embedding_A"):
            fits = shape[-1] == base_shape[0]
        else:
            fits = shape[0] == base_shape[-1]
        if not fits:
            mismatched.append(f"{module} ({part.split('.')[0]} {list(shape)} vs layer {list(base_shape)})")
    if missing:
        return f"targets {len(set(missing))} layer(s) {base.model_id} does not have, e.g. {sorted(set(missing))[0]}"
    if mismatched:
        return f"tensor shapes differ from {base.model_id} in {len(mismatched)} place(s), e.g. {mismatched[0]}"
    return None


class Library:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.adapters_dir = self.root / "adapters"
        self.runs_dir = self.root / "runs"
        self.trash_dir = self.root / "trash"
        self._staging_dir = self.root / ".staging"

    def ensure(self) -> Library:
        for folder in (self.adapters_dir, self.runs_dir, self.trash_dir, self._staging_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    # Reading

    def entries(self) -> list[AdapterEntry]:
        if not self.adapters_dir.is_dir():
            return []
        found = (self._entry(path) for path in sorted(self.adapters_dir.iterdir(), key=lambda p: p.name.lower())
                 if path.is_dir() and not path.name.startswith("."))
        # An adapter renamed or deleted by another writer while it was being read is not listed half-seen.
        return [entry for entry in found if entry.path.is_dir()]

    def _entry(self, path: Path) -> AdapterEntry:
        manifest, problem = inspect_adapter_folder(path)
        return AdapterEntry(name=path.name, path=path, manifest=manifest, problem=problem, size_bytes=folder_size(path))

    def exists(self, name: str) -> bool:
        return (self.adapters_dir / name).is_dir()

    def get(self, name: str) -> AdapterEntry:
        path = self.adapters_dir / validate_adapter_name(name)
        if not path.is_dir():
            known = ", ".join(entry.name for entry in self.entries()) or "none yet"
            raise AdapterError(f"No adapter named '{name}' in the library {self.root}.", f"Adapters: {known}.")
        entry = self._entry(path)
        if not path.is_dir():  # renamed or deleted by another writer while it was being read
            raise AdapterError(f"The adapter '{name}' was just renamed or deleted (by another Tailor window or command).",
                               "List the library again and pick it by its current name.")
        return entry

    def get_usable(self, name: str) -> AdapterEntry:
        entry = self.get(name)
        if entry.problem:
            raise AdapterError(f"The adapter '{name}' is damaged: {entry.problem}.",
                               "Delete it (tailor adapters delete) and train or import it again.")
        return entry

    def unique_name(self, wanted: str) -> str:
        name, counter = validate_adapter_name(wanted), 2
        while self.exists(name) or (self.runs_dir / name).exists():
            name = f"{wanted}-{counter}"
            counter += 1
        return name

    # Writing

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the library's cross-process write lock (reentrant within a thread; other threads and processes wait).

        Readers do not take it: each mutation below is a single rename, which they see as before or after.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # One lock object per path in this process, so nested mutations (import -> publish) re-enter it.
        lock = FileLock(self.root / LOCK_NAME, timeout=LOCK_TIMEOUT_S, is_singleton=True)
        try:
            lock.acquire()
        except Timeout as exc:
            raise AdapterError(f"The library {self.root} is busy: another Tailor has been changing it for over "
                               f"{LOCK_TIMEOUT_S:.0f} s.", "Let the other import, training or export finish, then try again.") from exc
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder on the library's own filesystem, so publishing it is one atomic rename.

        It is removed whatever happens; a disk that fills while it is written raises DiskFullError naming the library.
        """
        self.ensure()
        self._sweep_stale_staging()
        folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._staging_dir))
        try:
            with disk_space_errors(self.root, "add an adapter to the library"):
                yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _sweep_stale_staging(self) -> None:
        """Remove what a killed process left in staging (a half-written adapter, a half-emptied trash item); a day
        old is far older than any publish or import still running."""
        cutoff = time.time() - STALE_STAGING_S
        for leftover in self._staging_dir.iterdir():
            try:
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass  # another writer removed it first

    def publish(self, staged: Path, name: str, rename_if_taken: bool = False) -> AdapterEntry:
        """Move a complete staged folder into the library under `name`; fails rather than overwrite.

        With `rename_if_taken` a taken name gets a number instead ('pirate-2'), chosen under the lock so two writers
        publishing the same name at once both succeed.
        """
        name = validate_adapter_name(name)
        with self.lock():
            if rename_if_taken and (self.adapters_dir / name).exists():
                name = self.unique_name(name)
                manifest = staged / MANIFEST_NAME
                if manifest.is_file():
                    write_json_atomic(manifest, {**json.loads(manifest.read_text()), "name": name})
            target = self.adapters_dir / name
            if target.exists():
                raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another name or delete the old one first.")
            self.adapters_dir.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        return self._entry(target)

    def rename(self, old: str, new: str) -> AdapterEntry:
        new = validate_adapter_name(new)
        with self.lock():
            entry = self.get(old)
            target = self.adapters_dir / new
            if target.exists():
                raise AdapterError(f"An adapter named '{new}' already exists.", "Pick another name.")
            os.replace(entry.path, target)
            if isinstance(entry.manifest, dict):
                write_json_atomic(target / MANIFEST_NAME, {**entry.manifest, "name": new})
        return self._entry(target)

    def update_manifest(self, name: str, changes: dict[str, Any]) -> AdapterEntry:
        """Merge `changes` into the adapter's manifest (one atomic write) and return the updated entry; a change to
        None removes that key."""
        with self.lock():
            entry = self.get_usable(name)
            merged = {**(entry.manifest or {}), **changes}
            write_json_atomic(entry.path / MANIFEST_NAME,
                              {key: value for key, value in merged.items() if key not in changes or value is not None})
        return self._entry(entry.path)

    def delete(self, name: str) -> Path:
        """Move the adapter into the trash (kept until emptied) and return where it went."""
        with self.lock():
            entry = self.get(name)
            self.trash_dir.mkdir(parents=True, exist_ok=True)
            stamp = f"{entry.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            target, counter = self.trash_dir / stamp, 2
            while target.exists():
                target, counter = self.trash_dir / f"{stamp}-{counter}", counter + 1
            os.replace(entry.path, target)
        return target

    def trash_entries(self) -> list[Path]:
        return sorted(self.trash_dir.iterdir()) if self.trash_dir.is_dir() else []

    def empty_trash(self) -> int:
        """Remove everything in the trash; returns how many items. Each leaves the trash in one rename, so the trash
        never shows a half-deleted adapter, and the slow deleting happens outside the lock."""
        with self.lock():
            doomed = []
            for path in self.trash_entries():
                self._staging_dir.mkdir(parents=True, exist_ok=True)
                target = Path(tempfile.mkdtemp(prefix="deleting-", dir=self._staging_dir)) / path.name
                os.replace(path, target)
                doomed.append(target.parent)
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)
        return len(doomed)

    # Runs in progress

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / validate_adapter_name(name)

    def interrupted_runs(self) -> list[str]:
        """Names of runs that started but never published an adapter (crash, kill, pause or Ctrl-C)."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(path.name for path in self.runs_dir.iterdir() if (path / "run_config.json").is_file())


def add_peft_folder(library: Library, folder: str | os.PathLike, name: str, origin: Path | None = None,
                    rename_if_taken: bool = False) -> AdapterEntry:
    """Copy a plain PEFT LoRA folder made by another tool into the library under `name`.

    Only the adapter's own files are copied, into staging first, so the library never shows a half-copied folder.
    Pickled weights (adapter_model.bin) are refused: loading them can run arbitrary code. `origin` is what the
    manifest names as the source when `folder` is only an unpacked copy (an imported zip or bundle).
    `rename_if_taken` numbers the name ('pirate-2') if another writer takes it before this one is published.
    """
    source = Path(folder).expanduser()
    name = validate_adapter_name(name)
    if not (source / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{source} is not a PEFT adapter folder ({ADAPTER_CONFIG} is missing).",
                           "Pick the folder that holds adapter_config.json and adapter_model.safetensors.")
    config, problem = _read_json(source / ADAPTER_CONFIG)
    problem = problem or lora_config_problem(config)
    if problem:
        raise AdapterError(f"Cannot add {source}: {problem}.")
    if not (source / ADAPTER_WEIGHTS).is_file():
        if (source / PICKLE_WEIGHTS).is_file():
            raise AdapterError(f"{source} has only pickled weights ({PICKLE_WEIGHTS}), which can run code when loaded.",
                               "Convert them to adapter_model.safetensors with the tool that made them, then add the folder again.")
        raise AdapterError(f"{source} has no {ADAPTER_WEIGHTS}.")
    problem = _safetensors_problem(source / ADAPTER_WEIGHTS)
    if problem:
        raise AdapterError(f"Cannot add {source}: {problem}.")
    if library.exists(name) and not rename_if_taken:
        raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another name or delete the old one first.")
    files = [source / file_name for file_name in ADAPTER_FILES if (source / file_name).is_file()]
    require_free_space(library.root, sum(file.stat().st_size for file in files), "add the adapter to the library")
    with library.staging() as staged:
        for file in files:
            shutil.copy2(file, staged / file.name)
        manifest, _ = inspect_adapter_folder(staged)
        if not isinstance(manifest, dict):
            manifest = _imported_manifest(config, origin or source)
        write_json_atomic(staged / MANIFEST_NAME, {**manifest, "name": name})
        return library.publish(staged, name, rename_if_taken=rename_if_taken)


def _imported_manifest(adapter_config: dict[str, Any], source: Path) -> dict[str, Any]:
    """What is known about a foreign adapter: which base it says it was made for (no fingerprint: shapes decide)."""
    return {
        "library_version": LIBRARY_VERSION,
        "kind": "imported",
        "imported_from": str(source),
        "base_model": {"id": adapter_config.get("base_model_name_or_path")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
