"""`zoo bench generate` on a tiny random Llama: both context fills, the cells and their labels, the
memory limit, a synthetic KV cache that decoding really attends to, OOM and time skips, the report, a
saved linearized folder through the CLI, and bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from zoo_testing import tiny_model, tiny_tokenizer

import zoo
from zoo.bench import generate
from zoo.bench.generate_report import plot_name, write_report
from zoo.cache import CACHE_ARG
from zoo.cli import main as cli_main
from zoo.kernels import native

MIXER = "lolcats-terraced-sink"
NEW_TOKENS = 4
#: the tiny teacher's KV cache: 2 (k, v) * 2 layers * 2 kv heads * head dim 16 * 4 bytes = 512 bytes a token;
#: this limit lets every teacher cell run but C=64, B=2 (65,536 bytes)
MEMORY_LIMIT_GB = 50_000 / 1e9
SWEEP = ["--contexts", "32", "64", "--batches", "1", "2", "--new-tokens", str(NEW_TOKENS), "--threads", "1"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = tiny_tokenizer(["the house by the river and the garden of the king"] * 20)
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def benches(teacher_dir, tmp_path_factory):
    """One sweep per context fill: {fill: (results, out folder)}."""
    runs = {}
    threads = torch.get_num_threads()
    try:
        for fill in generate.CONTEXT_FILLS:
            out = tmp_path_factory.mktemp(fill)
            argv = ["--model", str(teacher_dir), "--mixers", MIXER, *SWEEP, "--context-fill", fill]
            argv += [
                "--synthetic-prefill",
                "40",
                "--memory-limit-gb",
                str(MEMORY_LIMIT_GB),
                "--out",
                str(out),
            ]
            runs[fill] = generate.run_generate_bench(parse(argv), log=lambda line: None), out
    finally:
        torch.set_num_threads(threads)
    return runs


def by_cell(results: dict) -> dict:
    return {(c["model"], c["context"], c["batch"]): c for c in results["cells"]}


@pytest.mark.parametrize("fill", list(generate.CONTEXT_FILLS))
def test_every_cell_is_measured_or_says_why(benches, fill):
    results, out = benches[fill]
    cells = by_cell(results)
    assert set(cells) == {(m, C, B) for m in ("teacher", MIXER) for C in (32, 64) for B in (1, 2)}
    for (model, C, B), cell in cells.items():
        if (model, C, B) == ("teacher", 64, 2):  # its KV cache is over --memory-limit-gb
            assert cell["status"] == "skipped" and cell["reason"].startswith("would not fit"), cell
            assert cell["kv_cache_bytes"] == 512 * 64 * 2
            continue
        assert cell["status"] == "ok", cell
        assert cell["decode_tokens_per_s"] > 0 and cell["decode_seconds"] > 0
        assert cell["decode_tokens_per_s"] == pytest.approx(B * NEW_TOKENS / cell["decode_seconds"])
        assert cell["state_bytes"] > 0 and cell["peak_memory_bytes"] > cell["state_bytes"]
        assert cell["context_fill"] == fill and cell["context_made_by"]
        # the converted model decodes through zoo's lean step, the teacher through transformers' forward
        assert cell["decode_step"] == ("zoo.lean_decode" if model == MIXER else "transformers' forward")
    # the linearized model's cells all ran: it has no KV cache to exceed the limit
    assert all(cells[MIXER, C, B]["kv_cache_bytes"] == 0 for C in (32, 64) for B in (1, 2))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cells"] == json.loads(json.dumps(results["cells"]))
    for key in ("command", "device", "dtype", "threads", "versions", "memory_limit_bytes", "memory_method"):
        assert on_disk[key] is not None, key
    assert {"torch", "transformers"} <= set(on_disk["versions"]) and on_disk["threads"] == 1
    assert set(on_disk["cpu_c_kernels"]) == {path.stem for path in native.SOURCES.glob("*.c")}
    assert on_disk["memory_limit_bytes"] == 50_000


def test_how_each_context_was_made(benches):
    prefill, synthetic = by_cell(benches["prefill"][0]), by_cell(benches["synthetic"][0])
    for C in (32, 64):
        real = prefill["teacher", C, 1]
        assert real["context_made_by"] == f"prefill of {C} random tokens"
        assert real["prefill_tokens"] == C and real["prefill_seconds"] > 0
        fake = synthetic["teacher", C, 1]
        assert fake["context_made_by"].startswith(f"random KV cache of {C} tokens per layer")
        assert (
            fake["prefill_tokens"] == 0 and fake["prefill_seconds"] is None
        )  # nothing measured, none claimed
        for cells in (prefill, synthetic):  # decoding saw exactly C + the warm-up step + the new tokens
            assert cells["teacher", C, 1]["cache_tokens_after_decode"] == C + 1 + NEW_TOKENS
    # the linearized model: C=32 is under --synthetic-prefill 40, so it is a real prefill of C ...
    assert synthetic[MIXER, 32, 1]["context_made_by"] == "prefill of 32 random tokens"
    # ... C=64 a prefill of 40 tokens, whose state is shown constant
    short = synthetic[MIXER, 64, 2]
    assert short["prefill_tokens"] == 40 and short["cache_tokens_after_decode"] == 40 + 1 + NEW_TOKENS
    assert short["context_made_by"].startswith("prefill of 40 random tokens, constant state")
    assert short["mixer_state_bytes_after_warmup"] == short["mixer_state_bytes_after_decode"] > 0
    assert prefill[MIXER, 64, 2]["prefill_tokens"] == 64


@pytest.mark.parametrize("kind", generate.TEACHER_CACHES)
def test_a_random_kv_cache_is_attended_to(kind):
    """Decoding after a synthetic cache of C keys attends to C + 1 keys: the cache grows to C + 1, other
    random keys change the output, and a static cache gives what a dynamic one gives."""
    model, C = tiny_model("llama"), 24
    token = torch.tensor([[5]])

    def step(seed: int, cache_kind: str = kind):
        cache = generate.random_kv_cache(model.config, cache_kind, 1, C, C + 1, torch.float32, "cpu", seed)
        assert int(cache.get_seq_length()) == C
        with torch.no_grad():
            out = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache})
        assert int(getattr(out, CACHE_ARG).get_seq_length()) == C + 1
        return out.logits

    first = step(0)
    assert not torch.allclose(first, step(1))
    torch.testing.assert_close(first, step(0, "dynamic" if kind == "static" else "static"))


def test_report(benches):
    results, out = benches["synthetic"]
    paths = write_report(results, out)
    md = (out / "results.md").read_text()
    assert "CPU C kernels in use" in md
    assert "| model | context | B=1 | B=2 |" in md
    assert results["warmup_steps"] == 1 and "tokens per sequence, timed after 1 untimed step(s)" in md
    teacher_row = next(line for line in md.splitlines() if line.startswith("| teacher | 64 |"))
    assert teacher_row.endswith("| skip |")
    for C in (32, 64):
        assert f"- C={C}: {MIXER} " in md and (out / plot_name(C)).is_file()
    assert "would not fit" in md and "random KV cache of 64 tokens" in md
    assert f"- {MIXER}: zoo.lean_decode (C=32 B=1, C=32 B=2, C=64 B=1, C=64 B=2)" in md
    assert "- teacher: transformers' forward (C=32 B=1, C=32 B=2, C=64 B=1)" in md
    assert {p.name for p in paths} == {"results.md", plot_name(32), plot_name(64)}


def test_out_of_memory_and_slow_cells_are_recorded_and_the_sweep_goes_on(teacher_dir, tmp_path, monkeypatch):
    real_run_cell = generate.run_cell

    def run_cell(model, cell, args):
        if cell["kind"] == "teacher" and (cell["context"], cell["batch"]) == (32, 2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_run_cell(model, cell, args)

    monkeypatch.setattr(generate, "run_cell", run_cell)
    argv = ["--model", str(teacher_dir), "--mixers", MIXER, *SWEEP, "--out", str(tmp_path)]
    cells = by_cell(generate.run_generate_bench(parse(argv), log=lambda line: None))
    assert cells["teacher", 32, 2]["status"] == "oom" and "out of memory" in cells["teacher", 32, 2]["reason"]
    assert (
        cells["teacher", 64, 2]["status"] == "skipped"
        and "ran out of memory" in cells["teacher", 64, 2]["reason"]
    )
    assert cells["teacher", 64, 1]["status"] == "ok"
    assert all(cells[MIXER, C, B]["status"] == "ok" for C in (32, 64) for B in (1, 2))
    # --max-seconds: once a cell takes longer, the larger ones are skipped
    argv = ["--model", str(teacher_dir), "--mixers", *SWEEP, "--max-seconds", "1e-9", "--out", str(tmp_path)]
    cells = by_cell(generate.run_generate_bench(parse(argv), log=lambda line: None))
    assert cells["teacher", 32, 1]["status"] == "ok"
    assert all(cells["teacher", C, B]["status"] == "skipped" for C, B in ((32, 2), (64, 1), (64, 2)))


def test_a_saved_linearized_model_through_the_cli(teacher_dir, tmp_path, capsys):
    model, tokenizer = zoo.load_teacher(str(teacher_dir))
    zoo.linearize(model, MIXER)
    zoo.save_linearized(model, tokenizer, tmp_path / "run" / "model")
    out = tmp_path / "bench"
    argv = ["bench", "generate", "--model", str(tmp_path / "run"), "--contexts", "16", "--batches", "1"]
    assert cli_main([*argv, "--new-tokens", "2", "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", f"{MIXER} (saved)"]
    assert [c["status"] for c in results["cells"]] == ["ok", "ok"]
    assert (out / "results.md").is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batches", "0", "4"], "--batches must be >= 1, got 0"),
        (["--contexts", "-8"], "--contexts must be >= 1, got -8"),
        (["--mixers", "no-such-mixer"], "unknown mixer 'no-such-mixer'"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1"),
        (["--model", "not-a-model"], "not an embedded teacher"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(argv, message, monkeypatch, capsys, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(zoo, "load_teacher", no_load)
    monkeypatch.setattr(generate, "_model_forms", no_load)
    with pytest.raises(ValueError, match=message):
        generate.run_generate_bench(parse([*argv, "--out", str(tmp_path / "x")]))
    assert cli_main(["bench", "generate", *argv, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_mixer_named_twice_is_one_model_form():
    args = generate._resolve(parse(["--mixers", "lola,hedgehog", "lola"]), check_model=False)
    assert args.mixers == ["lola", "hedgehog"]
