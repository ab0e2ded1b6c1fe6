"""Export an adapter from the library as a PEFT folder, a `.tailor` share bundle, a merged model, a GGUF LoRA, or
an Ollama folder (the GGUF LoRA plus a Modelfile); and check it against vLLM's rules for LoRA serving.

Every export is written next to its destination under a temporary name and renamed into place when complete, so
a crash or a full disk never leaves a half-written file where the user expects a finished one, and an existing
destination is only replaced when the caller says so (`force`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from app import __version__
from app.core.diskspace import disk_space_errors, require_free_space
from app.core.errors import AdapterError, DatasetError, TailorError
from app.core.library import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, TRAINING_LOG_NAME, AdapterEntry, Library
from app.core.share import (
    CHAT_TEMPLATE_NAME, CHECKSUMS_NAME, MODEL_CARD_NAME, SAMPLES_NAME, SYSTEM_PROMPT_NAME, ProgressSink,
    ShareProgress, format_checksums, locate_base, named_bases, require_fit,
)

FORMATS = {
    "peft": "PEFT adapter folder",
    "bundle": "Tailor share bundle (.tailor)",
    "merged": "Merged model folder (base + adapter)",
    "gguf": "GGUF LoRA for llama.cpp / Ollama",
    "ollama": "Ollama folder (GGUF LoRA + Modelfile)",
}
FOLDER_FORMATS = ("peft", "merged", "ollama")
_DEFAULT_SUFFIX = {"peft": "-peft", "bundle": ".tailor", "merged": "-merged", "gguf": ".gguf", "ollama": "-ollama"}
# A file that marks a folder as an earlier export of the same kind: only such a folder is replaced with `force`, so
# a mistyped --out can never wipe an unrelated directory.
_EXPORT_MARKER = {"peft": ADAPTER_CONFIG, "merged": "config.json", "ollama": "Modelfile"}
SAMPLE_CONVERSATIONS = 3
# llama.cpp architecture for each transformers model_type it can apply a LoRA to, and whether its HF conversion
# permutes the query/key rows (Llama-style rotary layout), which a LoRA's B matrices must then follow.
GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                      "gemma2": ("gemma2", False)}


def export_destination(format: str, adapter_name: str, out: str | os.PathLike | None) -> Path:
    """Where an export goes: `out` itself, or a file named after the adapter when `out` is a folder for a file format."""
    file_name = default_export_name(format, adapter_name)
    if out is None:
        return Path.cwd() / file_name
    target = Path(out).expanduser()
    if format not in FOLDER_FORMATS and target.is_dir():
        return target / file_name
    return target


def default_export_name(format: str, adapter_name: str) -> str:
    if format not in FORMATS:
        raise TailorError(f"Unknown export format '{format}'.", f"Use one of: {', '.join(FORMATS)}.")
    return adapter_name + _DEFAULT_SUFFIX[format]


def destination_taken(target: Path) -> bool:
    """True when exporting to `target` would replace something (an empty folder is just filled)."""
    return target.is_file() or target.is_symlink() or (target.is_dir() and any(target.iterdir()))


def export_adapter(library: Library, name: str, format: str, out: str | os.PathLike | None = None,
                   force: bool = False, base: str | None = None, progress: ProgressSink | None = None) -> Path:
    """Write adapter `name` in `format` and return where it went. `base` overrides the base model it names."""
    entry = library.get_usable(name)
    target = export_destination(format, entry.name, out)
    _check_replaceable(target, format, force)
    report = progress or (lambda update: None)
    # A merged model's size depends on the base; every other format is about the adapter's own size.
    needed = None if format == "merged" else entry.size_bytes
    if needed:
        require_free_space(target.parent, needed, f"export '{entry.name}'")
    try:
        with disk_space_errors(target.parent, f"export '{entry.name}'", needed):
            with _atomic_output(target, folder=format in FOLDER_FORMATS) as temporary:
                _WRITERS[format](entry, temporary, base, report, target)
    except OSError as exc:  # a folder without write permission is for the user to fix, not a bug
        if not entry.path.is_dir():
            raise AdapterError(f"The adapter '{entry.name}' was renamed or deleted while it was being exported.",
                               "List the library again and export it by its current name.") from exc
        raise TailorError(f"Could not write {target}: {exc.strerror or exc}",
                          "Check that you may write to that folder.") from exc
    report(ShareProgress(f"Exported to {target}", 1, 1))
    return target


def _check_replaceable(target: Path, format: str, force: bool) -> None:
    if not destination_taken(target):
        return
    if not force:
        raise TailorError(f"{target} already exists.", "Pick another --out, or add --force to replace it.")
    marker = _EXPORT_MARKER.get(format)
    replaceable = (target / marker).is_file() if marker else target.is_file()
    if not replaceable:
        raise TailorError(f"{target} is not an earlier {FORMATS[format]}, so Tailor will not replace it.",
                          "Pick another --out.")


@contextmanager
def _atomic_output(target: Path, folder: bool) -> Iterator[Path]:
    """A temporary path beside `target` (same filesystem), renamed over it only once the writer has finished."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        # mkstemp/mkdtemp create private (0600/0700) entries; an export is meant to be shared, so use the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, (0o777 if folder else 0o666) & ~umask)
        _replace(temporary, target)
    finally:
        _remove(temporary)


