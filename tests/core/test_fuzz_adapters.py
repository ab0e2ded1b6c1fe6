"""Fuzzed adapters offered for import: PEFT folders, zips and `.tailor` bundles whose configs, safetensors headers,
manifests and zip entries lie or are broken in every way Hypothesis can build.

The property: the import either succeeds with an adapter that really loads (peft parses its config, safetensors reads
every tensor, its shapes fit the base), or it fails with a named TailorError (exit 2) and the library is
byte-identical to before. Nothing is ever written outside the library: the source is untouched and the scratch
space is empty afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from adapter_factory import make_random_adapters
from hypothesis import event, given, note
from hypothesis import strategies as st
from library_state import tree_digest

from app.cli import main
from app.core.errors import TailorError
from app.core.export import export_adapter
from app.core.importer import import_adapter
from app.core.library import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, Library, add_peft_folder
from app.core.share import CHECKSUMS_NAME, format_checksums

REPO = Path(__file__).resolve().parents[2]
# Zips with a name listed twice are one of the hostile inputs; zipfile warns as it writes them.
pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
SAFETENSORS_FIELDS = ("dtype", "shape", "data_offsets")
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "Q4", "", "f32"]


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_base) -> dict[str, Path]:
    """A library with one adapter, that adapter's bundle, and its PEFT files as bytes."""
    folder = tmp_path_factory.mktemp("origin")
    library = Library(folder / "library")
    make_random_adapters(library, tiny_base, ["tiny"], system_prompt="You are a pirate.")
    bundle = export_adapter(library, "tiny", "bundle", folder / "tiny.tailor")
    return {"library": library.root, "bundle": bundle, "adapter": library.adapters_dir / "tiny", "base": tiny_base}


# Mutations of the adapter's three files, as values Hypothesis draws and `apply` performs.

def _header(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def _with_header(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


safetensors_lies = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 50), st.sampled_from(SAFETENSORS_FIELDS),
              st.one_of(st.sampled_from(DTYPES), json_values, st.lists(st.integers(-3, 2**40), max_size=3))),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("extra-tensor"), st.text(max_size=30), st.lists(st.integers(0, 2**33), max_size=3)),
)
config_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type",
                                               "use_dora", "rank_pattern", "modules_to_save", "base_model_name_or_path",
                                               "task_type", "layers_to_transform", "fan_in_fan_out"]), json_values),
    st.tuples(st.just("drop"), st.sampled_from(["r", "target_modules", "peft_type", "lora_alpha"])),
    st.tuples(st.just("replace"), json_values),
)
manifest_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["name", "kind", "system_prompt", "created", "final_loss", "base_model",
                                               "dataset", "config", "sampling", "steps", "quant"]), json_values),
    st.tuples(st.just("set-part"), st.sampled_from(["base_model", "dataset", "config"]),
              st.sampled_from(["id", "source", "fingerprint", "rows", "path", "model", "training"]), json_values),
    st.tuples(st.just("replace"), json_values),
)
byte_edits = st.tuples(st.sampled_from([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME]),
                       st.sampled_from(["truncate", "flip", "drop", "bom", "invalid-utf8"]), st.floats(0, 1))


def _edit_json(value, edit):
    kind = edit[0]
    if kind == "replace":
        return edit[1]
    value = dict(value)
    if kind == "drop":
        value.pop(edit[1], None)
    elif kind == "set":
        value[edit[1]] = edit[2]
    elif kind == "set-part":
        part = value.get(edit[1]) if isinstance(value.get(edit[1]), dict) else {}
        value[edit[1]] = {**part, edit[2]: edit[3]}
    return value


def _lie_in_safetensors(data: bytes, lie) -> bytes:
    try:
        return _lie(data, lie)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError):
        return data  # an earlier lie already made the header unreadable: this one has nothing left to edit


