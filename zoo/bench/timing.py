"""Timing and peak memory of one callable, on the CPU or a CUDA GPU.

- `time_runs(fn, device, repeats, inner)`: wall-clock seconds per call, `repeats` times (each the mean
  of `inner` back-to-back calls), with torch.cuda.synchronize around every timed stretch on a GPU.
- `measure_peak(fn, device)`: run fn once and return (its result, the peak extra memory it needed).
  CUDA: torch.cuda.max_memory_allocated over the call minus what was allocated before it. CPU: the
  peak resident set size during the call minus the RSS before it (Linux: the high-water mark is reset
  through /proc/self/clear_refs after glibc's malloc_trim returns free heap pages; elsewhere sampled
  every 5 ms). `memory_method(device)` says which, in words, for reports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from zoo.peak_memory import PeakMemory, current_rss_bytes

__all__ = ["measure_peak", "memory_method", "synchronize", "time_runs"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], device: torch.device, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call of fn: `repeats` measurements, each the mean over `inner` consecutive calls."""
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be >= 1, got {repeats}, {inner}")
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _glibc_malloc(libc) -> bool:
    return libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")


def _can_reset_high_water() -> bool:
    return os.path.exists(_CLEAR_REFS) and os.access(_CLEAR_REFS, os.W_OK) and os.path.exists(_STATUS)


def _high_water_rss() -> int | None:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def memory_method(device: torch.device) -> str:
    """How `measure_peak` measures on this device, in words."""
    if device.type == "cuda":
        return "CUDA: torch.cuda.max_memory_allocated during the call minus memory allocated before it"
    if _can_reset_high_water():
        return (
            "CPU: peak resident set size during the call minus RSS before it (VmHWM reset via "
            "/proc/self/clear_refs after malloc_trim; whole process, allocator slack included)"
        )
    return (
        "CPU: resident set size sampled every 5 ms during the call, peak minus RSS before it (whole process)"
    )


def measure_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Run fn once; return (its result, peak extra bytes during the call), see the module docstring."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    libc = _libc()
    if _glibc_malloc(libc):
        libc.malloc_trim(0)
    base = current_rss_bytes()
    if base is not None and _can_reset_high_water():
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        out = fn()
        peak = _high_water_rss()
        return out, None if peak is None else max(peak - base, 0)
    with PeakMemory(interval=0.005) as meter:
        out = fn()
    peak = meter.result()["peak_rss_bytes"]
    return out, None if peak is None or base is None else max(peak - base, 0)