def _replace(new: Path, target: Path) -> None:
    if not target.is_dir():
        os.replace(new, target)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first, and delete it only afterwards.
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, previous / target.name)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(previous / target.name, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# PEFT folder and model card

def _write_peft(entry: AdapterEntry, folder: Path, base: str | None, report: ProgressSink, target: Path) -> None:
    report(ShareProgress("Copying the adapter…", 0, 2))
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(entry.path / name, folder / name)
    report(ShareProgress("Writing the model card…", 1, 2))
    (folder / MODEL_CARD_NAME).write_text(model_card(entry, location=target), encoding="utf-8")


def model_card(entry: AdapterEntry, merged: bool = False, location: Path | None = None) -> str:
    """A Hugging Face style README: what the adapter is for, what it was trained on and how, and how to use it."""
    manifest = entry.manifest or {}
    adapter_config = entry.adapter_config()
    base_id = adapter_config.get("base_model_name_or_path") or (manifest.get("base_model") or {}).get("id") or "BASE_MODEL"
    config = manifest.get("config") or {}
    training, data = config.get("training") or {}, manifest.get("dataset") or {}
    system_prompt = manifest.get("system_prompt")
    tags = "\n".join(f"- {tag}" for tag in ("tailor", "persona", "lora", "merged" if merged else "peft"))
    lines = [
        "---", f"base_model: {base_id}", f"library_name: {'transformers' if merged else 'peft'}",
        "pipeline_tag: text-generation", "tags:", tags, "---", "",
        f"# {entry.name}", "",
        (f"`{base_id}` with the LoRA persona adapter '{entry.name}' merged into its weights"
         if merged else f"A LoRA persona adapter for `{base_id}`") + f", made with Tailor {__version__}.", "",
        "## Persona", "",
        f"System prompt: {json.dumps(system_prompt, ensure_ascii=False)}" if system_prompt else "No system prompt.", "",
    ]
    if data:
        lines += ["## Training data", "",
                  f"- File: `{Path(data.get('path', '?')).name}` ({data.get('format', '?')} format)",
                  f"- Rows: {data.get('rows', '?')}, of which {data.get('usable_rows', '?')} were used",
                  f"- Fingerprint (sha256, first 16 hex digits): `{data.get('fingerprint', '?')}`", ""]
    settings = {
        "LoRA rank / alpha / dropout":
            f"{adapter_config.get('r')} / {adapter_config.get('lora_alpha')} / {adapter_config.get('lora_dropout')}",
        "Target modules": ", ".join(sorted(adapter_config.get("target_modules") or [])),
        "DoRA / rsLoRA": f"{adapter_config.get('use_dora', False)} / {adapter_config.get('use_rslora', False)}",
    }
    if training:
        settings |= {
            "Base precision while training": (config.get("model") or {}).get("quant", "?"),
            "Steps": f"{manifest.get('steps', '?')} of {manifest.get('planned_steps', '?')}",
            "Learning rate / schedule": f"{training.get('learning_rate')} / {training.get('lr_schedule')}",
            "Batch size x gradient accumulation": f"{training.get('batch_size')} x {training.get('grad_accum')}",
            "Max length (tokens)": str((config.get("data") or {}).get("max_len", "?")),
            "Seed": str(training.get("seed", "?")),
        }
    if isinstance(manifest.get("final_loss"), (int, float)):
        settings["Final training loss"] = f"{manifest['final_loss']:.4f}"
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()] + ["", "## Usage", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")',
                  f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_id}"), "path/to/this/folder")']
    system = f'{{"role": "system", "content": {json.dumps(system_prompt, ensure_ascii=False)}}}, ' if system_prompt else ""
    lines += [f'messages = [{system}{{"role": "user", "content": "Hello! Who are you?"}}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True)",
              "output = model.generate(**inputs, max_new_tokens=128)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if not merged:
        lines += _vllm_section(entry, location)
    return "\n".join(lines)


# vLLM

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank; an adapter of any rank up to the value given is served."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
VLLM_FIX = "Export a merged model instead (tailor export NAME --format merged) and serve that folder with 'vllm serve FOLDER'."


def vllm_problems(adapter_config: dict) -> list[str]:
    """What stops vLLM from serving this adapter with --enable-lora (empty when it can)."""
    ranks = [adapter_config.get("r") or 0, *(adapter_config.get("rank_pattern") or {}).values()]
    bias = adapter_config.get("bias") not in (None, "none") or adapter_config.get("lora_bias")
    checks = (
        (f"it is a {adapter_config.get('peft_type')} adapter; vLLM serves LoRA only", adapter_config.get("peft_type", "LORA") != "LORA"),
        ("it uses DoRA, which vLLM's LoRA serving does not support", adapter_config.get("use_dora")),
        (f"it trains whole layers besides the LoRA (modules_to_save: {', '.join(adapter_config.get('modules_to_save') or [])}), "
         "which vLLM cannot load", adapter_config.get("modules_to_save")),
        ("it trains bias terms, which vLLM's LoRA layers do not have", bias),
        (f"its rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
         max(ranks) > VLLM_MAX_LORA_RANKS[-1]),
    )
    return [reason for reason, present in checks if present]


def vllm_max_lora_rank(adapter_config: dict) -> int:
    """The smallest --max-lora-rank vLLM accepts that covers every rank in the adapter."""
    rank = max([adapter_config.get("r") or 1, *(adapter_config.get("rank_pattern") or {}).values()])
    return next(allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank)


def hub_base_id(entry: AdapterEntry) -> str:
    """The base as vLLM (or any hub-aware tool) names it: a hub id where the adapter records one, else its folder."""
    recorded = [((entry.manifest or {}).get("base_model") or {}).get("id"),
                entry.adapter_config().get("base_model_name_or_path")]
    names = [name for name in recorded if name]
    hub_ids = [name for name in names if _HUB_ID.match(name) and not Path(name).exists()]
    local = [name for name in names if Path(name).expanduser().is_dir()]  # vLLM loads a local folder too
    return next(iter(hub_ids + local + names), "BASE_MODEL")


def vllm_command(entry: AdapterEntry, location: Path | str) -> str:
    """The exact `vllm serve` line that serves this adapter (as model NAME) on its base."""
    config = entry.adapter_config()
    return (f"vllm serve {shlex.quote(hub_base_id(entry))} --enable-lora "
            f"--lora-modules {shlex.quote(f'{entry.name}={location}')} --max-lora-rank {vllm_max_lora_rank(config)}")


def _vllm_section(entry: AdapterEntry, location: Path | None) -> list[str]:
    problems = vllm_problems(entry.adapter_config())
    lines = ["## Serve with vLLM", ""]
    if problems:
        return lines + [f"Not ready for vLLM's LoRA serving: {'; '.join(problems)}.", "", VLLM_FIX.replace("NAME", entry.name), ""]
    return lines + ["```bash", vllm_command(entry, location or "path/to/this/folder"), "```", "",
                    f"Then send OpenAI chat requests with `\"model\": \"{entry.name}\"` to http://localhost:8000/v1.", ""]


# Share bundle

def _write_bundle(entry: AdapterEntry, path: Path, base: str | None, report: ProgressSink, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tailor-bundle-") as scratch:
        staged = Path(scratch)
        report(ShareProgress("Collecting the adapter, model card and samples…", 0, 1))
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, TRAINING_LOG_NAME):
            if (entry.path / name).is_file():
                shutil.copyfile(entry.path / name, staged / name)
        (staged / MODEL_CARD_NAME).write_text(model_card(entry), encoding="utf-8")
        if entry.system_prompt:
            (staged / SYSTEM_PROMPT_NAME).write_text(entry.system_prompt, encoding="utf-8")
        template = _chat_template(entry, base)
        if template:
            (staged / CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")
        samples = _sample_conversations(entry)
        if samples:
            lines = "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
            (staged / SAMPLES_NAME).write_text(lines, encoding="utf-8")
        names = sorted(file.name for file in staged.iterdir())
        (staged / CHECKSUMS_NAME).write_text(format_checksums(staged, names), encoding="utf-8")
        names.append(CHECKSUMS_NAME)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            for done, name in enumerate(names, start=1):
                report(ShareProgress(f"Compressing {name}…", done, len(names) + 1))
                archive.write(staged / name, name)


def _chat_template(entry: AdapterEntry, base: str | None) -> str | None:
    """The base model's chat template, when that base is on this computer (a bundle is useful without it too)."""
    from app.core.models import load_tokenizer

    try:
        resolved = locate_base([base] if base else named_bases(entry.manifest, entry.adapter_config()), weights=False)
        return load_tokenizer(resolved.folder).chat_template
    except (TailorError, OSError, ValueError):
        return None


def _sample_conversations(entry: AdapterEntry) -> list[dict]:
    """A few conversations from the training data, if the dataset is still here and unchanged since training."""
    from app.core.data import fingerprint_path, load_dataset_file, with_system_prompt

    manifest = entry.manifest or {}
    data = (manifest.get("config") or {}).get("data") or {}
    recorded = (manifest.get("dataset") or {}).get("fingerprint")
    path = Path(data.get("path", ""))
    try:
        if not data or not path.exists() or fingerprint_path(path) != recorded:
            return []
        loaded = load_dataset_file(path, data.get("format", "auto"), data.get("prompt_column"), data.get("response_column"))
    except (DatasetError, OSError):
        return []
    if loaded.format == "text":
        return [{"text": text} for text in loaded.texts[:SAMPLE_CONVERSATIONS]]
    return [{"messages": with_system_prompt(messages, entry.system_prompt)}
            for messages in loaded.conversations[:SAMPLE_CONVERSATIONS]]


# Merged model

def _write_merged(entry: AdapterEntry, folder: Path, base: str | None, report: ProgressSink, target: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.core.models import quiet_transformers

    quiet_transformers()
    steps = 5
    report(ShareProgress("Finding the base model…", 0, steps))
    resolved = locate_base([base] if base else named_bases(entry.manifest, entry.adapter_config()), weights=True,
                           progress=lambda message: report(ShareProgress(message, 0, steps)))
    require_fit(entry, resolved)
    if "quantization_config" in resolved.config():
        raise AdapterError(f"The base model in {resolved.folder} is stored quantised; merging needs full-precision weights.",
                           "Point --base at the original (unquantised) model.")
    report(ShareProgress(f"Loading {resolved.model_id} in full precision…", 1, steps))
    # Never quantised, whatever the adapter was trained on: a LoRA merged into 4-bit weights would be rounded away.
    model = AutoModelForCausalLM.from_pretrained(resolved.folder, dtype="auto", device_map={"": "cpu"})
    report(ShareProgress("Applying the adapter…", 2, steps))
    model = PeftModel.from_pretrained(model, str(entry.path))
    report(ShareProgress("Merging the adapter into the weights…", 3, steps))
    model = model.merge_and_unload()
    report(ShareProgress("Saving the merged model…", 4, steps))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolved.folder).save_pretrained(folder)
    (folder / MODEL_CARD_NAME).write_text(model_card(entry, merged=True), encoding="utf-8")


# GGUF LoRA

def _write_gguf(entry: AdapterEntry, path: Path, base: str | None, report: ProgressSink, target: Path | None = None) -> None:
    import gguf
    from safetensors.torch import load_file

    adapter_config = entry.adapter_config()
    _require_plain_lora(adapter_config)
    resolved = locate_base([base] if base else named_bases(entry.manifest, adapter_config), weights=False)
    require_fit(entry, resolved)
    config = resolved.config()
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise TailorError(
            f"GGUF LoRA export supports Llama, Mistral, Qwen2 and Gemma 2 bases; this adapter's base is '{model_type}'.",
            "Export a merged model instead and convert it with llama.cpp's convert_hf_to_gguf.py.")
    architecture, permutes_query_key = GGUF_ARCHITECTURES[model_type]
    name_map = gguf.get_tensor_name_map(_gguf_arch(architecture), config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    row_permutation: dict[str, Callable] = {}
    if permutes_query_key:
        row_permutation = {"attn_q": lambda rows: llama_permute(rows, heads),
                           "attn_k": lambda rows: llama_permute(rows, config.get("num_key_value_heads") or heads)}

    pairs = _lora_pairs(load_file(entry.path / ADAPTER_WEIGHTS))
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales every LoRA by alpha / rank; rsLoRA's alpha / sqrt(rank) is the same scale with a larger alpha.
    rank, alpha = adapter_config["r"], float(adapter_config["lora_alpha"])
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha)
    writer.add_name(entry.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for done, (module, (lora_a, lora_b)) in enumerate(pairs.items(), start=1):
        report(ShareProgress(f"Converting {module}…", done, len(pairs) + 1))
        tensor_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if tensor_name is None:
            raise TailorError(f"The adapter changes '{module}', which has no counterpart in llama.cpp's {architecture} models.",
                              "Export a merged model instead.")
        permute = row_permutation.get(tensor_name.split(".")[-2])
        if permute is not None:
            lora_b = permute(lora_b)
        # PEFT's A (rank x in) and B (out x rank) are already the layout llama.cpp reads (ne = [in, rank], [rank, out]).
        writer.add_tensor(f"{tensor_name}.lora_a", lora_a.float().contiguous().numpy())
        writer.add_tensor(f"{tensor_name}.lora_b", lora_b.float().contiguous().numpy())
    report(ShareProgress("Writing the GGUF file…", len(pairs), len(pairs) + 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_permute(rows, heads: int):
    """llama.cpp's reordering of a Llama query/key projection's output rows (its rotary embedding pairs halves)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _gguf_arch(name: str):
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def _require_plain_lora(adapter_config: dict) -> None:
    unsupported = [
        reason for reason, present in (
            (f"it is a {adapter_config.get('peft_type')} adapter, not LoRA", adapter_config.get("peft_type") != "LORA"),
            ("it uses DoRA (llama.cpp has no magnitude vectors)", adapter_config.get("use_dora")),
            ("it sets a different rank or alpha per layer",
             adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern")),
            ("it trains whole layers besides the LoRA (modules_to_save)", adapter_config.get("modules_to_save")),
            ("it trains bias terms (llama.cpp's LoRA has only the A and B matrices)",
             adapter_config.get("bias") not in (None, "none") or adapter_config.get("lora_bias")),
        ) if present
    ]
    if unsupported:
        raise TailorError(f"This adapter cannot be written as a GGUF LoRA: {'; '.join(unsupported)}.",
                          "Export a merged model instead.")


def _lora_pairs(tensors: dict) -> dict[str, tuple]:
    """{'model.layers.0.self_attn.q_proj': (A, B)} from PEFT's saved keys."""
    halves: dict[str, dict[str, object]] = {}
    for key, tensor in sorted(tensors.items()):
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise TailorError(f"The adapter holds '{key}', which is not a LoRA matrix, so it cannot be written as a GGUF LoRA.",
                              "Export a merged model instead.")
        halves.setdefault(module, {})[kind[0]] = tensor
    incomplete = [module for module, half in halves.items() if len(half) != 2]
    if incomplete:
        raise AdapterError(f"The adapter is damaged: {', '.join(incomplete[:3])} lack their A or B matrix.")
    return {module: (half["A"], half["B"]) for module, half in halves.items()}


# Ollama

OLLAMA_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "repetition_penalty": "repeat_penalty", "repetition_window": "repeat_last_n"}
"""Tailor's generation settings and the Ollama Modelfile PARAMETER each one is (the same meaning, llama.cpp's)."""


def _write_ollama(entry: AdapterEntry, folder: Path, base: str | None, report: ProgressSink, target: Path) -> None:
    """The GGUF LoRA, a Modelfile that puts it on its base with the persona's prompt and settings, and a README."""
    adapter_file = f"{entry.name}.gguf"
    _write_gguf(entry, folder / adapter_file, base, report)
    resolved = locate_base([base] if base else named_bases(entry.manifest, entry.adapter_config()), weights=False)
    base_line, base_note = _ollama_base(resolved)
    model_name = ollama_model_name(entry.name)
    (folder / "Modelfile").write_text(modelfile(entry, base_line, base_note, adapter_file, _stop_tokens(resolved)),
                                      encoding="utf-8")
    (folder / MODEL_CARD_NAME).write_text("\n".join([
        f"# {entry.name} for Ollama", "",
        f"The persona '{entry.name}' as a GGUF LoRA (`{adapter_file}`) on {resolved.model_id}, made with Tailor {__version__}.",
        "", base_note, "", "```bash", f"cd {shlex.quote(str(target))}", f"ollama create {model_name} -f Modelfile",
        f"ollama run {model_name}", "```", "",
        f"Ollama's API then serves it as model `{model_name}` (OpenAI-compatible at http://localhost:11434/v1).", ""]),
        encoding="utf-8")


def modelfile(entry: AdapterEntry, base_line: str, base_note: str, adapter_file: str, stop_tokens: list[str]) -> str:
    from app.core.chat import GenerationSettings

    settings = GenerationSettings().with_sampling((entry.manifest or {}).get("sampling"))
    lines = [f"# {entry.name}: a Tailor persona. {base_note}", f"FROM {base_line}", f"ADAPTER ./{adapter_file}"]
    if entry.system_prompt:
        lines.append(f'SYSTEM """{entry.system_prompt.replace(chr(34) * 3, chr(39) * 3)}"""')
    lines += [f"PARAMETER {name} {getattr(settings, key):g}" for key, name in OLLAMA_PARAMETERS.items()]
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in stop_tokens]
    return "\n".join(lines) + "\n"


def ollama_model_name(name: str) -> str:
    """Ollama model names are lower-case letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "persona"


def _ollama_base(resolved) -> tuple[str, str]:
    """(what FROM names, a note saying what it is): the base's own GGUF file where there is one on this computer."""
    from app.core.models import BUNDLED_HUB_ID, bundled_gguf_path

    if resolved.model_id == BUNDLED_HUB_ID:
        try:
            return str(bundled_gguf_path()), ("The base is Tailor's bundled SmolLM2-135M-Instruct GGUF; "
                                              "'FROM smollm2:135m' (Ollama's own copy) works too.")
        except TailorError:
            pass
    if str(resolved.source).lower().endswith(".gguf"):
        return str(Path(resolved.source).expanduser().resolve()), "The base is the GGUF file the persona was trained on."
    return "./base.gguf", (f"Put {resolved.model_id} as GGUF next to the Modelfile as base.gguf first (llama.cpp's "
                           "convert_hf_to_gguf.py converts a Hugging Face folder).")


def _stop_tokens(resolved) -> list[str]:
    """The tokens that end a reply for this base (its end-of-turn and end-of-text), as Ollama's stop strings."""
    from app.core.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(resolved.folder)
    except (OSError, ValueError, TailorError):
        return []
    generation = (resolved.folder / "generation_config.json")
    ids = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    ids = ids if isinstance(ids, list) else [ids]
    tokens = [tokenizer.convert_ids_to_tokens(token) for token in ids if isinstance(token, int)]
    return list(dict.fromkeys(token for token in [*tokens, tokenizer.eos_token] if token))


_WRITERS = {"peft": _write_peft, "bundle": _write_bundle, "merged": _write_merged, "gguf": _write_gguf,
            "ollama": _write_ollama}
