"""`zoo eval DIR` with every optional measurement on a tiny linearized run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from zoo.cli import main

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m" / "lolcats.yaml")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-cache"))


def test_eval_gives_the_bench_metrics_for_one_model(tiny_world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    overrides = {
        "model.name": tiny_world["model"],
        "mixer.options": {"window": 8, "feature_dim": 16},
        "data.train": [tiny_world["train"]],
        "data.eval_ood": [tiny_world["ood"]],
        "data.seq_len": 32,
        "stage1.tokens": 64,
        "stage1.batch_size": 2,
        "stage2.tokens": 64,
        "stage2.batch_size": 2,
        "stage2.lora.rank": 4,
        "eval.max_blocks": 2,
        "eval.generate_tokens": 2,
        "device": "cpu",
    }
    assert (
        main(["run", RECIPE, *[f"{k}={json.dumps(v)}" for k, v in overrides.items()], "--out", str(out)]) == 0
    )
    capsys.readouterr()
    args = [
        "eval",
        str(out),
        "--sources",
        tiny_world["train"],
        tiny_world["ood"],
        "--seq-len",
        "32",
        "--max-blocks",
        "2",
        "--mmlu",
        "2",
        "--passkey",
        "256",
        "--passkey-trials",
        "2",
        "--decode",
        "96,160",
        "--decode-steps",
        "2",
        "--mse",
        "2",
        "--branches",
        "--generation",
        "2",
        "--generation-tokens",
        "8",
    ]
    lm_eval = importlib.util.find_spec("lm_eval") is not None
    if lm_eval:  # the bridge end to end through the CLI, on a task of our own
        from test_lm_eval_bridge import write_task

        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        write_task(tmp_path)
        args += ["--lm-eval", "zoo_tiny_choice", "--lm-eval-include", str(tmp_path / "tasks")]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for source in (tiny_world["train"], tiny_world["ood"]):
        assert result[source]["ppl"] > 1
    assert result["mmlu"]["n"] == 2
    assert set(result["passkey"]["lengths"]) == {"256"} and result["passkey"]["lengths"]["256"]["n"] == 2
    assert result["decode"]["state_growth"] == "constant" and set(result["decode"]["contexts"]) == {
        "96",
        "160",
    }
    assert set(result["layer_mse"]) == {"0", "1"} and result["mean_layer_mse"] >= 0
    assert result["generation"]["prompts"] == 2 and result["generation"]["new_tokens"] == 8
    assert 0 <= result["generation"]["repeated_4grams"] <= 1
    window, linear = result["branches"]["window"], result["branches"]["linear"]
    assert (
        window[tiny_world["ood"]]["ppl"]
        != linear[tiny_world["ood"]]["ppl"]
        != result[tiny_world["ood"]]["ppl"]
    )
    assert result["run"]["tokens_stage1"] == 64 and result["run"]["trainable_params"] > 0
    assert result["run"]["peak_memory_stage2"]["peak_rss_bytes"] > 0
    if lm_eval:
        assert 0 <= result["lm_eval"]["results"]["zoo_tiny_choice"]["acc,none"] <= 1


def test_eval_bad_lengths_are_a_clear_error(tiny_world, tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--passkey", "1k"]) == 2
    assert (
        "--passkey takes comma-separated token counts such as 512,1024, got '1k'" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--passkey", "-5"], "--passkey: context lengths must be >= 64 tokens, got -5"),
        (["--passkey", "512,32"], "--passkey: context lengths must be >= 64 tokens, got 32"),
        (["--passkey", "256", "--passkey-trials", "0"], "--passkey-trials must be >= 1, got 0"),
        (["--max-blocks", "0"], "--max-blocks must be >= 1, got 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2, got 1"),
        (["--seq-len", "-8"], "--seq-len must be >= 2, got -8"),
        (["--decode", "0,512"], "--decode: context lengths must be >= 1 tokens, got 0"),
        (["--decode", "512,256"], "--decode: context lengths must grow by more than --decode-steps (8)"),
        (["--decode", "512", "--decode-steps", "0"], "--decode-steps must be >= 1, got 0"),
        (["--mse", "-1"], "--mse must be >= 0, got -1"),
        (["--generation-tokens", "0"], "--generation-tokens must be >= 1, got 0"),
        (["--mixer", "nope"], "--mixer: unknown mixer 'nope'; registered mixers: "),
        (["--mixer-option", "cache_size=3"], "--mixer-option needs --mixer"),
        (
            ["--mixer", "lola", "--mixer-option", "cache_size"],
            "--mixer-option takes KEY=VALUE, got 'cache_size'",
        ),
        (
            ["--mixer", "lola", "--mixer-option", "cache_size=-1"],
            "--mixer-option: mixer.options.cache_size: must be an int >= 0, got -1",
        ),
        (
            ["--mixer", "lola", "--mixer-option", "cache=1"],
            "--mixer-option: mixer 'lola' got unknown option(s)",
        ),
    ],
)
def test_impossible_values_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    import zoo

    def load_linearized(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load_linearized", load_linearized)
    assert main(["eval", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and message in err and err.count("\n") == 1, err
