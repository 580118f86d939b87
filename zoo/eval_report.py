"""`zoo eval DIR`: the quality bench's metrics for one saved linearized model.

Always: perplexity and bits per byte on each corpus's held-out text (one top-level entry per source).
On request: 5-shot MMLU (`--mmlu N`); passkey retrieval (`--passkey 512,1024`, the filler from the last
`--sources` corpus, never trained on by default; `--passkey-keys N`: the multi-key variant); perplexity by
token position on long held-out blocks beside the teacher and the free window (`--long 2048`); decode
tok/s and state bytes (`--decode 512,1024,2048`); mean per-layer transfer MSE (`--mse N` held-out blocks);
repeats in greedy continuations of N held-out prompts from the first `--sources` corpus (`--generation N`);
each hybrid branch alone (`--branches`); lm-evaluation-harness tasks (`--lm-eval TASKS`). The teacher's
passkey rate is measured beside the model's where a teacher is known (`--teacher`, else the run folder's
recipe model). Where DIR is a run folder, its summary.json adds the
training cost (trainable parameters, tokens, seconds and peak memory per stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.recipe import EvalConfig

__all__ = ["add_eval_arguments", "check_eval_arguments", "evaluate_saved_model", "parse_ints"]

#: a recipe's eval defaults: `zoo eval` measures what a run does
_EVAL_DEFAULTS = EvalConfig()

#: the shortest passkey context: the instructions, needle, question and answer alone take about 58 tokens with
#: a BPE tokenizer (one or more per word, number and punctuation run; zoo.passkey), plus some filler
PASSKEY_MIN_TOKENS = 64

RUN_COST_KEYS = (
    "trainable_params",
    "trainable_percent",
    "tokens_stage1",
    "tokens_stage2",
    "seconds_stage1",
    "seconds_stage2",
    "peak_memory_stage1",
    "peak_memory_stage2",
)


def parse_ints(text: str | None, flag: str, minimum: int = 1) -> list[int]:
    """ "512,1024" -> [512, 1024]; a clear error names the flag, also for a count below `minimum`."""
    if not text:
        return []
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"{flag} takes comma-separated token counts such as 512,1024, got {text!r}"
        ) from None
    too_small = [n for n in counts if n < minimum]
    if too_small:
        raise ValueError(f"{flag}: context lengths must be >= {minimum} tokens, got {too_small[0]}")
    return counts


def check_eval_arguments(args) -> tuple[list[int], list[int]]:
    """The --passkey and --decode context lengths, after refusing any impossible value with one line naming
    its flag; nothing is loaded."""
    passkey = parse_ints(args.passkey, "--passkey", PASSKEY_MIN_TOKENS)
    decode = parse_ints(args.decode, "--decode")
    at_least = {
        "--seq-len": (args.seq_len, 2),
        "--max-blocks": (args.max_blocks, 1),
        "--mmlu": (args.mmlu, 0),
        "--passkey-trials": (args.passkey_trials, 1),
        "--decode-steps": (args.decode_steps, 1),
        "--mse": (args.mse, 0),
        "--generation": (args.generation, 0),
        "--generation-tokens": (args.generation_tokens, 1),
        "--lm-eval-limit": (args.lm_eval_limit, 1),
        "--lm-eval-fewshot": (args.lm_eval_fewshot, 0),
        "--long-blocks": (args.long_blocks, 1),
        "--window": (args.window, 0),
        "--sinks": (args.sinks, 0),
    }
    for flag, (value, minimum) in at_least.items():
        if value is not None and value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if args.long and args.long < 512:
        raise ValueError(f"--long must be a block length >= 512 tokens, got {args.long}")
    if not 1 <= args.passkey_keys <= 8:
        raise ValueError(
            f"--passkey-keys must be 1 (one key) to 8 (the multi-key variant), got {args.passkey_keys}"
        )
    mixer_options(args)
    if args.window == 0 and args.sinks == 0:
        raise ValueError("--window 0 with --sinks 0 leaves the free window no key to attend to")
    steps = args.decode_steps
    if any(b - a <= steps for a, b in zip(decode, decode[1:])):
        raise ValueError(
            f"--decode: context lengths must grow by more than --decode-steps ({steps}) "
            f"each time, got {args.decode}"
        )
    return passkey, decode


def mixer_options(args) -> dict[str, Any]:
    """--mixer-option KEY=VALUE pairs (values read as YAML scalars), checked against --mixer's options; a
    one-line ValueError for an unknown mixer, a pair without '=', or a value its option refuses."""
    pairs = args.mixer_option or []
    if pairs and not args.mixer:
        raise ValueError("--mixer-option needs --mixer (the mixer whose option it sets)")
    if not args.mixer:
        return {}
    import yaml

    from zoo.mixers import get_mixer

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--mixer-option takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    try:
        mixer = get_mixer(args.mixer)
    except KeyError as err:
        raise ValueError(f"--mixer: {err.args[0]}") from None
    try:
        mixer.check_options(options)
    except ValueError as err:
        raise ValueError(f"--mixer-option: {err}") from None
    return options


def add_eval_arguments(parser) -> None:
    """The optional measurements of `zoo eval` (the CLI adds DIR, --sources, --seq-len, --max-blocks,
    --mmlu)."""
    parser.add_argument("--passkey", help="passkey retrieval at these contexts (tokens), e.g. 512,1024,2048")
    parser.add_argument(
        "--passkey-trials",
        type=int,
        default=4,
        help="prompts per context, at evenly spread depths (default 4)",
    )
    parser.add_argument(
        "--passkey-keys",
        type=int,
        default=1,
        help="named keys hidden in every passkey prompt, one asked (2-8: the multi-key variant; default 1)",
    )
    parser.add_argument(
        "--long",
        type=int,
        default=0,
        help="perplexity by token position on held-out blocks of this many tokens (>= 512), beside the "
        "teacher and the free window, and the share of their gap the model closes",
    )
    parser.add_argument("--long-blocks", type=int, default=4, help="blocks per source for --long (default 4)")
    parser.add_argument(
        "--window", type=int, help="the free window's tokens (default: the model's mixer window, else 64)"
    )
    parser.add_argument("--sinks", type=int, help="the free window's sinks (default: the mixer's, else 4)")
    parser.add_argument(
        "--teacher",
        help="the teacher for --long and the passkey rate beside the model's (default: the run folder's "
        "recipe model; 'none' to skip)",
    )
    parser.add_argument("--decode", help="decode tok/s and state bytes at these contexts, e.g. 512,1024,2048")
    parser.add_argument(
        "--decode-steps", type=int, default=8, help="timed decoding steps per context (default 8)"
    )
    parser.add_argument(
        "--mse", type=int, default=0, help="mean per-layer transfer MSE on this many held-out blocks"
    )
    parser.add_argument(
        "--generation",
        type=int,
        default=0,
        help="greedy continuations of this many held-out prompts, scored for repeated 4-grams",
    )
    parser.add_argument(
        "--generation-tokens",
        type=int,
        default=_EVAL_DEFAULTS.generation_tokens,
        help=f"tokens generated per prompt (default {_EVAL_DEFAULTS.generation_tokens})",
    )
    parser.add_argument(
        "--branches", action="store_true", help="hybrids: also each branch alone (window, linear)"
    )
    parser.add_argument(
        "--mixer",
        help="evaluate with this mixer in every converted layer instead, the weights carried over "
        "(zoo.swap_mixers: it must have the same parameters, e.g. lola on a lolcats-terraced-sink run)",
    )
    parser.add_argument(
        "--mixer-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of --mixer, e.g. cache_size=128 (repeatable); the layers' own options stay otherwise",
    )
    parser.add_argument(
        "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (needs lm-eval installed)"
    )
    parser.add_argument("--lm-eval-include", help="a folder of lm_eval task YAML files of your own")
    parser.add_argument("--lm-eval-limit", type=int, help="at most this many examples per lm_eval task")
    parser.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples for the lm_eval tasks")


def _teacher(args, folder: Path):
    """The teacher of `zoo eval`: --teacher, else the run folder's recipe model; None for 'none' or where
    neither names one."""
    name = args.teacher
    if name is None and (folder / "recipe.yaml").is_file():
        import yaml

        name = (yaml.safe_load((folder / "recipe.yaml").read_text()).get("model") or {}).get("name")
    if name in (None, "none"):
        return None
    from zoo.teacher import load_teacher

    return load_teacher(name)[0]


def _passkey(args, lengths, model, teacher, tokenizer, corpus) -> dict:
    """Passkey retrieval of the model, with the teacher's beside it (under "teacher") where there is one;
    the filler is the last source's held-out text."""
    from zoo.passkey import evaluate_passkey

    filler = corpus.heldout(corpus.sources[-1])
    result = evaluate_passkey(model, tokenizer, filler, lengths, args.passkey_trials, keys=args.passkey_keys)
    if teacher is not None:
        result["teacher"] = evaluate_passkey(
            teacher, tokenizer, filler, lengths, args.passkey_trials, keys=args.passkey_keys
        )
    return result


