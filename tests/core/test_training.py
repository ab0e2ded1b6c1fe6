"""The training loop on a tiny random Llama in real 4-bit: events, masking-aware loss, stop, pause, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.errors import TailorError
from app.core.library import Library
from app.core.batches import collate, group_batches
from app.core.training import (
    FinishedEvent, PausedEvent, StartEvent, StepEvent, TrainingControl, interrupted_run_progress, run_training,
    trained_token_loss,
)


def tiny_config(base: Path, data: Path, name: str = "tiny", **training) -> RunConfig:
    options = {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "checkpoint_every": 2, **training}
    return RunConfig(name=name, system_prompt="You are a pirate.", model=ModelSource(base=str(base), quant="4bit"),
                     data=DataSettings(path=str(data), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                     training=TrainingSettings(**options))


def test_trains_4bit_and_publishes_a_peft_adapter_with_manifest(tiny_base, chat_jsonl, tmp_path):
    library = Library(tmp_path / "lib")
    events = []
    result = run_training(tiny_config(tiny_base, chat_jsonl), library, events.append)

    assert result.steps == 4 and not result.paused and not result.stopped_early
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps][-1] == 4 and all(e.tokens_per_s > 0 and e.memory_bytes > 0 for e in steps)
    assert isinstance(events[-1], FinishedEvent)
    start = next(e for e in events if isinstance(e, StartEvent))
    assert start.device == "cpu" and start.trainable_params > 0

    folder = library.adapters_dir / "tiny"
    assert {"adapter_config.json", "adapter_model.safetensors", "tailor.json", "training_log.json"} <= {p.name for p in folder.iterdir()}
    manifest = json.loads((folder / "tailor.json").read_text())
    assert manifest["system_prompt"] == "You are a pirate."
    assert manifest["dataset"]["rows"] == 16 and len(manifest["dataset"]["fingerprint"]) == 16
    assert manifest["config"]["lora"]["rank"] == 4 and manifest["final_loss"] == pytest.approx(steps[-1].loss)
    assert len(manifest["base_model"]["fingerprint"]) == 16
    assert not library.run_dir("tiny").exists(), "a finished run leaves no run folder behind"
    assert not list((library.root / ".staging").iterdir())

    # The base weights must really be 4-bit while only the LoRA matrices learn.
    from app.core.models import load_model
    import bitsandbytes as bnb

    model = load_model(tiny_base, "4bit", "cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_loss_falls_on_repeated_data(tiny_base, chat_jsonl, tmp_path):
    result = run_training(tiny_config(tiny_base, chat_jsonl, max_steps=12, learning_rate=1e-2), Library(tmp_path / "lib"))
    log = result.adapter.training_log()
    # A random tiny model cannot learn much through rank-4 adapters, but the drop is well beyond noise.
    assert log[-1]["loss"] < log[0]["loss"] - 0.3


def test_loss_ignores_padding_and_masked_tokens(tiny_base):
    """The same example alone or padded inside a batch must give the same summed loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.core.data import Example
    from app.core.models import load_model

    model = get_peft_model(load_model(tiny_base, "none", "cpu"), LoraConfig(r=4, target_modules="all-linear")).eval()
    short = Example([5, 6, 7, 8], [-100, -100, 7, 8])
    long = Example([9, 10, 11, 12, 13, 14, 15], [-100, 10, 11, 12, 13, 14, 15])
    with torch.no_grad():
        alone, count_alone = trained_token_loss(model, collate([short], 2, packing=False), "cpu")
        padded, count_padded = trained_token_loss(model, collate([short, long], 2, packing=False), "cpu")
        long_alone, _ = trained_token_loss(model, collate([long], 2, packing=False), "cpu")
        packed, count_packed = trained_token_loss(model, collate([short, long], 2, packing=True), "cpu")
    assert count_alone == 2 and count_padded == count_packed == 2 + 6
    assert float(padded) == pytest.approx(float(alone) + float(long_alone), rel=1e-4)
    # Packed examples must not see each other: attention restarts at every example's first position.
    assert float(packed) == pytest.approx(float(padded), rel=1e-4)


