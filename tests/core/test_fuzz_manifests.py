"""Fuzzed manifests (`tailor.json`) in the library: whatever another tool, an old version or a bad disk left there,
listing, showing, renaming, deleting and exporting end in success or a named error (exit 2), never a traceback,
and the other adapters in the library are never touched.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from adapter_factory import make_random_adapters
from hypothesis import given, note, settings
from hypothesis import strategies as st
from library_state import tree_digest

from app.cli import main
from app.core.library import MANIFEST_NAME, Library

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
KEYS = ["name", "kind", "system_prompt", "created", "final_loss", "base_model", "dataset", "config", "sampling", "steps",
        "planned_steps", "quant", "library_version", "report_card"]
PARTS = {"base_model": ["id", "source", "fingerprint", "architecture"], "dataset": ["path", "rows", "fingerprint", "format"],
         "config": ["model", "training", "data", "lora"]}
edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), json_values),
    st.tuples(st.just("set-part"), st.sampled_from(sorted(PARTS)), st.sampled_from(sorted({p for v in PARTS.values() for p in v})),
              json_values),
    st.tuples(st.just("drop"), st.sampled_from(KEYS)),
    st.tuples(st.just("replace"), json_values),
)
raw_damage = st.sampled_from([None, None, "truncate", "invalid-utf8", "bom", "deep", "empty", "crlf"])
COMMANDS = [["adapters", "list"], ["adapters", "show", "fuzzed"], ["adapters", "rename", "fuzzed", "renamed"],
            ["adapters", "delete", "fuzzed"], ["export", "fuzzed", "--format", "peft"],
            ["export", "fuzzed", "--format", "bundle"]]


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_base) -> Path:
    library = Library(tmp_path_factory.mktemp("manifests") / "library")
    make_random_adapters(library, tiny_base, ["fuzzed", "other"], system_prompt="You are a pirate.")
    manifest = json.loads((library.adapters_dir / "fuzzed" / MANIFEST_NAME).read_text())
    # A trained adapter's manifest has every section; start the fuzz from one.
    manifest.update({"dataset": {"path": "/nowhere/data.jsonl", "rows": 16, "usable_rows": 16, "format": "openai",
                                 "fingerprint": "0" * 16},
                     "config": {"model": {"base": str(tiny_base), "quant": "4bit"}, "training": {"learning_rate": 1e-3},
                                "data": {"path": "/nowhere/data.jsonl", "max_len": 128}, "lora": {"rank": 4}},
                     "final_loss": 1.5, "steps": 4, "planned_steps": 4, "sampling": {"temperature": 0.7}})
    (library.adapters_dir / "fuzzed" / MANIFEST_NAME).write_text(json.dumps(manifest))
    return library.root


def fuzzed_manifest(original: dict, changes, damage) -> bytes:
    value = original
    for edit in changes:
        if edit[0] == "replace":
            value = edit[1]
        elif isinstance(value, dict):
            value = dict(value)
            if edit[0] == "set":
                value[edit[1]] = edit[2]
            elif edit[0] == "drop":
                value.pop(edit[1], None)
            else:
                part = value.get(edit[1]) if isinstance(value.get(edit[1]), dict) else {}
                value[edit[1]] = {**part, edit[2]: edit[3]}
    data = json.dumps(value).encode()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "invalid-utf8":
        data = data[:5] + b"\xff\xfe" + data[5:]
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "deep":
        data = b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    elif damage == "empty":
        data = b""
    elif damage == "crlf":
        data = json.dumps(value, indent=1).replace("\n", "\r\n").encode()
    return data


def run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, stderr.getvalue()


# Each example runs a whole CLI command (an export reads the base's tokenizer), so half the profile's count.
@settings(max_examples=max(10, settings().max_examples // 2))
@given(changes=st.lists(edits, max_size=3), damage=raw_damage, command=st.sampled_from(COMMANDS))
def test_fuzzed_manifest_never_crashes_a_command_or_touches_other_adapters(changes, damage, command, origin):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "library"
        shutil.copytree(origin, root)
        manifest_path = root / "adapters" / "fuzzed" / MANIFEST_NAME
        manifest_path.write_bytes(fuzzed_manifest(json.loads(manifest_path.read_text()), changes, damage))
        note(manifest_path.read_bytes()[:300])
        other_before = tree_digest(root / "adapters" / "other")

        library = Library(root)
        for entry in library.entries():  # every property the app and CLI read is safe on any manifest
            (entry.kind, entry.created, entry.final_loss, entry.dataset_rows, entry.rank, entry.system_prompt,
             entry.sampling, entry.trained_with, entry.base_model_id, entry.base_fingerprint)
        out = ["--out", str(Path(folder) / "export")] if command[0] == "export" else []
        code, stderr = run_cli([*command, *out, "--library", str(root)])
        assert code in (0, 2), stderr
        assert "Traceback" not in stderr and "unexpected error" not in stderr, stderr
        assert tree_digest(root / "adapters" / "other") == other_before
        if code == 2 and command[0] == "export":
            assert not (Path(folder) / "export").exists(), "a refused export left a file"
