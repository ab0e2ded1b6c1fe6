"""A full disk while publishing, importing, exporting, converting the bundled model or checkpointing: a clear message
naming the place and the space needed, every existing adapter (and the previous checkpoint) intact, no partial file.

The disk is real: a tmpfs of a few MB mounted for the test (this needs root, as on the development machines and in
CI; elsewhere these tests skip). Some tests fill it before the operation, which the up-front check must catch; others
switch the up-front check off (as if another program filled the disk after it) so the write itself hits the real
ENOSPC half-way and the cleanup is what is tested. A last test injects the OSError where no tmpfs can be mounted.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from adapter_factory import make_random_adapters
from library_state import tree_digest

from app.cli import main
from app.core import diskspace
from app.core.diskspace import DiskFullError, disk_space_errors, free_bytes, require_free_space
from app.core.export import default_export_name, export_adapter
from app.core.importer import import_adapter
from app.core.library import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Library, add_peft_folder

MB = 1 << 20
# What stays free on a "full" disk: room for small JSON files, not for the half-MB adapter below.
LEAVE = 256 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 8 MB, unmounted afterwards; `fill(leave)` leaves only `leave` bytes free on it."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free on `disk`."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb") as handle:
        try:
            handle.write(b"\0" * max(0, free_bytes(disk) - leave))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def no_up_front_check(monkeypatch) -> None:
    """As if another program filled the disk between the check and the write."""
    for module in ("app.core.library", "app.core.export", "app.core.importer", "app.core.models"):
        monkeypatch.setattr(f"{module}.require_free_space", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory, tiny_base) -> Path:
    """A PEFT folder of about half a MB (rank 64 on every projection of the tiny model), more than is left free."""
    origin = Library(tmp_path_factory.mktemp("big") / "library")
    make_random_adapters(origin, tiny_base, ["big"], rank=64,
                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return origin.adapters_dir / "big"


@pytest.fixture
def library_on_small_disk(small_disk, tiny_base) -> Library:
    library = Library(small_disk / "library")
    make_random_adapters(library, tiny_base, ["existing"], system_prompt="You are a pirate.")
    return library


def assert_existing_adapter_intact(library: Library) -> None:
    from safetensors import safe_open

    entry = library.get_usable("existing")
    json.loads((entry.path / ADAPTER_CONFIG).read_text())
    with safe_open(str(entry.path / ADAPTER_WEIGHTS), framework="pt") as weights:
        assert [weights.get_tensor(key).shape for key in weights.keys()]


def assert_no_partial_files(library: Library) -> None:
    assert list((library.root / ".staging").iterdir()) == []
    assert sorted(entry.name for entry in library.entries()) == ["existing"]


def test_size_and_place_in_the_message(small_disk):
    fill(small_disk, 3 * MB)
    with pytest.raises(DiskFullError) as caught:
        require_free_space(small_disk / "not-yet" / "made", 50_000_000, "save a checkpoint")
    message = str(caught.value)
    assert str(small_disk / "not-yet" / "made") in message and "50.0 MB" in message and "save a checkpoint" in message
    assert caught.value.needed_bytes == 50_000_000 and 2 * MB < caught.value.free_bytes < 4 * MB
    require_free_space(small_disk, 1 * MB, "save a checkpoint")  # room enough: no error


@pytest.mark.parametrize("checked_up_front", [True, False], ids=["checked-up-front", "disk-fills-while-writing"])
def test_import_into_a_full_library_leaves_it_byte_identical(checked_up_front, library_on_small_disk, big_adapter,
                                                             tiny_base, monkeypatch):
    library = library_on_small_disk
    filler = fill(library.root.parent, LEAVE)
    if not checked_up_front:
        no_up_front_check(monkeypatch)
    before = tree_digest(library.root)
    with pytest.raises(DiskFullError, match="Not enough disk space to add (the|an) adapter to the library") as caught:
        import_adapter(library, big_adapter, name="big", base=str(tiny_base))
    assert str(library.root) in str(caught.value)
    assert tree_digest(library.root) == before
    assert_existing_adapter_intact(library)
    filler.unlink()  # with the space back, the same import works
    assert import_adapter(library, big_adapter, name="big", base=str(tiny_base)).ok


def test_publishing_a_trained_adapter_on_a_full_disk(library_on_small_disk, big_adapter):
    """What a training run does at its end: write into staging, then publish. The disk fills half-way."""
    library = library_on_small_disk
    fill(library.root.parent, LEAVE)
    with pytest.raises(DiskFullError, match=f"Not enough disk space to add an adapter to the library in {library.root}"):
        with library.staging() as staged:
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(big_adapter / name, staged / name)
            library.publish(staged, "trained")
    assert_no_partial_files(library)
    assert_existing_adapter_intact(library)


def test_adding_a_peft_folder_is_refused_up_front(library_on_small_disk, big_adapter):
    fill(library_on_small_disk.root.parent, LEAVE)
    with pytest.raises(DiskFullError, match=r"needs about 5\d\d\.\d kB"):
        add_peft_folder(library_on_small_disk, big_adapter, "big")
    assert_no_partial_files(library_on_small_disk)


@pytest.mark.parametrize("format", ["peft", "bundle"])
@pytest.mark.parametrize("checked_up_front", [True, False], ids=["checked-up-front", "disk-fills-while-writing"])
def test_export_to_a_full_disk_leaves_no_partial_file(format, checked_up_front, small_disk, big_adapter, tmp_path,
                                                     monkeypatch):
    library = Library(tmp_path / "library")
    add_peft_folder(library, big_adapter, "big")
    earlier = small_disk / "exports" / "earlier.txt"
    earlier.parent.mkdir()
    earlier.write_text("an earlier export the user keeps")
    fill(small_disk, LEAVE)
    if not checked_up_front:
        no_up_front_check(monkeypatch)
    with pytest.raises(DiskFullError, match=f"Not enough disk space to export 'big' in {small_disk / 'exports'}"):
        export_adapter(library, "big", format, small_disk / "exports" / default_export_name(format, "big"))
    assert sorted(path.name for path in (small_disk / "exports").iterdir()) == ["earlier.txt"]
    assert earlier.read_text() == "an earlier export the user keeps"
    assert library.get_usable("big").ok


def test_cli_export_to_a_full_disk_exits_2_with_the_message(small_disk, big_adapter, tmp_path, capsys):
    library = Library(tmp_path / "library")
    add_peft_folder(library, big_adapter, "big")
    fill(small_disk, LEAVE)
    code = main(["export", "big", "--format", "peft", "--out", str(small_disk / "big-peft"), "--library", str(library.root)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Not enough disk space to export 'big'" in err and str(small_disk) in err and "Traceback" not in err
    assert not (small_disk / "big-peft").exists()


@pytest.mark.slow
def test_converting_the_bundled_model_on_a_full_disk(small_disk, monkeypatch):
    """The first start converts the bundled GGUF (about 540 MB of safetensors); here the cache disk holds 8 MB."""
    from app.core.models import BUNDLED_HUB_ID, bundled_gguf_path, convert_gguf

    target = small_disk / "models" / "smollm2"
    no_up_front_check(monkeypatch)  # (the up-front check costs one more ~30 s load; export and import test it)
    with pytest.raises(DiskFullError, match=r"convert SmolLM2-135M-Instruct\.Q4_1\.gguf into a model folder in "
                                            rf"{small_disk / 'models'}: it needs about \d+\.\d MB"):
        convert_gguf(bundled_gguf_path(), target, BUNDLED_HUB_ID)
    assert not target.exists()
    assert list((small_disk / "models").iterdir()) == [], "a partial conversion was left behind"
    assert free_bytes(small_disk) > 7 * MB


def test_training_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk, tiny_base, chat_jsonl):
    """For app/core/training.py (the lead's): the second checkpoint meets a full disk. The run must stop with a
    DiskFullError naming the run folder, keep the first checkpoint resumable, and leave no half-written one."""
    from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
    from app.core.training import CheckpointEvent, interrupted_run_progress, run_training

    library = Library(small_disk / "library")
    config = RunConfig(name="tiny", model=ModelSource(base=str(tiny_base), quant="4bit"),
                       data=DataSettings(path=str(chat_jsonl), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                       training=TrainingSettings(max_steps=6, batch_size=4, checkpoint_every=2))

    def fill_after_first_checkpoint(event) -> None:
        if isinstance(event, CheckpointEvent):
            fill(small_disk, 16 * 1024)

    try:
        run_training(config, library, fill_after_first_checkpoint)
    except DiskFullError as error:
        assert str(library.run_dir("tiny")) in str(error)
    else:
        pytest.fail("the run finished although the disk was full")
    run_dir = library.run_dir("tiny")
    assert interrupted_run_progress(library, "tiny")[0] == 2, "the first checkpoint is gone"
    assert sorted(path.name for path in run_dir.iterdir() if path.name.startswith(".")) == [], "partial checkpoint left"
    assert library.entries() == []


def test_an_injected_enospc_is_named_where_no_tmpfs_can_be_mounted(tmp_path):
    """The translation alone, with the real OSError a full disk raises, for machines without mount rights."""
    with pytest.raises(DiskFullError) as caught:
        with disk_space_errors(tmp_path, "save a checkpoint", needed_bytes=300 * MB):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "adapter_model.safetensors"))
    assert f"Not enough disk space to save a checkpoint in {tmp_path}: it needs about 314.6 MB" in str(caught.value)
    with pytest.raises(DiskFullError, match="quota"):
        with disk_space_errors(tmp_path, "export 'x'"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError):  # every other error passes unchanged
        with disk_space_errors(tmp_path, "export 'x'"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert diskspace.is_disk_full(OSError(errno.ENOSPC, "full")) and not diskspace.is_disk_full(ValueError())
