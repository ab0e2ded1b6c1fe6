"""Handing torch's CPU work from one thread to another without slowing it down.

torch's CPU operators run their parallel parts on OpenMP, and GNU OpenMP (libgomp, which torch's Linux wheels
bundle) keeps a pool of helper threads per thread that has started parallel work. Those helpers spin for a while
after each parallel region, so the next region starts at once; but when the process holds more OpenMP threads than
there are CPUs, libgomp cuts the spinning to almost nothing and every region waits for sleeping helpers to wake.

Tailor loads a model in one thread and generates in another (`tailor chat`'s reply thread, the server's decode
loop, the app's chat worker). The loading thread's pool stays behind, idle but counted: on a 2-core CPU a decode
step of SmolLM2-135M then took 109 ms in the generating thread against 66 ms in the loading thread, and a single
576 x 1536 matrix-vector product 188 us against 71 us. `release_idle_pool()`, called by a thread when its torch
work is done, frees that thread's helpers (OpenMP 5's omp_pause_resource_all, which libgomp applies to the calling
thread's pool), and the generating thread runs at full speed again (61 us). A later parallel region in the same
thread simply builds a new pool.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2
"""omp_pause_resource_kind: release the threads (omp_pause_soft may keep them)."""
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.lru_cache(maxsize=1)
def _pause_function():
    """omp_pause_resource_all from the OpenMP runtime torch loaded, or None where it cannot be found."""
    import torch

    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.exists():
        return None
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if any(name in line for name in _RUNTIMES)}
    # Other wheels bundle their own copy (sentencepiece does); only the one torch loaded from its folder runs its work.
    torch_folder = str(Path(torch.__file__).resolve().parent)
    for path in sorted(paths, key=lambda path: not path.startswith(torch_folder)):
        try:
            function = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    return None


def release_idle_pool() -> bool:
    """Free the calling thread's OpenMP helper threads, so the thread that works next has the CPUs to itself.
    Returns whether the runtime did so (False: not found, or not supported here; nothing else changes)."""
    function = _pause_function()
    if function is None:
        return False
    released = function(OMP_PAUSE_HARD) == 0
    if not released:
        log.debug("The OpenMP runtime did not release its threads.")
    return released


def hands_the_cpus_back(method):
    """Decorator for a method that does torch work in its caller's thread before another thread generates: the
    caller's OpenMP helpers are released when it returns (or fails)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        finally:
            release_idle_pool()

    return run
