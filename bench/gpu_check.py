"""One command that checks Tailor's whole GPU path on a CUDA machine, in a few minutes.

    python bench/gpu_check.py [--steps 40] [--keep DIR]

What it does, each through the same public API the app and the CLI use:
 1. precision: the compute dtype Tailor picks for this GPU (bf16 from compute capability 8.0, else fp16 + scaler);
 2. a real CUDA out-of-memory error is recognised as out of memory (app.core.precision.is_out_of_memory);
 3. trains the bundled SmolLM2-135M in 4-bit NF4 through `run_training`, pauses part-way
    (TrainingControl.request_pause), resumes (`run_training(..., resume=True)`) and finishes; the loss must fall;
 4. peak VRAM of that training (torch.cuda.max_memory_allocated) against `tailor estimate` for the same settings
    (without the CUDA context, which max_memory_allocated never sees): the estimate must not be below the peak;
 5. trains a second persona, then switches between the two and the base in one chat session (app/core/chat.py);
 6. exports the persona merged and as a GGUF LoRA (app/core/export.py);
 7. reads the NVML gauges of the GPU torch trains on, matched by UUID / PCI bus id.
It prints one table and exits 1 if any check failed. Without CUDA it prints "skipped: no CUDA" and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BATCH, MAX_LEN, RANK = 4, 512, 16
PAUSE_AT = 15
PROMPT = [{"role": "user", "content": "Who are you, and what do you do all day?"}]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


class GpuCheck:
    def __init__(self, steps: int, workdir: Path):
        from app.core.library import Library

        self.steps = steps
        self.workdir = workdir
        self.library = Library(workdir / "library")
        self.results: list[Check] = []

    def run(self, name: str, check) -> bool:
        started = time.monotonic()
        try:
            ok, detail = check()
        except Exception as exc:  # a check that crashes is a failed check; the table still comes out
            ok, detail = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.results.append(Check(name, ok, detail, time.monotonic() - started))
        return ok

    # 1-2

    def precision(self):
        import torch

        from app.core.precision import compute_dtype

        capability = torch.cuda.get_device_capability()
        chosen = compute_dtype("cuda")
        expected = torch.bfloat16 if capability >= (8, 0) else torch.float16
        return chosen.dtype == expected and chosen.needs_grad_scaler == (expected == torch.float16), (
            f"{torch.cuda.get_device_name()} CC {capability[0]}.{capability[1]}: {chosen.reason}")

    def out_of_memory(self):
        import torch

        from app.core.precision import is_out_of_memory

        try:
            torch.empty(2**50, dtype=torch.uint8, device="cuda")  # a petabyte
        except Exception as exc:
            torch.cuda.empty_cache()
            return is_out_of_memory(exc), f"{type(exc).__name__}: {str(exc)[:70]}"
        return False, "allocating a petabyte did not fail"

    # 3-4

    def config(self, name: str, dataset: Path, steps: int):
        from app.core.config import DataSettings, LoraSettings, RunConfig, TrainingSettings

        return RunConfig(name=name, system_prompt=f"You are {name}.",
                         data=DataSettings(path=str(dataset), max_len=MAX_LEN),
                         lora=LoraSettings(rank=RANK, alpha=2 * RANK),
                         training=TrainingSettings(max_steps=steps, batch_size=BATCH, checkpoint_every=10,
                                                   learning_rate=5e-4))

    def train_pause_resume(self, dataset: Path):
        import torch

        from app.core.training import StepEvent, TrainingControl, run_training

        config = self.config("pirate", dataset, self.steps)
        control = TrainingControl()
        losses: dict[int, float] = {}

        def sink(event) -> None:
            if isinstance(event, StepEvent):
                losses[event.step] = event.loss
                if event.step >= PAUSE_AT:
                    control.request_pause()

        torch.cuda.reset_peak_memory_stats()
        first = run_training(config, self.library, sink, control)
        self.peak_vram = torch.cuda.max_memory_allocated()
        if not first.paused:
            return False, f"pause was not honoured (ended at step {first.steps})"
        torch.cuda.reset_peak_memory_stats()
        second = run_training(config, self.library, sink, resume=True)
        self.peak_vram = max(self.peak_vram, torch.cuda.max_memory_allocated())
        losses = [row["loss"] for row in second.adapter.training_log() if row.get("loss") is not None]
        early, late = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
        ok = second.steps == self.steps and not second.paused and late < 0.8 * early
        return ok, (f"paused at step {first.steps}, resumed to {second.steps}/{second.total_steps}; "
                    f"loss {early:.2f} -> {late:.2f}")

    def vram_vs_estimate(self, dataset: Path):
        from app.core.catalogue import DEFAULT_KEY, find_entry
        from app.core.estimate import GB, estimate_training_memory
        from estimate_vs_rss import trained_share

        estimate = estimate_training_memory(find_entry(DEFAULT_KEY).shape, quant="4bit", rank=RANK, max_len=MAX_LEN,
                                            batch_size=BATCH, gradient_checkpointing=True, device="cuda",
                                            trained_share=trained_share(dataset, MAX_LEN))
        predicted = estimate.total - estimate.runtime  # max_memory_allocated never sees the CUDA context
        ratio = predicted / self.peak_vram
        return 1.0 <= ratio <= 2.0, (f"peak {self.peak_vram / GB:.2f} GB, estimate {predicted / GB:.2f} GB "
                                     f"(+{estimate.runtime / GB:.1f} context), estimate/peak {ratio:.2f}")

    # 5-6

    def chat_personas(self, dataset: Path):
        from app.core.chat import BASE, ChatSession, GenerationSettings
        from app.core.training import run_training

        run_training(self.config("butler", REPO / "resources" / "datasets" / "butler.jsonl", 30), self.library)
        session = ChatSession(base="default", quant="4bit", device="cuda")
        settings = GenerationSettings(max_new_tokens=24)
        choices = [session.load_adapter(self.library.get(name)) for name in ("pirate", "butler")]
        replies = {}
        for choice in [*choices, BASE, choices[0]]:
            messages = session.prompt_messages(PROMPT, session.system_prompt(choice))
            replies.setdefault(choice, []).append(session.reply(messages, choice, settings))
        repeatable = replies[choices[0]][0] == replies[choices[0]][1]
        distinct = len({replies[choice][0] for choice in replies}) == 3
        return repeatable and distinct, (f"3 personas, distinct replies: {distinct}, same reply after switching "
                                         f"back: {repeatable}; pirate: {replies[choices[0]][0][:40]!r}")

    def export(self):
        from app.core.export import export_adapter

        merged = export_adapter(self.library, "pirate", "merged", self.workdir / "pirate-merged")
        gguf = export_adapter(self.library, "pirate", "gguf", self.workdir / "pirate-lora.gguf")
        weights = sum(path.stat().st_size for path in merged.glob("*.safetensors"))
        ok = (merged / "config.json").is_file() and weights > 100 * 2**20 and gguf.stat().st_size > 2**20
        return ok, f"merged {weights / 2**20:.0f} MB safetensors, GGUF LoRA {gguf.stat().st_size / 2**20:.1f} MB"

    # 7

    def nvml(self):
        import torch

        from app.core.gpu import GpuMonitor, torch_device_identity

        monitor = GpuMonitor()
        try:
            monitor.set_training_device(torch_device_identity())
            gpu = monitor.snapshot().training_gpu
        finally:
            monitor.shutdown()
        if gpu is None or not gpu.trains_here:
            return False, "NVML found no GPU matching torch's device"
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        ok = abs(gpu.memory_total - total) <= 0.02 * total
        return ok, (f"NVML GPU {gpu.index} {gpu.name}: {gpu.memory_used / 2**30:.1f}/{gpu.memory_total / 2**30:.1f} "
                    f"GB, {gpu.utilization_percent}% busy, {gpu.temperature_c} °C, {gpu.power_w} W")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the main training (default 40)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__} sees no NVIDIA GPU); nothing was checked")
        return 0

    from estimate_vs_rss import long_reply_dataset

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        check = GpuCheck(args.steps, workdir)
        dataset = long_reply_dataset(workdir / "long-replies.jsonl", rows=64)
        check.run("precision", check.precision)
        check.run("out-of-memory recognised", check.out_of_memory)
        if check.run("4-bit training, pause, resume", lambda: check.train_pause_resume(dataset)):
            check.run("peak VRAM vs estimate", lambda: check.vram_vs_estimate(dataset))
            check.run("chat: switch personas", lambda: check.chat_personas(dataset))
            check.run("export merged + GGUF", check.export)
        check.run("NVML gauges", check.nvml)

    width = max(len(result.name) for result in check.results)
    print(f"\nTailor GPU check, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.monotonic() - started:.0f} s in all")
    print(f"{'check':<{width}}  {'result':<6}  {'s':>5}  detail")
    for result in check.results:
        print(f"{result.name:<{width}}  {'ok' if result.ok else 'FAIL':<6}  {result.seconds:>5.1f}  {result.detail}")
    failed = [result.name for result in check.results if not result.ok]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
