"""`zoo plan`: store size, memory per block, GPUs and time for block-wise linearization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from zoo_testing import tiny_config

from zoo.cli import main
from zoo.recipe import load_recipe
from zoo.scale.model_costs import PRESETS, activation_bytes_per_token, load_config
from zoo.scale.plan import PlanInputs, make_plan

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def plan(model="Llama-3.1-405B", k=9, **changes):
    return make_plan(
        PlanInputs(
            **({"model": model, "block_size": k, "tokens": 50_000_000, "activations": False} | changes)
        )
    )


def test_store_size_reproduces_the_lolcats_blog_for_405b(capsys):
    """The blog: 2 bytes x 126 layers x 50M tokens x 16384 = about 200 TB per layer stored; about
    22 TB with blocks of 9 (the 14 block inputs only)."""
    assert plan(k=1)["store_bytes"] == 2 * 126 * 50_000_000 * 16384  # 206.4e12
    assert plan(k=9)["store_bytes"] == 2 * 14 * 50_000_000 * 16384  # 22.9e12
    for k, shown in ((1, "= 206.4 TB"), (9, "= 22.9 TB")):
        assert (
            main(["plan", "Llama-3.1-405B", "--block-size", str(k), "--tokens", "50M", "--no-activations"])
            == 0
        )
        out = capsys.readouterr().out
        assert shown in out and "ASSUMED" in out and "GPUs in parallel" in out


def test_memory_gpus_and_time_for_405b_blocks_of_9():
    p = plan(k=9)
    assert p["blocks"] == p["gpus"] == 14 and p["nodes"] == 2
    assert p["parameters_per_layer"] == 3_187_703_808  # q, k, v, o, gate, up, down, 2 norms of one layer
    assert p["memory_per_block"]["teacher_weights"] == 9 * 3_187_703_808 * 2
    assert p["fits"] and p["gpu"] == "H100-80GB"
    # stage 1 per block: 9 layers x 50M tokens x FLOPs per token and layer, at 40% of 989 TFLOP/s
    assert p["seconds_stage1_per_block"] == pytest.approx(
        50e6 * 9 * p["flops_per_token_layer_stage1"] / (989e12 * 0.4)
    )
    assert 2 * 3.18e9 < p["flops_per_token_layer_stage1"] < 3 * 3.19e9
    measured = plan(k=9, tflops=300.0)
    assert measured["seconds_stage1_per_block"] == pytest.approx(
        p["seconds_stage1_per_block"] * 989 * 0.4 / 300
    )


def test_a_block_too_big_for_the_gpu_is_flagged():
    p = plan(k=126, gpu="A100-40GB")
    assert not p["fits"]
    assert 1 <= p["largest_block_that_fits"] < 126
    smaller = plan(k=p["largest_block_that_fits"], gpu="A100-40GB")
    assert smaller["fits"]


def test_presets_match_the_published_model_sizes():
    billions = {"Llama-3-8B": 8.03, "Llama-3.1-70B": 70.55, "Llama-3.1-405B": 405.85, "Mistral-7B": 7.24}
    for name in PRESETS:
        assert plan(name, k=1)["parameters"] / 1e9 == pytest.approx(billions[name], abs=0.01), name


def test_activation_memory_is_measured_for_a_local_config(tmp_path, capsys):
    tiny_config("llama", num_hidden_layers=4).save_pretrained(tmp_path)
    p = plan(
        str(tmp_path / "config.json"), k=2, tokens=10_000, seq_len=64, activations=True, mixer="hedgehog"
    )
    assert p["layers"] == 4 and p["blocks"] == 2 and p["activation_probe_tokens"] == 64
    per_token = p["activation_bytes_per_token_layer"]
    assert per_token > 64 * 2  # at least one hidden-size vector in bf16 is kept per token
    # a linear mixer keeps the same bytes per token whatever the length: the scaling to seq_len holds
    config = load_config(str(tmp_path / "config.json"))
    assert activation_bytes_per_token(config, "hedgehog", {}, torch.bfloat16, 128) == pytest.approx(
        per_token, rel=0.1
    )
    assert p["memory_per_block"]["saved_activations"] == pytest.approx(
        2 * 64 * p["activation_bytes_per_token_layer"]
    )
    assert (
        main(
            [
                "plan",
                str(tmp_path),
                "-k",
                "2",
                "--tokens",
                "10k",
                "--seq-len",
                "64",
                "--mixer",
                "hedgehog",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["activation_bytes_per_token_layer"] > 0


def test_bad_input_is_a_clear_error(capsys):
    assert main(["plan", "no-such-model"]) == 2
    assert "not a preset" in capsys.readouterr().err
    assert main(["plan", "Llama-3-8B", "--gpu", "TPU", "--no-activations"]) == 2
    assert "unknown GPU 'TPU'" in capsys.readouterr().err
    assert main(["plan", "Llama-3-8B", "--tokens", "lots", "--no-activations"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_the_big_recipes_are_block_wise_as_the_authors_ran_them():
    for name, k, blocks in (("llama-3.1-405b", 9, 14), ("llama-3.1-70b", 5, 16)):
        r = load_recipe(RECIPES / name / "lolcats.yaml")
        layers = load_config(
            {"llama-3.1-405b": "Llama-3.1-405B", "llama-3.1-70b": "Llama-3.1-70B"}[name]
        ).num_hidden_layers
        assert r.stage1.blockwise.block_size == k and -(-layers // k) == blocks
        assert r.mixer.name == "lolcats-terraced" and r.mixer.options["window_factor"] == 0.1
        assert r.stage2.lora.targets == ["q_proj", "v_proj"] and r.stage2.lora.dropout == 0.05
        assert r.stage1.lr == 1e-2 and r.stage2.lr == 1e-4 and r.model.dtype == "bfloat16"
        # two epochs over the stored sequences, in both stages
        assert r.stage1.tokens == r.stage2.tokens == 2 * r.stage1.blockwise.sequences * r.data.seq_len


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mfu", "0"], "--mfu must be a fraction in (0, 1], got 0"),
        (["--mfu", "-1"], "--mfu must be a fraction in (0, 1], got -1"),
        (["--mfu", "5"], "--mfu must be a fraction in (0, 1], got 5"),
        (["--mfu", "nan"], "--mfu must be a fraction in (0, 1], got nan"),
        (["--tflops", "0"], "--tflops must be a number > 0"),
        (["--tflops", "-300"], "--tflops must be a number > 0"),
        (["--block-size", "0"], "--block-size must be a whole number >= 1, got 0"),
        (["--seq-len", "0"], "--seq-len must be a whole number >= 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be a whole number >= 1, got -2"),
        (["--tokens", "0"], "--tokens must be a whole number >= 1, got 0"),
        (["--tokens=-5M"], "--tokens must be a whole number >= 1, got -5000000"),
        (["--tokens", "inf"], "--tokens 'inf' is not a count"),
        (["--option", "feature_dim=-3"], "mixer.options.feature_dim: must be an int >= 1 or null"),
    ],
)
def test_impossible_values_are_refused_before_any_work(capsys, monkeypatch, flags, message):
    import zoo.scale.plan

    def load_config(*args, **kwargs):
        raise AssertionError("the model's config was read before the arguments were checked")

    monkeypatch.setattr(zoo.scale.plan, "load_config", load_config)
    assert main(["plan", "Llama-3-8B", "--no-activations", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and message in err and err.count("\n") == 1, err


def test_measured_tflops_replace_the_assumed_utilization():
    p = plan(k=9, tflops=1.5)
    assert p["throughput_flops"] == 1.5e12 and p["throughput_source"] == "given: 1.5 TFLOP/s"
