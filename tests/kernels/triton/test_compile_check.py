"""The window hybrid's kernels compile for an H100 (sm_90) and fit its shared memory, with no GPU:
the interpreter tests check the arithmetic, this checks that the compiled language accepts the
kernels at the sizes of Llama-3-8B heads (D = 128, Hedgehog F = 256, bf16), without and with attention
sinks and grouped-query heads (4 query heads per key/value head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("sinks, groups", [(0, 1), (4, 4)], ids=["plain", "sinks-gqa"])
def test_kernels_compile_for_sm90(sinks, groups):
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # a fresh process, compiled kernels
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoo.kernels.triton.compile_check",
            "--arch",
            "90",
            "--sinks",
            str(sinks),
            "--groups",
            str(groups),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["shared"]) == {
        "fwd",
        "bwd_dq",
        "bwd_dkv",
        "chunk_states",
        "chunk_states_reverse",
        "step",
    }
    assert max(report["shared"].values()) <= report["shared_limit"]
