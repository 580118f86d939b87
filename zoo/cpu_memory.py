"""How the CPU allocator treats the large blocks zoo's chunked kernels free and take again.

glibc's malloc serves every block over 32 MiB with a fresh mmap and unmaps it when freed, so each large
temporary (a [T, H * F] gate or feature tensor: 134 MB at T = 4096 for an 8B layer) is faulted in page
by page on every call. On a VM those faults can cost more than the kernel's arithmetic (measured:
docs/kernels.md, "The CPU allocator").

`ensure_cpu_allocator()` therefore sets glibc's mmap threshold to 1 GiB and turns its trimming off, once
per process, the first time zoo's kernel dispatcher runs an operation on the CPU (and when `zoo bench
speed` starts, so SDPA is measured under the same allocator). Blocks under 1 GiB then come from the heap
and stay in the process after they are freed, for the next call to reuse: the process keeps its high-water
mark, as PyTorch's CUDA caching allocator does. (Trimming at 1 GiB, as before, gave back the top of the
heap after every forward + backward whose temporaries passed that: measured at the 8B layer shape and
T = 8192, `delta` faulted some 2 GB back in on each call, a third of its time; docs/kernels.md.) It leaves
the allocator alone:

- where ZOO_CPU_ALLOCATOR=system;
- where the user already tuned malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
  or glibc.malloc tunables in GLIBC_TUNABLES);
- where another allocator is preloaded (jemalloc, tcmalloc, mimalloc in LD_PRELOAD);
- where the C library is not glibc.

`cpu_allocator_policy()` says in words which of these holds (the bench reports record it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = [
    "ENV_VAR",
    "POLICIES",
    "cpu_allocator_policy",
    "ensure_cpu_allocator",
    "glibc_malloc_available",
    "keep_freed_memory",
    "release_free_memory",
    "reason_to_leave_alone",
    "requested_policy",
]

ENV_VAR = "ZOO_CPU_ALLOCATOR"
POLICIES = ("reuse", "system")
#: blocks below it come from the heap (M_MMAP_THRESHOLD)
THRESHOLD_BYTES = 1 << 30
#: M_TRIM_THRESHOLD -1: the free space at the heap's top is never given back
NEVER_TRIM = -1
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_applied: str | None = None  # the description, once this process's allocator was set (or left alone)


def requested_policy() -> str:
    """ZOO_CPU_ALLOCATOR: reuse (the default) or system; anything else is an error saying what is allowed."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or "reuse"
    if name not in POLICIES:
        raise ValueError(
            f"{ENV_VAR}={name!r} is not a CPU allocator policy; choose one of {', '.join(POLICIES)}"
        )
    return name


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return (
        libc
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")
        else None
    )


def glibc_malloc_available() -> bool:
    """Is the C library glibc, whose malloc `keep_freed_memory` tunes?"""
    return _glibc() is not None


def reason_to_leave_alone(environ=None) -> str | None:
    """Why the allocator must not be changed in this process (in words), or None."""
    environ = os.environ if environ is None else environ
    if (environ.get(ENV_VAR, "").strip().lower() or "reuse") == "system":
        return f"the system's ({ENV_VAR}=system)"
    tuned = [name for name in _USER_MALLOC_ENV if name in environ]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"the user's ({', '.join(tuned)} set)"
    preload = environ.get("LD_PRELOAD", "").lower()
    other = [name for name in _OTHER_ALLOCATORS if name in preload]
    if other:
        return f"{other[0]} (LD_PRELOAD)"
    return None


def keep_freed_memory() -> str | None:
    """Set glibc malloc's mmap threshold to THRESHOLD_BYTES and turn its trimming off (process-wide); the
    description, or None where the C library is not glibc or refused."""
    libc = _glibc()
    if libc is None:
        return None
    if not (libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, NEVER_TRIM)):
        return None
    return "glibc malloc: M_MMAP_THRESHOLD 1 GiB, no trimming (freed memory kept for reuse)"


def ensure_cpu_allocator(policy: str | None = None) -> str:
    """Apply a policy once per process (see the module docstring): `policy` (reuse or system) if given,
    else ZOO_CPU_ALLOCATOR's. Returns the description of what holds; later calls change nothing."""
    global _applied
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"CPU allocator policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    if _applied is None:
        if policy == "system":
            why_not = "the system's (asked for)"
        else:
            requested_policy()  # a bad ZOO_CPU_ALLOCATOR is an error, before anything is changed
            why_not = reason_to_leave_alone()
        if why_not is not None:
            _applied = f"{why_not}: unchanged"
        else:
            _applied = keep_freed_memory() or "the system's (not glibc malloc): unchanged"
    return _applied


def cpu_allocator_policy() -> str:
    """What holds in this process: the applied policy, or that zoo has not changed the allocator yet."""
    return _applied if _applied is not None else "the system's (zoo has not run a CPU kernel yet)"


def release_free_memory() -> bool:
    """Give the heap's free memory back to the system now (glibc malloc_trim), so that what one workload
    left behind does not sit idle under the next; True where glibc did so. The policy above stays."""
    libc = _glibc()
    return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))
