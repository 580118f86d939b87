"""Decode cost and state bytes, their extrapolation, peak memory, and switching a hybrid's branch."""

from __future__ import annotations

import pytest
import torch
from zoo_testing import tiny_model

import zoo
from zoo.convert import branch, hybrid_mixers
from zoo.decode_cost import extrapolate_state_bytes, measure_decode


@pytest.mark.parametrize(
    "points, expected",
    [
        ({512: 100, 1024: 100, 2048: 100}, (100, "constant")),
        ({512: 512, 1024: 1024}, (32768, "linear")),  # proportional: a KV cache
        ({512: 612, 1024: 1124, 2048: 2148}, (32868, "linear")),  # on one line: KV layers and fixed states
        ({512: 612, 1024: 1124}, (None, "irregular")),  # two points off the origin prove no line
        ({32: 40, 64: 72, 128: 72}, (None, "irregular")),  # a window still filling
        ({512: 100}, (None, "irregular")),
    ],
)
def test_extrapolation_only_where_the_shape_is_proven(points, expected):
    assert extrapolate_state_bytes(points, 32768) == expected


@pytest.mark.parametrize(
    "parts, expected",
    [
        ({512: (100, 512), 1024: (100, 1024)}, (32868, "linear")),  # fixed states + a KV cache, two points
        ({512: (90, 512), 1024: (100, 1024)}, (None, "irregular")),  # a mixer state still growing
        ({512: (100, 500), 1024: (100, 1024)}, (None, "irregular")),  # keys and values not proportional
        ({512: (100, 512)}, (None, "irregular")),
    ],
)
def test_two_points_prove_a_line_only_by_their_parts(parts, expected):
    """Totals alone at two contexts prove no line; measured apart, a constant mixer state and a key/value
    cache proportional to the context do."""
    totals = {c: sum(p) for c, p in parts.items()}
    assert extrapolate_state_bytes(totals, 32768, parts) == expected


def test_decode_cost_of_a_teacher_and_of_a_linear_mixer():
    teacher = tiny_model("llama")
    t = measure_decode(teacher, [24, 48], steps=3)
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 KV heads, head dim 16, fp32
    assert t["contexts"]["48"]["state_bytes"] == 48 * per_token and t["state_growth"] == "linear"
    assert t["state_bytes_extrapolated"] == {"8192": 8192 * per_token, "32768": 32768 * per_token}
    assert t["contexts"]["24"]["decode_tokens_per_s"] > 0 and t["steps"] == 3
    linear = zoo.linearize(tiny_model("llama"), "hedgehog")
    h = measure_decode(linear, [24, 48], steps=3)
    assert h["state_growth"] == "constant"
    held = h["contexts"]["24"]["state_bytes"]
    assert held == h["contexts"]["48"]["state_bytes"] == h["state_bytes_extrapolated"]["32768"]
    assert h["state_bytes_extrapolated"]["8192"] == held
    assert 0 < held < t["contexts"]["24"]["state_bytes"] * 4


def test_decode_cost_of_a_model_with_a_softmax_layer_left():
    """One layer converted, one kept as softmax attention: the state at 8k is the mixer's bytes plus the
    kept layer's keys and values for 8k tokens, proven from two contexts by the parts."""
    model = zoo.linearize(tiny_model("llama"), "hedgehog", layers=[1])
    d = measure_decode(model, [24, 48], steps=3)
    per_token = 2 * 1 * 2 * 16 * 4  # keys and values, 1 layer, 2 KV heads, head dim 16, fp32
    at_24, at_48 = d["contexts"]["24"], d["contexts"]["48"]
    assert at_24["kv_cache_bytes"] == 24 * per_token and at_48["kv_cache_bytes"] == 48 * per_token
    held = at_48["mixer_state_bytes"]
    assert held == at_24["mixer_state_bytes"] > 0
    assert d["state_growth"] == "linear"
    expected = {str(n): held + n * per_token for n in (8192, 32768)}
    assert d["state_bytes_extrapolated"] == expected


def test_a_cache_nothing_wrote_to_is_an_error_not_zero_bytes(monkeypatch):
    """A model that drops the cache argument (as zoo's wrapper did when transformers renamed it)
    must not be measured as holding 0 bytes at decode speeds of a stateless model."""
    from transformers import DynamicCache

    from zoo.cache import CACHE_ARG

    teacher = tiny_model("llama")
    original = teacher.forward

    def forward_losing_the_cache(*args, **kwargs):
        out = original(*args, **kwargs)
        setattr(out, CACHE_ARG, DynamicCache())  # what a layer that never saw the cache leaves
        return out

    monkeypatch.setattr(teacher, "forward", forward_losing_the_cache)
    with pytest.raises(RuntimeError, match="holds no state"):
        measure_decode(teacher, [24, 48], steps=3)
    with pytest.raises(ValueError, match="grow by more than steps"):
        measure_decode(teacher, [24, 26], steps=3)


def test_peak_memory_keeps_the_highest_sample_inside_the_block(monkeypatch):
    """The sampler's logic, on a fake RSS: the peak inside the block, not the level before or after."""
    import time

    import zoo.peak_memory as pm

    level = {"rss": 100}
    monkeypatch.setattr(pm, "current_rss_bytes", lambda: level["rss"])
    meter = pm.PeakMemory(interval=0.005)
    with meter:
        level["rss"] = 900
        time.sleep(0.05)
        level["rss"] = 300
        time.sleep(0.05)
    level["rss"] = 7_000
    assert meter.result() == {"peak_rss_bytes": 900, "rss_method": "sampled", "peak_cuda_bytes": None}
    monkeypatch.setattr(pm, "current_rss_bytes", lambda: None)  # no /proc: the rusage high-water mark
    with pm.PeakMemory() as fallback:
        pass
    assert (
        fallback.result()["rss_method"] == "rusage-high-water" and fallback.result()["peak_rss_bytes"] > 2**20
    )


def test_peak_memory_sees_a_real_allocation_in_a_fresh_process():
    """In a fresh process (a long-lived one may reuse freed memory without growing), 256 MiB allocated, held
    for five sampling intervals and freed inside the block raise the peak by about that much. (Held: the
    meter samples every 20 ms, so a block freed right after its fill can be seen part-filled; that failed
    once in CI at 193 MiB.)"""
    import subprocess
    import sys

    code = (
        "import time, torch; from zoo.peak_memory import PeakMemory\n"
        "with PeakMemory() as idle: pass\n"
        "with PeakMemory() as busy:\n    block = torch.ones(64 * 2**20); time.sleep(0.1); del block\n"
        "print(busy.result()['peak_rss_bytes'] - idle.result()['peak_rss_bytes'])"
    )
    grown = int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 200 * 2**20 < grown < 400 * 2**20


def test_branch_switches_every_hybrid_and_restores_it():
    model = zoo.linearize(tiny_model("llama"), "lolcats", window=4)
    ids = torch.randint(0, 128, (1, 24))
    both = model(input_ids=ids).logits
    with branch(model, "window"):
        assert {m.branch for m in hybrid_mixers(model)} == {"window"}
        window = model(input_ids=ids).logits
    assert {m.branch for m in hybrid_mixers(model)} == {"both"}
    assert not torch.allclose(both, window) and torch.equal(model(input_ids=ids).logits, both)
    with (
        pytest.raises(ValueError, match="no hybrid mixer"),
        branch(zoo.linearize(tiny_model("llama"), "hedgehog"), "window"),
    ):
        pass
