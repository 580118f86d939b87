"""Peak memory of a stretch of work (a training stage, an evaluation).

On the CPU, `resource.getrusage` gives only the process's all-time high-water mark, which never goes
down, so a later stage could not be told apart from an earlier, hungrier one. `PeakMemory` instead
samples the process's *current* resident set size (`/proc/self/statm`) every `interval` seconds in a
background thread and keeps the largest value seen inside the `with` block. It is process-wide: the
model's weights, the data and anything else resident count too. Where `/proc` is missing it falls
back to the rusage high-water mark (and says so in ``rss_method``).

On a GPU it also reports `torch.cuda.max_memory_allocated` over the block (the peak statistics are
reset on entry)::

    with PeakMemory() as peak:
        train(...)
    peak.result()   # {"peak_rss_bytes": ..., "rss_method": "sampled", "peak_cuda_bytes": None}
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

__all__ = ["PeakMemory", "current_rss_bytes"]

_STATM = "/proc/self/statm"


def current_rss_bytes() -> int | None:
    """The process's resident set size now (None where /proc is not available)."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rusage_high_water_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager: the peak resident memory (and CUDA memory) while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss: int | None = None
        self.peak_cuda: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = current_rss_bytes() is not None

    def _sample(self) -> None:
        while True:
            rss = current_rss_bytes()
            if rss is not None:
                self.peak_rss = max(self.peak_rss or 0, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if self._sampled:
            self._thread = threading.Thread(target=self._sample, name="zoo-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = current_rss_bytes()  # the block's last moment, in case it was shorter than one interval
            if rss is not None:
                self.peak_rss = max(self.peak_rss or 0, rss)
        else:
            self.peak_rss = _rusage_high_water_bytes()
        if torch.cuda.is_available():
            self.peak_cuda = int(torch.cuda.max_memory_allocated())

    def result(self) -> dict:
        return {
            "peak_rss_bytes": self.peak_rss,
            "rss_method": "sampled" if self._sampled else "rusage-high-water",
            "peak_cuda_bytes": self.peak_cuda,
        }
