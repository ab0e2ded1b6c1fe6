"""What export and import agree on: the bundle's files, its checksums, progress updates, and which base an adapter
belongs on.

A `.tailor` bundle is a zip whose root is a complete PEFT folder plus Tailor's extras, so unzipping it gives a folder
that peft loads as is:
    adapter_config.json, adapter_model.safetensors    the PEFT adapter
    README.md                                          model card (base model, persona, data, settings, usage)
    tailor.json, training_log.json                     the library manifest and loss history
    chat_template.jinja, system_prompt.txt             how to talk to it
    samples.jsonl                                      a few conversations from the training data
    checksums.sha256                                   sha256 of every other file (`sha256sum -c` reads it)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from app.core.errors import AdapterError, ModelError
from app.core.library import AdapterEntry, BaseProfile, adapter_fit
from app.core.models import BUNDLED_HUB_ID, ResolvedBase, resolve_base
from app.core.paths import cache_home

BUNDLE_SUFFIX = ".tailor"
CHECKSUMS_NAME = "checksums.sha256"
MODEL_CARD_NAME = "README.md"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
SYSTEM_PROMPT_NAME = "system_prompt.txt"
SAMPLES_NAME = "samples.jsonl"
# What a bundle adds to the adapter's own files (library.ADAPTER_FILES) so it can be used without Tailor.
BUNDLE_EXTRAS = (CHAT_TEMPLATE_NAME, SYSTEM_PROMPT_NAME, SAMPLES_NAME)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ShareProgress:
    """One step of an export or import, for a progress bar: `done` of `total` steps, with what is happening now."""

    message: str
    done: int
    total: int


ProgressSink = Callable[[ShareProgress], None]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def format_checksums(folder: Path, names: Iterable[str]) -> str:
    """The `sha256sum` format, so a recipient can check an unzipped bundle without Tailor."""
    return "".join(f"{sha256_file(folder / name)}  {name}\n" for name in sorted(names))


def parse_checksums(text: str) -> dict[str, str]:
    checksums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name:
            raise AdapterError(f"{CHECKSUMS_NAME} line {number} is not '<sha256>  <file name>'.",
                               "The bundle is damaged or was not made by Tailor; ask for it again.")
        checksums[name.strip()] = digest.lower()
    return checksums


def named_bases(manifest: dict | None, adapter_config: dict) -> list[str]:
    """The base models an adapter names, most specific first: where it was trained from, then the ids it records."""
    recorded = (manifest or {}).get("base_model") or {}
    names = [recorded.get("source"), recorded.get("id"), adapter_config.get("base_model_name_or_path")]
    return list(dict.fromkeys(name for name in names if name))


def locate_base(references: list[str], weights: bool, progress: Callable[[str], None] | None = None) -> ResolvedBase:
    """The first of `references` available here.

    With `weights=False` only the config is needed (compatibility checks, GGUF export), so a hub model that is not in
    the cache costs one small download of its config.json instead of gigabytes of weights.
    """
    failures = []
    for reference in references:
        # The bundled default is this hub model, so an adapter that names it finds it offline.
        local_name = "default" if reference == BUNDLED_HUB_ID else reference
        try:
            if weights or _is_local(local_name):
                return resolve_base(local_name, progress)
            return _hub_config_only(local_name)
        except ModelError as exc:
            failures.append(f"{reference}: {exc.message}")
        except (ValueError, OSError) as exc:  # a name no filesystem accepts (a NUL byte, far too long)
            failures.append(f"{reference!r:.80}: not a usable model name or path ({exc})")
    tried = "\n".join(f"  - {failure}" for failure in failures) or "  (the adapter names no base model)"
    raise AdapterError(f"Cannot find the base model this adapter belongs on:\n{tried}",
                       "Name it with --base: a model folder, a .gguf file, 'default' or a hub id.")


def _is_local(reference: str) -> bool:
    from app.core.catalogue import DEFAULT_KEY

    return reference in ("default", DEFAULT_KEY) or Path(reference).expanduser().exists()


def _hub_config_only(reference: str) -> ResolvedBase:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from app.core.catalogue import find_entry

    entry = find_entry(reference)
    repo_id = entry.hub_id if entry else reference
    if repo_id.count("/") != 1:
        raise ModelError(f"'{reference}' is neither a model folder here nor a hub id.")
    try:
        # The cache download_from_hub fills, so a base downloaded for training is found again offline.
        config = hf_hub_download(repo_id, "config.json", cache_dir=cache_home() / "models" / "hub")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"its config is not in the cache and could not be downloaded ({type(exc).__name__})") from exc
    return ResolvedBase(source=reference, folder=Path(config).parent, model_id=repo_id)


def base_profile(base: ResolvedBase) -> BaseProfile:
    """The base's layer shapes: from its safetensors headers when the weights are here (instant, any architecture),
    else from the layout transformers builds for its config on the meta device (shapes only, no memory)."""
    if any(base.folder.glob("*.safetensors")):
        return BaseProfile.from_folder(base.folder, base.model_id)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base.folder))
    except (ValueError, KeyError, OSError) as exc:
        raise AdapterError(f"Tailor cannot work out the layer shapes of {base.model_id}: {exc}",
                           "Download the base model once (train or chat with it), or name a local copy with --base.") from exc
    return BaseProfile(model_id=base.model_id, fingerprint=base.fingerprint(),
                       weight_shapes={name: tuple(parameter.shape) for name, parameter in model.named_parameters()})


def require_fit(entry: AdapterEntry, base: ResolvedBase) -> None:
    """Refuse an adapter trained on another architecture (its manifest's fingerprint) or whose tensors do not fit."""
    reason = adapter_fit(entry, base_profile(base))
    if reason:
        raise AdapterError(f"This adapter does not fit {base.model_id}: {reason}.",
                           "Use the base model it was made for (--base), or pick an adapter made for this base.")
