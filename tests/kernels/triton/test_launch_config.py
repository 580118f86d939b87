"""The window hybrid's Triton launch settings: the defaults chosen by the H200 tuning run, the
`launch_config` override the tuner uses, and the tuner itself rehearsed on the CPU (Triton's
interpreter)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("triton")

from zoo.kernels.triton import tune  # noqa: E402
from zoo.kernels.triton.window_hybrid import (  # noqa: E402
    SINK_BACKWARDS,
    chosen_tile,
    feature_dtype,
    launch_config,
    launch_options,
    tile_rows,
    window_hybrid_triton,
)
from zoo.kernels.window_hybrid import window_hybrid_chunked  # noqa: E402

BIG = (128, 128, 256)  # Llama-3-8B heads with Hedgehog's 256 features


def test_defaults_follow_the_tuning_run():
    hopper, ampere = 232448, 166912  # shared memory per block, bytes
    assert tile_rows(*BIG, torch.bfloat16, hopper) == 64 and tile_rows(*BIG, torch.float16, hopper) == 64
    assert tile_rows(*BIG, torch.bfloat16, ampere) == 32 and tile_rows(*BIG, torch.bfloat16) == 32
    assert tile_rows(*BIG, torch.float32, hopper) == 16
    assert tile_rows(64, 64, 128, torch.float32, hopper) == 32
    assert launch_options(*BIG, torch.bfloat16, tile=64) == dict(num_warps=8, num_stages=1)
    assert launch_options(*BIG, torch.bfloat16, tile=32) == dict(num_warps=8, num_stages=2)
    assert launch_options(*BIG, torch.float32, tile=16) == dict(num_warps=8, num_stages=1)
    # fp32 features of 16-bit inputs are read in the inputs' dtype; fp32 inputs keep them
    assert feature_dtype(torch.bfloat16, torch.float32, torch.float32) == torch.bfloat16
    assert feature_dtype(torch.float32, torch.float32, torch.float16) == torch.float32


def test_launch_config_overrides_inside_the_block_and_restores():
    before = (chosen_tile(*BIG, torch.bfloat16), launch_options(*BIG, torch.bfloat16))
    with launch_config(tile=64, num_warps=4, bwd_num_stages=3, feature_dtype=torch.float32):
        assert chosen_tile(*BIG, torch.bfloat16) == 64
        assert launch_options(*BIG, torch.bfloat16) == dict(num_warps=4, num_stages=2)
        assert launch_options(*BIG, torch.bfloat16, backward=True) == dict(num_warps=4, num_stages=3)
        assert feature_dtype(torch.bfloat16, torch.float32, torch.float32) == torch.float32
        with launch_config(tile=16):  # nested: the inner block wins, the outer comes back
            assert chosen_tile(*BIG, torch.bfloat16) == 16
        assert chosen_tile(*BIG, torch.bfloat16) == 64
    assert (chosen_tile(*BIG, torch.bfloat16), launch_options(*BIG, torch.bfloat16)) == before
    with pytest.raises(RuntimeError), launch_config(tile=64):
        raise RuntimeError("a failed launch")
    assert chosen_tile(*BIG, torch.bfloat16) == before[0]


def test_launch_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="launch_config takes tile, num_warps.*got warps"):
        with launch_config(warps=4):
            pass


def _inputs(T, dtype, H=4, HKV=2, D=16, F=32):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(dtype) for h in (H, HKV, HKV))
    fq, fk = (torch.softmax(torch.randn(1, h, T, F, generator=g), -1) for h in (H, HKV))
    a = torch.sigmoid(torch.randn(H, generator=g))
    return q, k, v, fq, fk, a, 1 - a


def test_half_precision_default_launch_reads_features_in_half_and_matches_fp32():
    """fp16 inputs with fp32 features, no tile given: the default tile and the features read in fp16
    still give the fp32 PyTorch form's output, within fp16's precision."""
    q, k, v, fq, fk, a, b = _inputs(150, torch.float16)
    kw = dict(window=16, terraced=True, sinks=3)
    y, _ = window_hybrid_triton(q, k, v, fq, fk, a, b, **kw)
    rep = lambda x: x.float().repeat_interleave(2, 1)  # noqa: E731
    ref, _ = window_hybrid_chunked(q.float(), rep(k), rep(v), fq, rep(fk), a, b, **kw)
    assert y.dtype == torch.float16
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-3, err
    with launch_config(feature_dtype=torch.float32):  # the same call with fp32 features: closer
        y32, _ = window_hybrid_triton(q, k, v, fq, fk, a, b, **kw)
    assert (y32.float() - ref).abs().max() / ref.abs().max() <= err + 1e-4


@pytest.mark.parametrize("mode", SINK_BACKWARDS)
def test_every_sink_backward_gives_the_same_gradients(mode):
    """The sink columns' backward inside the kernel (the default) and in PyTorch give the same gradients."""
    q, k, v, fq, fk, a, b = _inputs(100, torch.float32)
    kw = dict(window=16, terraced=False, sinks=3, chunk_size=16)

    def grads():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, fq, fk)]
        y, _ = window_hybrid_triton(*leaves, a, b, **kw)
        y.pow(2).sum().backward()
        return [x.grad for x in leaves]

    want = grads()
    with launch_config(sink_backward=mode):
        got = grads()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sink_backward must be one of"), launch_config(sink_backward="fp64"):
        grads()


def test_parse_config_reads_the_text_form_and_says_what_is_wrong():
    assert tune.parse_config("32:8:2:bfloat16:128:32") == dict(
        tile=32, num_warps=8, num_stages=2, feature_dtype="bfloat16", state_chunk=128, state_tile=32
    )
    with pytest.raises(argparse.ArgumentTypeError, match="TILE:WARPS:STAGES:FEATURES.*got '32:8'"):
        tune.parse_config("32:8")
    with pytest.raises(argparse.ArgumentTypeError, match="features one of"):
        tune.parse_config("32:8:2:bf16")
    assert tune.parse_config("32:8:2:bfloat16:-:-:-:torch") == dict(
        tile=32, num_warps=8, num_stages=2, feature_dtype="bfloat16", sink_backward="torch"
    )
    with pytest.raises(argparse.ArgumentTypeError, match="sink backward one of"):
        tune.parse_config("32:8:2:bfloat16:-:-:-:tf16")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the dry run is the CPU rehearsal (Triton's interpreter)"
)
def test_tuner_dry_run_times_checks_and_reports_every_config(tmp_path):
    out = tmp_path / "tune"
    configs = ["32:4:1:float16:64:16", "16:4:1:float32:32"]
    assert (
        tune.main(
            ["--out", str(out), "--dry-run", "--seq-lens", "80", "--configs", *configs, "--repeats", "1"]
        )
        == 0
    )
    results = json.loads((out / "tune.json").read_text())
    rows = results["sweep"]
    assert [r["config"] for r in rows] == ["default", *map(tune.parse_config, configs)]
    for r in rows:  # every config timed, and checked against the fp32 PyTorch form
        assert r["fwd_s"] > 0 and r["train_s"] > 0, r
        assert max(r["errors"].values()) < 1e-3, r
    assert results["best"]["config"] in (rows[1]["config"], rows[2]["config"])
    assert set(results["mixer"]) == {"default@T=80", "best@T=80"}
    assert results["decode"]["step_s"] > 0 and results["profile"]["best"]
    table = (out / "tune.md").read_text()
    assert "| 80 | 32 | 4 | 1 | float16 | 64 | 16 | default | default |" in table