def test_length_grouping_is_deterministic_and_covers_every_example():
    lengths = [((i * 37) % 101) + 1 for i in range(200)]
    batches = group_batches(lengths, 8, seed=3, epoch=1)
    assert batches == group_batches(lengths, 8, seed=3, epoch=1)
    assert batches != group_batches(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding / sum(lengths) < 0.15, "length grouping should leave little padding"


def test_stop_saves_the_adapter_trained_so_far(tiny_base, chat_jsonl, tmp_path):
    control = TrainingControl()
    stopped_at = []

    def sink(event):
        # Step events are throttled to ~10/s, so stop at the first one seen rather than at a fixed step.
        if isinstance(event, StepEvent) and not stopped_at:
            stopped_at.append(event.step)
            control.request_stop()

    result = run_training(tiny_config(tiny_base, chat_jsonl, max_steps=10), Library(tmp_path / "lib"), sink, control)
    assert result.stopped_early and result.steps == stopped_at[0] < 10
    assert (result.adapter.path / "adapter_model.safetensors").is_file()
    assert result.adapter.manifest["steps"] == stopped_at[0] and result.adapter.manifest["planned_steps"] == 10


def test_pause_then_resume_reaches_the_same_step_count(tiny_base, chat_jsonl, tmp_path):
    library = Library(tmp_path / "lib")
    control = TrainingControl()
    events = []

    def sink(event):
        events.append(event)
        if isinstance(event, StepEvent):
            control.request_pause()

    config = tiny_config(tiny_base, chat_jsonl, max_steps=6, checkpoint_every=100)
    paused = run_training(config, library, sink, control)
    paused_at = paused.steps
    assert paused.paused and paused.adapter is None and isinstance(events[-1], PausedEvent) and paused_at < 6
    assert library.interrupted_runs() == ["tiny"] and interrupted_run_progress(library, "tiny") == (paused_at, 6)

    with pytest.raises(TailorError, match="interrupted run"):
        run_training(config, library)  # forgetting --resume must not throw the progress away

    resumed_events = []
    resumed = run_training(config, library, resumed_events.append, resume=True)
    start = next(e for e in resumed_events if isinstance(e, StartEvent))
    assert start.start_step == paused_at and resumed.steps == 6
    assert [entry["step"] for entry in resumed.adapter.training_log()] == [1, 2, 3, 4, 5, 6]
    assert library.interrupted_runs() == []


def test_resume_without_a_run_is_a_clear_error(tiny_base, chat_jsonl, tmp_path):
    with pytest.raises(TailorError, match="no interrupted run"):
        run_training(tiny_config(tiny_base, chat_jsonl), Library(tmp_path / "lib"), resume=True)


def test_existing_adapter_is_never_overwritten(tiny_base, chat_jsonl, tmp_path):
    library = Library(tmp_path / "lib")
    run_training(tiny_config(tiny_base, chat_jsonl, max_steps=1), library)
    before = (library.adapters_dir / "tiny" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TailorError, match="already exists"):
        run_training(tiny_config(tiny_base, chat_jsonl, max_steps=1), library)
    assert (library.adapters_dir / "tiny" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_kill_9_then_resume_from_the_command_line(tiny_base, chat_jsonl, tmp_path):
    """A hard kill mid-run loses at most the steps since the last checkpoint; --resume ends at the planned step."""
    env = {**os.environ, "TAILOR_HOME": str(tmp_path / "lib")}
    command = [sys.executable, "-m", "app.cli", "train", "--data", str(chat_jsonl), "--base", str(tiny_base),
               "--name", "killed", "--max-steps", "150", "--batch-size", "2", "--rank", "4", "--max-len", "64",
               "--checkpoint-every", "10"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    library = Library(tmp_path / "lib")
    deadline = time.monotonic() + 240
    while interrupted_run_progress(library, "killed")[0] < 10 and time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    reached, total = interrupted_run_progress(library, "killed")
    assert 10 <= reached < 150 and total == 150 and not library.exists("killed")

    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr
    manifest = library.get("killed").manifest
    assert manifest["steps"] == 150
    steps = [entry["step"] for entry in library.get("killed").training_log()]
    assert steps == list(range(1, 151))

    # The same command never interrupted ends with the same adapter: nothing about the kill leaks into the result.
    command[command.index("killed")] = "straight"
    subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=True)
    import torch

    expected, actual = _adapter_tensors(library.get("straight")), _adapter_tensors(library.get("killed"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


# Issue: a trainer you can trust (coverage, logging, warm-up, checkpoints, resume equivalence, OOM recovery)


@pytest.mark.parametrize("examples", [7, 8, 9, 13, 16])
@pytest.mark.parametrize("batch_size,grad_accum", [(1, 1), (2, 2), (3, 3), (2, 4), (4, 3)])
def test_every_epoch_covers_every_example_once_and_the_run_trains_exactly_its_epochs(examples, batch_size, grad_accum):
    from app.core.batches import StepPlan, split_micro_batches

    lengths = [(i * 7) % 11 + 3 for i in range(examples)]
    training = TrainingSettings(epochs=3, batch_size=batch_size, grad_accum=grad_accum)
    plan = StepPlan(lengths, training.examples_per_step, seed=5)
    total = training.planned_steps(examples)
    seen: dict[int, list[int]] = {}
    for step in range(total):
        indices = plan.examples_for(step)
        micro = split_micro_batches(indices, lengths, batch_size)
        assert len(micro) <= grad_accum and all(len(chunk) <= batch_size for chunk in micro)
        seen.setdefault(plan.epoch_of(step), []).extend(i for chunk in micro for i in chunk)
    assert sorted(seen) == [0, 1, 2], "exactly `epochs` epochs, none spilled into a fourth"
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(examples)), f"epoch {epoch} must train every example exactly once"


def test_the_log_records_examples_and_tokens_per_step_covering_every_example_per_epoch(tiny_base, chat_jsonl, tmp_path):
    # 16 rows, no held-out split below 20 rows; batch 3 x accumulation 2 does not divide the epoch evenly.
    config = tiny_config(tiny_base, chat_jsonl, max_steps=None, epochs=2, batch_size=3, grad_accum=2,
                         checkpoint_every=100)
    result = run_training(config, Library(tmp_path / "lib"))
    log = result.adapter.training_log()
    assert result.steps == 2 * 3 == len(log)
    for epoch in (1, 2):
        assert sum(entry["examples"] for entry in log if entry["epoch"] == epoch) == 16
    assert all(entry["tokens"] > 0 for entry in log)


def test_short_runs_still_warm_up():
    assert TrainingSettings(warmup_ratio=0.03).warmup_steps(20) == 1
    assert TrainingSettings(warmup_ratio=0.0).warmup_steps(20) == 0
    assert TrainingSettings(warmup_ratio=0.1).warmup_steps(100) == 10


def test_a_checkpoint_holds_only_tensors_and_plain_data(tiny_base, chat_jsonl, tmp_path):
    """Resuming must not need torch.load(weights_only=False), which would run any pickled code in the file."""
    import torch

    library = Library(tmp_path / "lib")
    control = TrainingControl()
    run_training(tiny_config(tiny_base, chat_jsonl, max_steps=6), library,
                 lambda event: isinstance(event, StepEvent) and control.request_pause(), control)
    state = torch.load(library.run_dir("tiny") / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["progress"]["step"] >= 1 and "cpu" in state["rng"]


def _adapter_tensors(entry):
    from safetensors.torch import load_file

    return load_file(entry.path / "adapter_model.safetensors")


def test_pause_and_resume_end_with_the_uninterrupted_runs_adapter(tiny_base, chat_jsonl, tmp_path):
    """Data order, dropout masks, optimizer moments and the schedule all continue exactly where they stopped."""
    import torch

    config = tiny_config(tiny_base, chat_jsonl, max_steps=8, checkpoint_every=3, batch_size=3, grad_accum=2)
    config = config.replace(lora=LoraSettings(rank=4, alpha=8, dropout=0.1))
    straight = run_training(config, Library(tmp_path / "straight"))

    library = Library(tmp_path / "interrupted")
    control = TrainingControl()
    run_training(config, library, lambda e: isinstance(e, StepEvent) and e.step >= 3 and control.request_pause(),
                 control)
    assert 3 <= interrupted_run_progress(library, "tiny")[0] < 8
    resumed = run_training(config, library, resume=True)

    expected, actual = _adapter_tensors(straight.adapter), _adapter_tensors(resumed.adapter)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert [e["loss"] for e in resumed.adapter.training_log()] == pytest.approx(
        [e["loss"] for e in straight.adapter.training_log()], rel=1e-5)


def test_simulated_out_of_memory_recovers_with_smaller_micro_batches(tiny_base, chat_jsonl, tmp_path, monkeypatch):
    from app.core.training import RecoveryEvent

    monkeypatch.setenv("TAILOR_SIMULATE_OOM_AT", "2,5")
    events = []
    config = tiny_config(tiny_base, chat_jsonl, max_steps=None, epochs=2, batch_size=4, grad_accum=1,
                         gradient_checkpointing=True)
    result = run_training(config, Library(tmp_path / "lib"), events.append)

    recoveries = [e for e in events if isinstance(e, RecoveryEvent)]
    assert [(e.step, e.micro_batch_size, e.grad_accum) for e in recoveries] == [(2, 2, 2), (5, 1, 4)]
    log = result.adapter.training_log()
    assert result.steps == result.total_steps == 8 and [e["step"] for e in log] == list(range(1, 9))
    for epoch in (1, 2):
        assert sum(entry["examples"] for entry in log if entry["epoch"] == epoch) == 16
    recorded = result.adapter.manifest["oom_recoveries"]
    assert [(r["step"], r["micro_batch_size"], r["grad_accum"]) for r in recorded] == [(2, 2, 2), (5, 1, 4)]
    assert all(r["lost_steps"] == 0 for r in recorded)


def test_out_of_memory_without_checkpointing_turns_it_on_as_it_shrinks_the_batch(tiny_base, chat_jsonl, tmp_path,
                                                                                     monkeypatch):
    from app.core.training import RecoveryEvent

    monkeypatch.setenv("TAILOR_SIMULATE_OOM_AT", "2,3")
    events = []
    config = tiny_config(tiny_base, chat_jsonl, max_steps=4, batch_size=4, gradient_checkpointing=None)
    result = run_training(config, Library(tmp_path / "lib"), events.append)

    assert result.adapter.manifest["config"]["training"]["gradient_checkpointing"] is False, "auto: the tiny run fits"
    recoveries = [e for e in events if isinstance(e, RecoveryEvent)]
    assert [(e.step, e.micro_batch_size, e.grad_accum) for e in recoveries] == [(2, 2, 2), (3, 1, 4)]
    assert "gradient checkpointing on" in recoveries[0].message
    assert "gradient checkpointing" not in recoveries[1].message, "it is on already"
    recorded = result.adapter.manifest["oom_recoveries"]
    assert [r["gradient_checkpointing"] for r in recorded] == [True, True]
    assert result.steps == 4


def test_checkpointing_every_other_block_is_applied_resumed_and_tightened_by_out_of_memory(tiny_base, chat_jsonl,
                                                                                          tmp_path):
    from app.core.training import setup

    def checkpointed(run) -> list[bool]:
        return [layer.gradient_checkpointing for layer in run.model.get_base_model().get_decoder().layers]

    library = Library(tmp_path / "lib")
    config = tiny_config(tiny_base, chat_jsonl, gradient_checkpointing=True, checkpoint_every_n_layers=2)
    run = setup(config, library, lambda event: None, resume=False)
    blocks = len(checkpointed(run))
    assert blocks >= 2 and checkpointed(run) == [index % 2 == 0 for index in range(blocks)]
    run.save_checkpoint()
    resumed = setup(config, library, lambda event: None, resume=True)
    assert checkpointed(resumed) == checkpointed(run), "a resumed run checkpoints the blocks it did"

    events = []
    resumed.sink = events.append
    resumed.recover_from_out_of_memory(MemoryError("simulated"))
    assert checkpointed(resumed) == [True] * blocks
    assert "gradient checkpointing on every block" in events[-1].message
    assert resumed.progress.recoveries[-1]["checkpoint_every_n_layers"] == 1
    resumed.save_checkpoint()
    assert checkpointed(setup(config, library, lambda event: None, resume=True)) == [True] * blocks


def test_out_of_memory_three_times_stops_with_the_fix_and_keeps_the_checkpoint(tiny_base, chat_jsonl, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("TAILOR_SIMULATE_OOM_AT", "3,4,5")
    library = Library(tmp_path / "lib")
    with pytest.raises(TailorError, match="ran out of memory at step 5") as raised:
        run_training(tiny_config(tiny_base, chat_jsonl, max_steps=8, batch_size=8, checkpoint_every=2), library)
    assert "--max-len" in raised.value.hint and "--resume" in raised.value.hint
    assert interrupted_run_progress(library, "tiny") == (4, 8)


def test_the_train_command_recovers_from_simulated_oom_and_exits_0(tiny_base, chat_jsonl, tmp_path):
    env = {**os.environ, "TAILOR_HOME": str(tmp_path / "lib"), "TAILOR_SIMULATE_OOM_AT": "2"}
    command = [sys.executable, "-m", "app.cli", "train", "--data", str(chat_jsonl), "--base", str(tiny_base),
               "--name", "oom", "--max-steps", "4", "--batch-size", "4", "--rank", "4", "--max-len", "64"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "out of memory at step 2" in finished.stdout.lower()
    manifest = Library(tmp_path / "lib").get("oom").manifest
    # The default (automatic) checkpointing was off for this small run; the recovery turned it on too.
    recovery = manifest["oom_recoveries"][0]
    assert manifest["steps"] == 4 and recovery["gradient_checkpointing"] and recovery["micro_batch_size"] == 2


def adalora_config(base: Path, data: Path, **training) -> RunConfig:
    config = tiny_config(base, data, **{"max_steps": 12, "checkpoint_every": 4, **training})
    return config.replace(lora=LoraSettings(method="adalora", init_r=8, target_r=4, alpha=8, dropout=0.0,
                                            tinit=0.2, tfinal=0.3))


def test_adalora_prunes_to_its_target_budget_and_publishes_a_plain_lora(tiny_base, chat_jsonl, tmp_path):
    import torch
    from peft import PeftModel

    from app.core.adalora import read_rank_allocation
    from app.core.models import load_model

    result = run_training(adalora_config(tiny_base, chat_jsonl), Library(tmp_path / "lib"))
    allocation = read_rank_allocation(result.adapter.path)
    assert allocation is not None and allocation.average_rank == pytest.approx(4, abs=0.5)
    assert max(allocation.final_ranks.values()) <= 8 and min(allocation.final_ranks.values()) < 8
    config = json.loads((result.adapter.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_model(tiny_base, "4bit", "cpu"), result.adapter.path)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_adalora_pause_and_resume_keep_the_budget_state(tiny_base, chat_jsonl, tmp_path):
    import torch

    config = adalora_config(tiny_base, chat_jsonl)
    straight = run_training(config, Library(tmp_path / "straight"))
    library = Library(tmp_path / "interrupted")
    control = TrainingControl()
    # Pause inside the pruning phase, where the importance averages decide what goes next.
    run_training(config, library, lambda e: isinstance(e, StepEvent) and e.step >= 5 and control.request_pause(),
                 control)
    assert 5 <= interrupted_run_progress(library, "tiny")[0] < 12
    resumed = run_training(config, library, resume=True)

    from app.core.adalora import read_rank_allocation

    assert read_rank_allocation(resumed.adapter.path).final_ranks == read_rank_allocation(straight.adapter.path).final_ranks
    expected, actual = _adapter_tensors(straight.adapter), _adapter_tensors(resumed.adapter)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_out_of_memory_inside_the_optimizer_update_goes_back_to_the_last_checkpoint(tiny_base, chat_jsonl, tmp_path,
                                                                                   monkeypatch):
    """An update that failed half-way may have moved some weights, so the run resumes from its last checkpoint."""
    import torch

    from app.core.training import RecoveryEvent

    real_step = torch.optim.AdamW.step
    calls = []

    def step_that_fails_once_at_the_sixth_update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_fails_once_at_the_sixth_update)
    events = []
    result = run_training(tiny_config(tiny_base, chat_jsonl, max_steps=8, checkpoint_every=4, batch_size=4),
                          Library(tmp_path / "lib"), events.append)
    recovery = next(e for e in events if isinstance(e, RecoveryEvent))
    assert recovery.step == 6 and "went back 1 step(s) to the last checkpoint" in recovery.message
    assert result.steps == 8 and [e["step"] for e in result.adapter.training_log()] == list(range(1, 9))
    assert result.adapter.manifest["oom_recoveries"][0]["lost_steps"] == 1


def test_auto_quant_is_decided_once_and_recorded_so_a_resumed_run_trains_the_same_base(tiny_base, chat_jsonl,
                                                                                        tmp_path):
    import dataclasses

    config = tiny_config(tiny_base, chat_jsonl, max_steps=4)
    config = config.replace(model=dataclasses.replace(config.model, quant="auto"))
    library = Library(tmp_path / "lib")
    control = TrainingControl()
    run_training(config, library, lambda e: isinstance(e, StepEvent) and control.request_pause(), control)
    from app.core.training import interrupted_run_config

    assert interrupted_run_config(library, "tiny").model.quant == "none", "the tiny model fits in 16 bits"
    resumed = run_training(config, library, resume=True)
    assert resumed.adapter.manifest["quant"] == "none"
    assert resumed.adapter.manifest["config"]["model"]["quant"] == "none"


def test_a_run_stopped_before_its_first_step_still_publishes(tiny_base, chat_jsonl, tmp_path):
    import dataclasses

    config = tiny_config(tiny_base, chat_jsonl, max_steps=4)
    config = config.replace(data=dataclasses.replace(config.data, eval_split=0.25))
    control = TrainingControl()
    control.request_stop()
    result = run_training(config, Library(tmp_path / "lib"), control=control)
    assert result.stopped_early and result.steps == 0 and result.adapter.training_log() == []
