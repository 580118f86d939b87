"""zoo.cpu_memory: glibc malloc keeps freed memory once zoo runs a CPU kernel, unless the user chose
otherwise; the effect is checked by page faults in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zoo import cpu_memory
from zoo.cli import main as cli_main

# In a fresh process: optionally one CPU kernel call through the dispatcher, then a 256 MiB tensor filled
# and freed four times; the fewest minor page faults among the last three fills say whether freed pages
# were kept. (One refill alone is not enough: where a small block lands above the freed one, glibc cannot
# serve the next 64-byte-aligned 256 MiB request from it and grows the heap once more, faulting it in.
# Measured: 2 runs in 6. The fill after that reuses the top of the heap.)
PROBE = """
import json, resource, sys, torch
from zoo import cpu_memory
from zoo.kernels import dispatch
if sys.argv[1] == "kernel":
    q = torch.randn(1, 2, 8, 4)
    dispatch.linear_attention(q, q, q, normalize=True)
def faults_of_a_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(64 << 20)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fill()
fewest = min(faults_of_a_fill() for _ in range(3))
print(json.dumps({"faults": fewest, "policy": cpu_memory.cpu_allocator_policy()}))
"""


def probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != cpu_memory.ENV_VAR} | env
    environ["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environ, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not cpu_memory.glibc_malloc_available(), reason="tunes glibc's malloc only")
def test_a_cpu_kernel_call_makes_freed_memory_reused():
    pages = (256 << 20) // 4096  # a fresh 256 MiB block faults in about this many pages
    untouched = probe("none")
    assert untouched["policy"].startswith("the system's (zoo has not run")
    assert untouched["faults"] > pages // 2  # glibc unmaps the freed block: faulted in again
    tuned = probe("kernel")
    assert "1 GiB" in tuned["policy"]
    assert tuned["faults"] < pages // 20  # the freed block was kept and reused
    system = probe("kernel", ZOO_CPU_ALLOCATOR="system")
    assert system["policy"] == "the system's (ZOO_CPU_ALLOCATOR=system): unchanged"
    assert system["faults"] > pages // 2


# In a fresh process: optionally one CPU kernel call, then two 600 MiB blocks malloc'd (never touched, so
# nothing is faulted in) and freed; how far the program break came down says what glibc gave back.
TRIM_PROBE = """
import ctypes, sys, torch
from zoo.kernels import dispatch
if sys.argv[1] == "kernel":
    q = torch.randn(1, 2, 8, 4)
    dispatch.linear_attention(q, q, q, normalize=True)
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 30)  # as zoo's policy: blocks under 1 GiB come from the heap, so both do
blocks = [libc.malloc(600 << 20) for _ in range(2)]
high = libc.sbrk(0)
for block in reversed(blocks):
    libc.free(block)
kept = libc.sbrk(0)
from zoo.cpu_memory import release_free_memory
released = release_free_memory()
print((high - kept) >> 20, (high - libc.sbrk(0)) >> 20, released)
"""


@pytest.mark.skipif(not cpu_memory.glibc_malloc_available(), reason="tunes glibc's malloc only")
def test_more_than_a_gib_freed_at_the_heaps_top_is_kept_too():
    """1.2 GiB freed at the top of the heap stays in the process (trimming at 1 GiB, as before, gave it back
    after every forward + backward whose temporaries passed that); glibc's default trimming gives it back."""

    def given_back_mib(mode: str) -> tuple[int, int]:
        """MiB given back on the free, and after `release_free_memory` too."""
        environ = {k: v for k, v in os.environ.items() if k != cpu_memory.ENV_VAR}
        run = subprocess.run(
            [sys.executable, "-c", TRIM_PROBE, mode], capture_output=True, text=True, env=environ, check=True
        )
        on_free, after_release, released = run.stdout.strip().splitlines()[-1].split()
        assert released == "True"
        return int(on_free), int(after_release)

    assert given_back_mib("none")[0] >= 1000
    kept, released = given_back_mib("kernel")
    assert kept == 0 and released >= 1000  # kept on the free; given back when asked


@pytest.mark.parametrize(
    "environ, reason",
    [
        ({}, None),
        ({"ZOO_CPU_ALLOCATOR": "reuse"}, None),
        ({"ZOO_CPU_ALLOCATOR": "system"}, "the system's (ZOO_CPU_ALLOCATOR=system)"),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "the user's (MALLOC_TRIM_THRESHOLD_ set)"),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}, "the user's (GLIBC_TUNABLES set)"),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "jemalloc (LD_PRELOAD)"),
        ({"LD_PRELOAD": "/usr/lib/libfoo.so"}, None),
    ],
)
def test_the_allocator_is_left_alone_where_the_user_chose(environ, reason):
    assert cpu_memory.reason_to_leave_alone(environ) == reason


def test_a_bad_policy_is_a_one_line_error_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setenv(cpu_memory.ENV_VAR, "fast")
    with pytest.raises(
        ValueError, match="ZOO_CPU_ALLOCATOR='fast' is not a CPU allocator policy; choose one of"
    ):
        cpu_memory.requested_policy()
    assert cli_main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reuse, system" in err
    with pytest.raises(ValueError, match="policy 'fast' is unknown"):
        cpu_memory.ensure_cpu_allocator("fast")
