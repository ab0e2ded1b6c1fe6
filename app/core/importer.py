"""Import a shared adapter into the library: a `.tailor` bundle, a PEFT folder, or a zip of one.

Nothing that arrives from elsewhere is trusted. Zip entries that would land outside their folder (absolute paths,
'..', links) refuse the whole file; sizes and entry counts are capped; only the files an adapter needs are read, and
only safetensors weights, which hold numbers and nothing else (a pickle can run code as it loads, so one is only
converted after an explicit opt-in); bundle checksums are verified; and the adapter's tensors are checked against the
base model before anything is added. All of that happens in a scratch folder outside the library: only a fully
checked adapter is copied into the library's staging area and published with one rename, so a failed import leaves
the library exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from app.core.config import validate_adapter_name
from app.core.diskspace import disk_full_error, free_bytes, is_disk_full, require_free_space
from app.core.errors import AdapterError
from app.core.library import (
    ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, MANIFEST_NAME, PICKLE_WEIGHTS, AdapterEntry, Library,
    add_peft_folder, inspect_adapter_folder,
)
from app.core.share import (
    BUNDLE_EXTRAS, BUNDLE_SUFFIX, CHECKSUMS_NAME, ProgressSink, ShareProgress, locate_base, named_bases,
    parse_checksums, require_fit, sha256_file,
)

MAX_TOTAL_BYTES = 2 * 1024**3
"""Most bytes an import may unpack: far above any LoRA adapter, far below what would fill a disk."""
MAX_ENTRIES = 10_000
"""Most entries a zip may list; a PEFT folder has a handful, a zipped training output a few hundred."""
# The only files ever read from the source; a bundle's extras are read so that its checksums can be verified.
_READABLE = (*ADAPTER_FILES, *BUNDLE_EXTRAS, PICKLE_WEIGHTS, CHECKSUMS_NAME)
_STEPS = 4


def import_adapter(library: Library, source: str | os.PathLike, name: str | None = None, base: str | None = None,
                   allow_pickle: bool = False, progress: ProgressSink | None = None) -> AdapterEntry:
    """Check `source` completely, then add it to the library as `name` (default: its own name, made unique).

    `base` is the model to check the adapter against (default: the one the adapter names).
    """
    source = Path(source).expanduser()
    report = progress or (lambda update: None)
    if name is not None:
        name = validate_adapter_name(name)
        if library.exists(name):
            raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another --name.")
    try:
        added = _import_checked(library, source, name, base, allow_pickle, report)
    except OSError as exc:  # an unreadable source or a full disk is for the user to fix, not a bug
        if is_disk_full(exc):  # in the library, or in the scratch folder it was unpacked into: whichever is full
            place = min((library.root, Path(tempfile.gettempdir())), key=lambda folder: free_bytes(folder) or 0)
            raise disk_full_error(exc, place, f"import {source.name}") from exc
        raise AdapterError(f"Could not import {source}: {exc.strerror or exc}",
                           "Check the file is readable and that there is free space for the library.") from exc
    report(ShareProgress(f"Imported '{added.name}'", _STEPS, _STEPS))
    return added


def _import_checked(library: Library, source: Path, name: str | None, base: str | None, allow_pickle: bool,
                    report: ProgressSink) -> AdapterEntry:
    """Unpack and check everything in a scratch folder, and only then add the adapter to the library."""
    with tempfile.TemporaryDirectory(prefix="tailor-import-") as scratch:
        unpacked = Path(scratch)
        report(ShareProgress(f"Reading {source.name}…", 0, _STEPS))
        if source.is_dir():
            _copy_folder(source, unpacked)
        elif source.is_file():
            _unpack_zip(source, unpacked)
        else:
            raise AdapterError(f"{source} does not exist.", "Check the path.")
        report(ShareProgress("Verifying checksums…", 1, _STEPS))
        _verify_checksums(unpacked, required=source.suffix.lower() == BUNDLE_SUFFIX)
        _convert_pickle(unpacked, allow_pickle)
        entry = _checked_adapter(unpacked, source)

        report(ShareProgress("Checking it fits the base model…", 2, _STEPS))
        resolved = locate_base([base] if base else named_bases(entry.manifest, entry.adapter_config()), weights=False)
        require_fit(entry, resolved)

        report(ShareProgress("Adding it to the library…", 3, _STEPS))
        final_name = name or library.unique_name((entry.manifest or {}).get("name") or source.stem)
        # Without --name, a name another writer takes meanwhile gets a number rather than failing the import.
        return add_peft_folder(library, unpacked, final_name, origin=source, rename_if_taken=name is None)


# Reading the source

def _copy_folder(folder: Path, into: Path) -> None:
    total = 0
    for name in _READABLE:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            raise AdapterError(f"{path} is not a regular file (a link or a folder), so it was not read.",
                               "Copy the real files into the folder and import it again.")
        total += path.stat().st_size
        if total > MAX_TOTAL_BYTES:
            raise AdapterError(f"{folder} holds more than {MAX_TOTAL_BYTES // 1024**3} GB of adapter files; "
                               "that is no LoRA adapter.")
        shutil.copyfile(path, into / name)


def _unpack_zip(path: Path, into: Path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise AdapterError(f"{path.name} is not a zip file, so it is neither a Tailor bundle nor a zipped PEFT folder.",
                           "Import a .tailor file, a PEFT folder (the one with adapter_config.json), or a zip of one.") from exc
    with archive:
        entries = archive.infolist()
        if len(entries) > MAX_ENTRIES:
            raise AdapterError(f"{path.name} lists {len(entries)} entries; an adapter has a handful (limit {MAX_ENTRIES}).")
        for entry in entries:
            reason = _unsafe_entry_reason(entry)
            if reason:
                raise AdapterError(f"{path.name} contains an unsafe entry '{entry.filename}' ({reason}); nothing was imported.",
                                   "Zips built to write outside their folder are a known attack; do not trust this file.")
        wanted = _adapter_entries(path, entries)
        declared = sum(entry.file_size for entry in wanted)
        if declared > MAX_TOTAL_BYTES:
            raise AdapterError(f"{path.name} would unpack to {declared / 1e9:.1f} GB; no LoRA adapter is that large "
                               f"(limit {MAX_TOTAL_BYTES // 1024**3} GB).")
        require_free_space(into, declared, f"unpack {path.name}")
        try:
            for entry in wanted:
                _extract_capped(archive, entry, into / PurePosixPath(entry.filename).name)
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
            raise AdapterError(f"{path.name} is damaged or encrypted: {exc}", "Ask for the file again.") from exc


def _unsafe_entry_reason(entry: zipfile.ZipInfo) -> str | None:
    name = entry.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' path that climbs out of the folder"
    if stat.S_ISLNK(entry.external_attr >> 16):
        return "a symbolic link"
    return None


def _adapter_entries(path: Path, entries: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The readable files of the adapter folder inside the zip: its root, or the folder holding adapter_config.json."""
    files = [entry for entry in entries if not entry.is_dir()]
    configs = [PurePosixPath(entry.filename) for entry in files if PurePosixPath(entry.filename).name == ADAPTER_CONFIG]
    root = PurePosixPath(".")
    if configs:
        depth = min(len(config.parts) for config in configs)
        roots = sorted({str(config.parent) for config in configs if len(config.parts) == depth})
        if len(roots) > 1:
            raise AdapterError(f"{path.name} holds several adapters ({', '.join(roots)}).", "Zip and import one at a time.")
        root = PurePosixPath(roots[0])
    wanted = [entry for entry in files
              if PurePosixPath(entry.filename).parent == root and PurePosixPath(entry.filename).name in _READABLE]
    names = [PurePosixPath(entry.filename).name for entry in wanted]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        # Tools disagree on which copy of a repeated name wins, so what was checked might not be what is used.
        raise AdapterError(f"{path.name} lists {', '.join(twice)} more than once; nothing was imported.")
    return wanted