def _lie(data: bytes, lie) -> bytes:
    header, body = _header(data)
    names = sorted(key for key in header if key != "__metadata__")
    if lie[0] == "field":
        name = names[lie[1] % len(names)]
        header[name] = {**header[name], lie[2]: lie[3]}
    elif lie[0] == "length":
        return lie[1].to_bytes(8, "little") + data[8:]
    elif lie[0] == "metadata":
        header["__metadata__"] = lie[1]
    else:
        end = max(meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__")
        header[lie[1]] = {"dtype": "F32", "shape": lie[2], "data_offsets": [end, end + 4 * (lie[2][0] if lie[2] else 1)]}
    return _with_header(header, body)


def _edit_bytes(files: dict[str, bytes | None], edit) -> None:
    name, kind, where = edit
    data = files.get(name)
    if data is None:
        return
    position = int(where * len(data))
    if kind == "truncate":
        files[name] = data[:position]
    elif kind == "flip" and data:
        position = min(position, len(data) - 1)
        files[name] = data[:position] + bytes([data[position] ^ 0x41]) + data[position + 1:]
    elif kind == "drop":
        files[name] = None
    elif kind == "bom":
        files[name] = b"\xef\xbb\xbf" + data
    else:
        files[name] = data[:position] + b"\xff\xfe\xc3" + data[position:]


@st.composite
def adapter_files(draw):
    """Edits to apply to the valid adapter's files; each kind is often left out, so valid adapters come up too."""
    def some(edits):
        return draw(st.just([]) | st.just([]) | st.lists(edits, min_size=1, max_size=2))

    return {"config": some(config_edits), "weights": some(safetensors_lies), "manifest": some(manifest_edits),
            "bytes": some(byte_edits)}


def build_files(adapter: Path, edits) -> dict[str, bytes | None]:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    manifest = json.loads((adapter / MANIFEST_NAME).read_text())
    for edit in edits["config"]:
        config = _edit_json(config, edit) if isinstance(config, dict) or edit[0] == "replace" else config
    for edit in edits["manifest"]:
        manifest = _edit_json(manifest, edit) if isinstance(manifest, dict) or edit[0] == "replace" else manifest
    weights = (adapter / ADAPTER_WEIGHTS).read_bytes()
    for lie in edits["weights"]:
        weights = _lie_in_safetensors(weights, lie)
    files = {ADAPTER_CONFIG: json.dumps(config).encode(), ADAPTER_WEIGHTS: weights,
             MANIFEST_NAME: json.dumps(manifest).encode()}
    for edit in edits["bytes"]:
        _edit_bytes(files, edit)
    return files


# Containers: a folder, a zip, or a bundle (a zip with checksums), with hostile zip entries on top.

zip_tricks = st.lists(st.one_of(
    st.tuples(st.just("symlink"), st.sampled_from([ADAPTER_WEIGHTS, "link", "sub/" + ADAPTER_CONFIG])),
    st.tuples(st.just("absolute"), st.sampled_from(["/etc/passwd", "/tmp/evil", "C:/evil", "\\evil"])),
    st.tuples(st.just("climb"), st.sampled_from(["../evil", "a/../../evil", "..\\evil"])),
    st.tuples(st.just("duplicate"), st.sampled_from([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME])),
    st.tuples(st.just("declared-size"), st.integers(0, 4), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("nest"), st.sampled_from(["sub", "a/b", "two"])),
), max_size=2)


def _write_zip(path: Path, files: dict[str, bytes | None], tricks, bundle: bool) -> None:
    entries = [(name, data) for name, data in files.items() if data is not None]
    nests = [trick[1] for trick in tricks if trick[0] == "nest"]
    if nests:
        entries = [(f"{nests[0]}/{name}", data) for name, data in entries]
        if nests[0] == "two":  # two adapters side by side
            entries += [(f"other/{name}", data) for name, data in entries]
    if bundle:
        with tempfile.TemporaryDirectory() as scratch:
            for name, data in entries:
                (Path(scratch) / Path(name).name).write_bytes(data)
            entries.append((CHECKSUMS_NAME, format_checksums(Path(scratch), [Path(n).name for n, _ in entries]).encode()))
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
        for trick in tricks:
            if trick[0] == "symlink":
                info = zipfile.ZipInfo(trick[1])
                info.external_attr = (0o120777 << 16)
                archive.writestr(info, "/etc/passwd")
            elif trick[0] in ("absolute", "climb"):
                archive.writestr(zipfile.ZipInfo(trick[1]), b"{}")
            elif trick[0] == "duplicate" and files.get(trick[1]) is not None:
                archive.writestr(trick[1], files[trick[1]])
    for trick in tricks:
        if trick[0] == "declared-size":
            _lie_about_size(path, trick[1], trick[2])


def _lie_about_size(path: Path, index: int, size: int) -> None:
    """Overwrite one central-directory entry's uncompressed size, as a zip bomb does."""
    data = bytearray(path.read_bytes())
    positions = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
    if positions:
        position = positions[index % len(positions)]
        data[position + 24:position + 28] = size.to_bytes(4, "little")
        path.write_bytes(bytes(data))


@st.composite
def sources(draw):
    return (draw(st.sampled_from(["folder", "zip", "bundle"])), draw(adapter_files()), draw(st.just([]) | zip_tricks),
            draw(st.sampled_from([None, "fuzzed", "tiny"])), draw(st.booleans()))


def make_source(folder: Path, origin, case) -> Path:
    container, edits, tricks, _, _ = case
    files = build_files(origin["adapter"], edits)
    if container == "folder":
        source = folder / "adapter"
        source.mkdir()
        for name, data in files.items():
            if data is not None:
                (source / name).write_bytes(data)
        for trick in tricks:
            if trick[0] == "symlink" and trick[1] in files:
                (source / trick[1]).unlink(missing_ok=True)
                (source / trick[1]).symlink_to(origin["adapter"] / ADAPTER_WEIGHTS)
        return source
    source = folder / ("adapter.tailor" if container == "bundle" else "adapter.zip")
    _write_zip(source, files, tricks, bundle=container == "bundle")
    return source


def assert_really_loads(entry_path: Path, base: Path) -> None:
    from peft import LoraConfig
    from safetensors import safe_open

    from app.core.library import BaseProfile, inspect_adapter_folder

    LoraConfig.from_pretrained(str(entry_path))
    with safe_open(str(entry_path / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            weights.get_tensor(key)
    manifest, problem = inspect_adapter_folder(entry_path)
    assert problem is None and manifest["name"] == entry_path.name
    from app.core.library import AdapterEntry, adapter_fit

    entry = AdapterEntry(entry_path.name, entry_path, manifest, None, 0)
    assert adapter_fit(entry, BaseProfile.from_folder(base, "tiny")) is None


@contextlib.contextmanager
def fresh_library(origin):
    """A copy of the origin library, a scratch folder for sources, and a private temporary directory to prove the
    import cleaned up after itself."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        shutil.copytree(origin["library"], folder / "library")
        (folder / "tmp").mkdir()
        (folder / "sources").mkdir()
        previous, tempfile.tempdir = tempfile.tempdir, str(folder / "tmp")
        try:
            yield Library(folder / "library"), folder / "sources", folder / "tmp"
        finally:
            tempfile.tempdir = previous


@given(case=sources())
def test_fuzzed_import_succeeds_fully_or_leaves_the_library_byte_identical(case, origin):
    with fresh_library(origin) as (library, sources_dir, scratch):
        source = make_source(sources_dir, origin, case)
        note(f"source: {source.name}, files: {sorted(p.name for p in source.iterdir()) if source.is_dir() else ''}")
        before, source_before = tree_digest(library.root), tree_digest(sources_dir)
        name = case[3]
        try:
            entry = import_adapter(library, source, name=name, base=str(origin["base"]))
        except TailorError as error:
            event(f"refused: {type(error).__name__}")
            assert "Traceback" not in str(error)
            assert tree_digest(library.root) == before, f"a refused import changed the library: {error}"
        else:
            event("imported")
            assert entry.ok and entry.path.parent == library.adapters_dir
            assert_really_loads(entry.path, origin["base"])
            assert library.get_usable("tiny").ok
        assert tree_digest(sources_dir) == source_before, "the import changed its source"
        assert list(scratch.iterdir()) == [], "the import left files in the temporary directory"


@given(case=sources().filter(lambda case: case[0] == "folder"))
def test_fuzzed_adapters_add_succeeds_fully_or_changes_nothing(case, origin):
    """`tailor adapters add` takes a folder as it is (no base check): what it adds must still load."""
    with fresh_library(origin) as (library, sources_dir, _):
        source = make_source(sources_dir, origin, case)
        before = tree_digest(library.root)
        try:
            entry = add_peft_folder(library, source, case[3] or "added")
        except TailorError:
            assert tree_digest(library.root) == before
        else:
            from peft import LoraConfig
            from safetensors import safe_open

            assert entry.ok, entry.problem
            LoraConfig.from_pretrained(str(entry.path))
            with safe_open(str(entry.path / ADAPTER_WEIGHTS), framework="pt") as weights:
                [weights.get_tensor(key) for key in weights.keys()]


@given(case=sources())
def test_cli_import_of_fuzzed_sources_exits_0_or_2(case, origin):
    with fresh_library(origin) as (library, sources_dir, _):
        source = make_source(sources_dir, origin, case)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["import", str(source), "--library", str(library.root), "--base", str(origin["base"]),
                         *(["--name", case[3]] if case[3] else [])])
        assert code in (0, 2), stderr.getvalue()
        assert "Traceback" not in stderr.getvalue() and "unexpected error" not in stderr.getvalue()


@pytest.mark.parametrize("trick", ["lying-header", "symlink-entry", "bomb"])
def test_real_cli_process_refuses_hostile_zips_with_exit_2(trick, origin, tmp_path):
    files = build_files(origin["adapter"], {"config": [], "manifest": [], "bytes": [],
                                            "weights": [("field", 0, "shape", [4096, 4096])] if trick == "lying-header" else []})
    tricks = {"lying-header": [], "symlink-entry": [("symlink", "link")], "bomb": [("declared-size", 1, 10)]}[trick]
    source = tmp_path / "hostile.zip"
    _write_zip(source, files, tricks, bundle=False)
    library = tmp_path / "library"
    shutil.copytree(origin["library"], library)
    before = tree_digest(library)
    result = subprocess.run([sys.executable, "-m", "app.cli", "import", str(source), "--library", str(library),
                             "--base", str(origin["base"])], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TAILOR_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "nothing was imported" in result.stderr or "is damaged" in result.stderr, result.stderr
    assert tree_digest(library) == before
