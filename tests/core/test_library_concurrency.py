"""Several writers on one library at once: processes importing, publishing, renaming, deleting, emptying the trash,
listing and exporting for a bounded time, then a check that nothing was lost, half-written or left behind.

Each writer process owns the adapters it creates (it alone renames or deletes them), so at the end the library must
hold exactly the union of what every writer says it still has. Imports without a name race for the same one on
purpose ('tiny', 'tiny-2', …). Listing and exporting read adapters that other writers may be moving that instant:
they may fail only with a named TailorError, and a listing may never show a damaged adapter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from adapter_factory import make_random_adapters

from app.core.errors import TailorError
from app.core.export import export_adapter
from app.core.library import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LIBRARY_VERSION, MANIFEST_NAME, Library, inspect_adapter_folder, write_json_atomic,
)

REPO = Path(__file__).resolve().parents[2]
STRESS_SECONDS = float(os.environ.get("TAILOR_STRESS_SECONDS", "20"))
API_WRITERS = 3


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_base) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sources")
    origin = Library(folder / "origin")
    make_random_adapters(origin, tiny_base, ["tiny"], system_prompt="You are a pirate.")
    return {"bundle": str(export_adapter(origin, "tiny", "bundle", folder / "tiny.tailor")),
            "peft": str(export_adapter(origin, "tiny", "peft", folder / "tiny-peft")),
            "base": str(tiny_base)}


def api_writer(root: str, sources: dict[str, str], worker: int, seconds: float, report: str) -> None:
    """One writer process using the core API; writes what it did and what it still owns to `report`."""
    from app.core.importer import import_adapter

    library, rng = Library(root), random.Random(worker)
    owned: list[str] = []
    counts: dict[str, int] = {}
    problems: list[str] = []
    export_dir = Path(report).with_suffix(".exports")
    deadline, serial = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        serial += 1
        action = rng.choice(["import", "import-unnamed", "publish", "rename", "delete", "empty-trash", "list", "export"])
        try:
            if action == "import":
                owned.append(import_adapter(library, sources[rng.choice(["bundle", "peft"])], name=f"w{worker}-{serial}",
                                            base=sources["base"]).name)
            elif action == "import-unnamed":
                owned.append(import_adapter(library, sources["bundle"], base=sources["base"]).name)
            elif action == "publish":  # what a training run does at its end
                with library.staging() as staged:
                    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                        shutil.copyfile(Path(sources["peft"]) / name, staged / name)
                    name = f"w{worker}-trained-{serial}"
                    write_json_atomic(staged / MANIFEST_NAME, {"library_version": LIBRARY_VERSION, "name": name,
                                                               "kind": "trained"})
                    owned.append(library.publish(staged, name).name)
            elif action == "rename" and owned:
                old = owned.pop(rng.randrange(len(owned)))
                owned.append(library.rename(old, f"w{worker}-renamed-{serial}").name)
            elif action == "delete" and owned:
                library.delete(owned.pop(rng.randrange(len(owned))))
            elif action == "empty-trash":
                library.empty_trash()
            elif action == "list":
                damaged = [f"{entry.name}: {entry.problem}" for entry in library.entries() if not entry.ok]
                if damaged:
                    problems.append(f"listing showed damaged adapters: {damaged}")
            elif action == "export":
                names = [entry.name for entry in library.entries()]
                if names:
                    try:  # another writer may rename or delete it meanwhile: that must be a named error
                        export_adapter(library, rng.choice(names), "peft", export_dir / str(serial))
                    except TailorError:
                        counts["export-refused"] = counts.get("export-refused", 0) + 1
            counts[action] = counts.get(action, 0) + 1
        except Exception:
            problems.append(f"{action}: {traceback.format_exc()}")
    Path(report).write_text(json.dumps({"owned": owned, "counts": counts, "problems": problems}))


def cli_writer(root: str, sources: dict[str, str], seconds: float, report: str) -> None:
    """A second kind of writer: real `tailor` processes, as a user's terminal would run them, with their exit codes."""
    owned, problems, serial = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        serial += 1
        name = f"cli-{serial}"
        steps = [(["import", sources["peft"], "--name", name, "--base", sources["base"]], name),
                 (["adapters", "rename", name, f"{name}-renamed"], f"{name}-renamed")]
        if serial % 2:
            steps.append((["adapters", "delete", f"{name}-renamed"], None))
        for argv, owns in steps:
            if time.monotonic() > deadline:
                break
            result = subprocess.run([sys.executable, "-m", "app.cli", *argv, "--library", root], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                problems.append(f"tailor {' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")
                break
            owned = [n for n in owned if n != name and n != f"{name}-renamed"] + ([owns] if owns else [])
    Path(report).write_text(json.dumps({"owned": owned, "counts": {"cli-rounds": serial}, "problems": problems}))


def _loads_completely(folder: Path) -> None:
    """The adapter is whole: peft parses its config, safetensors loads every tensor, the manifest names it."""
    from peft import LoraConfig
    from safetensors import safe_open

    LoraConfig.from_pretrained(str(folder))
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as weights:
        assert all(weights.get_tensor(key).numel() > 0 for key in weights.keys())
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["name"] == folder.name or folder.parent.name == "trash", (folder, manifest["name"])


def test_several_writers_at_once_lose_nothing_and_leave_nothing_half_written(sources, tmp_path):
    root = tmp_path / "library"
    Library(root).ensure()
    context = multiprocessing.get_context("spawn")
    reports = [tmp_path / f"writer-{index}.json" for index in range(API_WRITERS + 1)]
    processes = [context.Process(target=api_writer, args=(str(root), sources, index, STRESS_SECONDS, str(reports[index])))
                 for index in range(API_WRITERS)]
    processes.append(context.Process(target=cli_writer, args=(str(root), sources, STRESS_SECONDS, str(reports[-1]))))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=STRESS_SECONDS + 240)
        assert process.exitcode == 0, f"a writer process died (exit {process.exitcode})"

    results = [json.loads(report.read_text()) for report in reports]
    problems = [problem for result in results for problem in result["problems"]]
    assert not problems, "\n\n".join(problems[:5])
    done = {}
    for result in results:
        for action, count in result["counts"].items():
            done[action] = done.get(action, 0) + count
    print(f"operations in {STRESS_SECONDS:.0f} s: {done}")
    for action in ("import", "import-unnamed", "publish", "rename", "delete", "empty-trash", "export"):
        assert done.get(action, 0) >= 3, f"too few '{action}' operations overlapped to prove anything: {done}"
    assert done["cli-rounds"] >= 2

    library = Library(root)
    expected = sorted(name for result in results for name in result["owned"])
    assert len(expected) == len(set(expected)), "two writers were handed the same adapter name"
    assert sorted(entry.name for entry in library.entries()) == expected
    for entry in library.entries():
        assert entry.ok, f"{entry.name}: {entry.problem}"
        _loads_completely(entry.path)
        assert sorted(p.name for p in entry.path.iterdir() if p.name.startswith(".")) == [], "temporary files left"
    assert list((root / ".staging").iterdir()) == [], "staging leftovers"
    for trashed in library.trash_entries():  # whatever was not emptied yet is a whole adapter, not a fragment
        manifest, problem = inspect_adapter_folder(trashed)
        assert problem is None, f"{trashed.name}: {problem}"
        _loads_completely(trashed)


def test_what_a_killed_writer_left_in_staging_is_swept_by_the_next_one(sources, tmp_path):
    import os as os_module
    import time as time_module

    library = Library(tmp_path / "library").ensure()
    stale, fresh = library.root / ".staging" / "adapter-killed", library.root / ".staging" / "adapter-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / ADAPTER_WEIGHTS).write_bytes(b"half")
    day_old = time_module.time() - 25 * 3600
    os_module.utime(stale, (day_old, day_old))
    with library.staging():
        pass
    assert not stale.exists() and fresh.exists(), "only the abandoned folder goes; a running import's stays"