def _extract_capped(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, target: Path) -> None:
    """Copy one entry, stopping if it inflates beyond the size its header declares (a zip bomb lies about it)."""
    remaining = entry.file_size
    with archive.open(entry) as source, open(target, "wb") as sink:
        while chunk := source.read(1 << 20):
            remaining -= len(chunk)
            if remaining < 0:
                raise AdapterError(f"'{entry.filename}' unpacks to more than its declared {entry.file_size} bytes; "
                                   "nothing was imported.")
            sink.write(chunk)


# Checking what was read

def _verify_checksums(folder: Path, required: bool) -> None:
    listing = folder / CHECKSUMS_NAME
    if not listing.is_file():
        if required:
            raise AdapterError(f"This is not a complete Tailor bundle: it has no {CHECKSUMS_NAME}.",
                               "Export it again with Tailor (tailor export NAME --format bundle).")
        return
    expected = parse_checksums(listing.read_text(encoding="utf-8", errors="replace"))
    present = {path.name for path in folder.iterdir()} - {CHECKSUMS_NAME}
    problems = [f"{name} is listed but missing" for name in sorted(set(expected) - present)]
    problems += [f"{name} is not listed" for name in sorted(present - set(expected))]
    problems += [f"{name} does not match its checksum" for name in sorted(set(expected) & present)
                 if sha256_file(folder / name) != expected[name]]
    if problems:
        raise AdapterError("The bundle's checksums do not match, so it was damaged or altered after export:\n"
                           + "\n".join(f"  - {problem}" for problem in problems), "Ask for the file again.")


def _convert_pickle(folder: Path, allow_pickle: bool) -> None:
    pickled = folder / PICKLE_WEIGHTS
    if not pickled.exists() or (folder / ADAPTER_WEIGHTS).exists():
        return  # with safetensors present the pickle is never opened, nor copied into the library
    if not allow_pickle:
        raise AdapterError(
            f"The adapter's weights are a pickle ({PICKLE_WEIGHTS}). Opening a pickle can run any program hidden in "
            "it, so Tailor only imports safetensors weights.",
            "If you trust where it came from, import it with --allow-pickle: Tailor then reads plain tensors only "
            "(torch.load with weights_only=True) and stores them as safetensors.")
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read an untrusted file is the file's fault, whatever its type
        raise AdapterError(f"{PICKLE_WEIGHTS} holds more than plain tensors, or is damaged, so it was not loaded: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(f"{PICKLE_WEIGHTS} is not a table of named tensors, so it is no PEFT adapter.")
    save_file({key: tensor.detach().clone().contiguous() for key, tensor in state.items()}, folder / ADAPTER_WEIGHTS)
    pickled.unlink()


def _checked_adapter(folder: Path, source: Path) -> AdapterEntry:
    """The unpacked adapter, once it is a complete, readable LoRA adapter."""
    manifest, problem = inspect_adapter_folder(folder)
    if problem:
        raise AdapterError(f"This adapter cannot be imported: {problem}.",
                           "Import the folder that holds adapter_config.json and adapter_model.safetensors.")
    if manifest is not None and not isinstance(manifest, dict):
        raise AdapterError(f"Its {MANIFEST_NAME} is not a Tailor manifest.")
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    peft_type = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
    if peft_type != "LORA":
        raise AdapterError(f"This is a {peft_type or 'non-PEFT'} adapter; Tailor works with LoRA adapters only.")
    return AdapterEntry(name=source.stem, path=folder, manifest=manifest, problem=None, size_bytes=0)
