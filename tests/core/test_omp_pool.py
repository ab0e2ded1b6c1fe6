"""Releasing a thread's OpenMP helpers once its torch work is handed to another thread (app.core.omp_pool)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from app.core.omp_pool import _pause_function, release_idle_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and torch's libgomp")


def threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_the_runtime_released_is_the_one_torch_loaded():
    """sentencepiece bundles a libgomp of its own; pausing that one freed nothing torch uses."""
    import sentencepiece  # noqa: F401  (loads its own libgomp into the process, as transformers' tokenizers do)
    import torch

    pause = _pause_function()
    assert pause is not None
    torch_libgomp = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                         if "libgomp" in line and str(Path(torch.__file__).resolve().parent) in line)
    import ctypes

    assert ctypes.cast(pause, ctypes.c_void_p).value == ctypes.cast(
        ctypes.CDLL(torch_libgomp).omp_pause_resource_all, ctypes.c_void_p).value


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: OpenMP starts no helper threads")
def test_a_thread_that_hands_its_work_on_leaves_no_helper_threads_behind():
    import torch

    torch.set_num_threads(2)
    torch.randn(2_000_000).exp()  # a parallel region: this thread's pool gets its helper
    with_helpers = threads()
    assert release_idle_pool()
    assert threads() < with_helpers
    torch.randn(2_000_000).exp()  # the next parallel work simply builds a new pool
    assert threads() == with_helpers
