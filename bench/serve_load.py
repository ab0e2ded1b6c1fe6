"""`tailor serve` under load: N concurrent clients over a mix of personas on the real bundled SmolLM2-135M.

Each configuration is a fresh `tailor serve` process on 127.0.0.1 driven by the official `openai` client from N
threads, every client sending its share of the same request list (persona i % P, greedy, fixed max_tokens):
  (a) batched    — Tailor's serving: continuous batching, requests join the running mixed-persona batch between
                   decode steps and leave it when they end (app.core.running_batch)
  (b) one-by-one — the same server and engine, same requests, answered strictly one at a time (--max-batch 1): the
                   reference (its one-row decode loop runs as fast as `tailor chat`'s generate())
  (c) one persona — one persona loaded, the same number of requests one at a time: the memory reference
For each: requests/s, generated tokens/s, p50/p95 request latency, the server's peak RSS (VmHWM) while serving
(reset after start-up, whose conversion peaks are the same for every configuration), and rows per decode step.
64 requests by default, 16 per client: a run ends in a tail where the clients that are done leave the others
decoding in a thinner batch (with 4 requests per client, a quarter of the steps ran with 1 or 2 rows); more
requests per client measure 4 concurrent clients rather than their tail.
Goal: (a) ≥ 2x the tokens/s of (b) with 4 clients, at ≤ 1.2x the peak memory of (c).

The personas are random LoRA weights (rank 16 on every linear layer, like a default Tailor run): serving cost does
not depend on what the weights say.

    python bench/serve_load.py [--clients 4] [--requests 64] [--max-tokens 48] [--personas 4] [--quant 4bit|none]
                               [--threads N]

--threads sets OMP_NUM_THREADS for the servers (default: torch's choice). On a machine other jobs keep busy, torch's
threads wait for each other at every operation and everything runs several times slower; one thread measures the
engines rather than the contention.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the adapter factory the tests use

PROMPTS = ["What is the capital of France?", "Give me a tip for sleeping better.", "Why is the sky blue?",
           "Write one sentence about the sea.", "How do I boil an egg?", "Name three planets.",
           "What is a good name for a cat?", "Explain rain to a child."]
TOKENS_RATIO_GOAL, MEMORY_RATIO_GOAL = 2.0, 1.2
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Result:
    label: str
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]
    peak_rss_bytes: int
    largest_batch: int
    mean_batch: float
    """Rows per decode step: below the client count where requests wait on the HTTP round trip, or in the tail
    of a run, when some clients have sent all their requests."""
    joined_running: int
    cpu_seconds: float
    """The server's CPU time for the load: tokens per CPU second compare engines on a machine other jobs share,
    where wall time swings with their load."""

    def row(self) -> str:
        latencies = sorted(self.latencies)
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        return (f"| {self.label} | {self.requests / self.seconds:.2f} | {self.tokens / self.seconds:.1f} | "
                f"{self.tokens / self.cpu_seconds:.1f} | {statistics.median(latencies):.2f} | {p95:.2f} | "
                f"{self.peak_rss_bytes / 2**20:.0f} | {self.largest_batch} | {self.mean_batch:.2f} | {self.joined_running} |")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux), so the peak is that of serving, not of loading the model."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used (user + system), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(library: Path, adapters: str, max_batch: int, quant: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "--library", str(library), "serve", "--port", str(port),
                               "--adapters", adapters, "--quant", quant, "--max-batch", str(max_batch)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a machine other jobs keep busy can take minutes to load a model
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tailor serve exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("tailor serve did not start in 15 minutes")


def run_load(label: str, library: Path, personas: list[str], max_batch: int, clients: int, requests: int,
             max_tokens: int, quant: str, threads: int | None) -> Result:
    import httpx
    import openai

    server, url = start_server(library, ",".join(personas), max_batch, quant, threads)
    try:
        jobs = [(personas[index % len(personas)], PROMPTS[index % len(PROMPTS)]) for index in range(requests)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        client.chat.completions.create(model=personas[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0)  # warm-up, not timed
        reset_peak_rss(server.pid)
        latencies, tokens, lock = [], [0], threading.Lock()

        def client_loop(share: list[tuple[str, str]]) -> None:
            for persona, prompt in share:
                started = time.perf_counter()
                reply = client.chat.completions.create(model=persona, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=max_tokens, temperature=0)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens[0] += reply.usage.completion_tokens

        threads = [threading.Thread(target=client_loop, args=(jobs[index::clients],)) for index in range(clients)]
        cpu_started, started = cpu_seconds(server.pid), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds, cpu = time.perf_counter() - started, cpu_seconds(server.pid) - cpu_started
        health = httpx.get(url + "/health").json()
        return Result(label, requests, seconds, tokens[0], latencies, peak_rss(server.pid), health["largest_batch"],
                      health["mean_batch"], health["joined_running"], cpu)
    finally:
        server.terminate()
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per configuration, spread over the clients (few: the tail, where fewer clients "
                             "are left, weighs more)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--quant", choices=("4bit", "8bit", "none"), default="4bit", help="how the base is loaded")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the servers (default: torch's choice)")
    args = parser.parse_args()

    from adapter_factory import make_random_adapters

    from app.core.library import Library
    from app.core.models import quiet_transformers, resolve_base

    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="tailor-serve-bench-") as scratch:
        library = Library(Path(scratch) / "library")
        names = [f"persona{index}" for index in range(args.personas)]
        make_random_adapters(library, resolve_base("default").folder, names, rank=16, target_modules=LINEAR)
        results = [
            run_load(label, library.root, served, max_batch, args.clients, args.requests, args.max_tokens, args.quant,
                     args.threads)
            for label, served, max_batch in (("(a) batched, multi-persona", names, 8),
                                             ("(b) one at a time, multi-persona", names, 1),
                                             ("(c) one at a time, one persona", names[:1], 1))
        ]
    batched, one_by_one, single = results
    print(f"\nSmolLM2-135M-Instruct ({args.quant}) on CPU, {args.clients} concurrent clients, {args.requests} requests per row, "
          f"{args.personas} personas, greedy, max_tokens {args.max_tokens}, {os.cpu_count()} CPU cores, "
          f"{args.threads or 'default'} torch threads\n")
    print("| configuration | requests/s | generated tokens/s | tokens per server CPU s | p50 latency s | p95 latency s "
          "| peak RSS MiB | largest batch | rows per step | joined a running batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        print(result.row())
    tokens_ratio = (batched.tokens / batched.seconds) / (one_by_one.tokens / one_by_one.seconds)
    cpu_ratio = (batched.tokens / batched.cpu_seconds) / (one_by_one.tokens / one_by_one.cpu_seconds)
    memory_ratio = batched.peak_rss_bytes / single.peak_rss_bytes
    print(f"\ntokens/s, batched vs one at a time: {tokens_ratio:.2f}x (goal >= {TOKENS_RATIO_GOAL}x) "
          f"{'PASS' if tokens_ratio >= TOKENS_RATIO_GOAL else 'MISS'}")
    print(f"tokens per server CPU second, batched vs one at a time: {cpu_ratio:.2f}x (the same ratio, robust to "
          "other jobs' load)")
    print(f"peak memory, batched multi-persona vs one persona: {memory_ratio:.2f}x (goal <= {MEMORY_RATIO_GOAL}x) "
          f"{'PASS' if memory_ratio <= MEMORY_RATIO_GOAL else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