def _long_context(args, model, teacher, tokenizer, corpus) -> dict:
    """Perplexity by position of the model (and the teacher and free window, with a teacher) per source."""
    from zoo.long_context import free_window_model, long_context_table, position_tables, window_of

    own_window, own_sinks = window_of(model)
    window = (
        own_window if args.window is None else args.window,
        own_sinks if args.sinks is None else args.sinks,
    )
    models = {"final": model}
    if teacher is not None:
        models = {"teacher": teacher, "free_window": free_window_model(teacher, *window), "final": model}
    docs = {source: corpus.heldout(source) for source in corpus.sources}
    rows = {
        name: position_tables(m, tokenizer, docs, args.long, args.long_blocks) for name, m in models.items()
    }
    return long_context_table(rows, window if teacher is not None else None)


def _swap_mixers(args, model) -> dict[str, Any]:
    """--mixer: every converted layer of `model` given that mixer (zoo.swap_mixers); what was swapped in, as
    {"swapped_mixer": ...} for the results ({} without --mixer)."""
    if not args.mixer:
        return {}
    import zoo

    options = mixer_options(args)
    zoo.swap_mixers(model, args.mixer, **options)
    return {"swapped_mixer": {"mixer": args.mixer, "options": options}}


def evaluate_saved_model(args) -> dict[str, Any]:
    """Everything `zoo eval` was asked for, as one JSON-able dict."""
    import zoo
    from zoo.data import load_corpus, token_blocks
    from zoo.evaluate import evaluate_corpus

    passkey, decode = check_eval_arguments(args)
    folder = Path(args.dir)
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    model, tokenizer = zoo.load_linearized(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer saved with the model")
    swap = _swap_mixers(args, model)
    corpus = load_corpus(args.sources)

    def quality() -> dict:
        return evaluate_corpus(model, tokenizer, corpus, corpus.sources, args.seq_len, args.max_blocks)

    results: dict[str, Any] = quality()
    if args.mmlu:
        from zoo.mmlu import evaluate_mmlu

        results["mmlu"] = evaluate_mmlu(model, tokenizer, limit=args.mmlu)
    teacher = _teacher(args, folder) if (passkey or args.long) else None
    if passkey:
        results["passkey"] = _passkey(args, passkey, model, teacher, tokenizer, corpus)
    if args.long:
        results["long_context"] = _long_context(args, model, teacher, tokenizer, corpus)
    if decode:
        from zoo.decode_cost import measure_decode

        results["decode"] = measure_decode(model, decode, args.decode_steps)
    if args.mse:
        from zoo.transfer.stage1 import layer_mse

        blocks = token_blocks(tokenizer, corpus.heldout(corpus.sources[0]), args.seq_len, max_blocks=args.mse)
        per_layer = layer_mse(model, blocks)
        results["layer_mse"] = per_layer
        results["mean_layer_mse"] = sum(per_layer.values()) / len(per_layer)
    if args.generation:
        from zoo.generation import evaluate_generation, generation_prompts

        prompts = generation_prompts(
            tokenizer,
            corpus.heldout(corpus.sources[0]),
            args.generation,
            _EVAL_DEFAULTS.generation_prompt_tokens,
        )
        results["generation"] = evaluate_generation(model, tokenizer, prompts, args.generation_tokens)
    if args.branches:
        from zoo.convert import branch as hybrid_branch

        results["branches"] = {}
        for branch in ("window", "linear"):
            with hybrid_branch(model, branch):
                results["branches"][branch] = quality()
    if args.lm_eval:
        from zoo.lm_eval_bridge import run_lm_eval

        results["lm_eval"] = run_lm_eval(
            model,
            tokenizer,
            args.lm_eval.split(","),
            include_path=args.lm_eval_include,
            limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot,
        )
    return results | swap | _run_cost(folder)


def _run_cost(folder: Path) -> dict:
    """{"run": the training cost from a run folder's summary.json}, or {} for a bare model folder."""
    import json

    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text())
    return {"run": {k: summary.get(k) for k in RUN_COST_KEYS}}
