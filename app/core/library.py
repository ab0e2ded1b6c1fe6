"""The adapter library: one folder per adapter, each a plain PEFT folder plus Tailor's manifest.

Layout under the library root:
    adapters/<name>/   adapter_config.json, adapter_model.safetensors, tailor.json (manifest), training_log.json
    runs/<name>/       an unfinished training run: its config and last checkpoint (what --resume continues)
    trash/             deleted adapters, until the trash is emptied
    .staging/          half-written folders; they only become visible by an atomic rename into adapters/

Nothing here loads torch: listing a library of hundreds of adapters must stay instant.
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

from app.core.config import validate_adapter_name
from app.core.errors import AdapterError

LIBRARY_VERSION = 1
MANIFEST_NAME = "tailor.json"
TRAINING_LOG_NAME = "training_log.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    def base_fingerprint(self) -> str | None:
        return ((self.manifest or {}).get("base_model") or {}).get("fingerprint")

    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.path / ADAPTER_CONFIG).read_text())

    def training_log(self) -> list[dict[str, Any]]:
        log = self.path / TRAINING_LOG_NAME
        return json.loads(log.read_text()) if log.is_file() else []


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary file in the same folder and rename it over the target: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(value, stream, indent=2, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def inspect_adapter_folder(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read the manifest and say what, if anything, makes the folder unusable. Never raises."""
    if not (path / ADAPTER_CONFIG).is_file():
        return None, f"{ADAPTER_CONFIG} is missing (half-written or not an adapter)"
    try:
        json.loads((path / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return None, f"{ADAPTER_CONFIG} is damaged: {exc}"
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            return None, "weights are a pickle (adapter_model.bin), which can run code; import it to convert"
        return None, f"{ADAPTER_WEIGHTS} is missing"
    problem = _safetensors_problem(weights)
    manifest = None
    if (path / MANIFEST_NAME).is_file():
        try:
            manifest = json.loads((path / MANIFEST_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            problem = problem or f"{MANIFEST_NAME} is damaged: {exc}"
    return manifest, problem


def _safetensors_problem(weights: Path) -> str | None:
    """Check the header and that the file is as long as the header says, without loading any tensor."""
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if header_length <= 0 or 8 + header_length > size:
                return f"{ADAPTER_WEIGHTS} is truncated or not a safetensors file"
            header = json.loads(handle.read(header_length))
        data_end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
        if 8 + header_length + data_end > size:
            return f"{ADAPTER_WEIGHTS} is truncated ({size} bytes, needs {8 + header_length + data_end})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{ADAPTER_WEIGHTS} is damaged: {exc}"
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
        return [self._entry(path) for path in sorted(self.adapters_dir.iterdir(), key=lambda p: p.name.lower())
                if path.is_dir() and not path.name.startswith(".")]

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
        return self._entry(path)

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
    def staging(self) -> Iterator[Path]:
        """A scratch folder on the library's own filesystem, so publishing it is one atomic rename."""
        self.ensure()
        folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=self._staging_dir))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, name: str) -> AdapterEntry:
        """Move a complete staged folder into the library under `name`; fails rather than overwrite."""
        name = validate_adapter_name(name)
        target = self.adapters_dir / name
        if target.exists():
            raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another name or delete the old one first.")
        os.replace(staged, target)
        return self._entry(target)

    def rename(self, old: str, new: str) -> AdapterEntry:
        entry = self.get(old)
        new = validate_adapter_name(new)
        target = self.adapters_dir / new
        if target.exists():
            raise AdapterError(f"An adapter named '{new}' already exists.", "Pick another name.")
        os.replace(entry.path, target)
        if entry.manifest is not None:
            write_json_atomic(target / MANIFEST_NAME, {**entry.manifest, "name": new})
        return self._entry(target)

    def delete(self, name: str) -> Path:
        """Move the adapter into the trash (kept until emptied) and return where it went."""
        entry = self.get(name)
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        target = self.trash_dir / f"{entry.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        counter = 2
        while target.exists():
            target = target.with_name(f"{target.name}-{counter}")
            counter += 1
        os.replace(entry.path, target)
        return target

    def trash_entries(self) -> list[Path]:
        return sorted(self.trash_dir.iterdir()) if self.trash_dir.is_dir() else []

    def empty_trash(self) -> int:
        removed = 0
        for path in self.trash_entries():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed += 1
        return removed

    # Runs in progress

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / validate_adapter_name(name)

    def interrupted_runs(self) -> list[str]:
        """Names of runs that started but never published an adapter (crash, kill, pause or Ctrl-C)."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(path.name for path in self.runs_dir.iterdir() if (path / "run_config.json").is_file())
