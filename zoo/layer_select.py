"""Inter-layer hybrids chosen by measurement: which layers to give back their softmax attention.

For each converted layer l of a linearized model, `layer_scores` measures the held-out next-token loss
(mean NLL, nats) with that one layer computing softmax attention again (its own projections, LoRA
included) and every other layer its mixer. A layer's score is the loss it recovers: NLL(model) -
NLL(model with layer l softmax). The k layers with the highest scores are the ones worth keeping as softmax
(KL-guided layer selection, arXiv:2512.20569, scores by the KL to the teacher; zoo scores by the held-out
loss, which needs no teacher beside a model whose LoRA is merged). Measure on long blocks: a layer's worth
is in what its mixer forgets past the window.

`zoo select-layers DIR --k 2` writes the scores and the choice to DIR/layer_scores.json and prints the
recipe override that linearizes every other layer (`mixer.layers=[...]`): only the kept layers then hold
a KV cache. `evenly_spaced` gives the comparison the bench makes.
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.convert import linearized_layers, softmax_teacher
from zoo.evaluate import nll

__all__ = ["layer_scores", "choose_layers", "evenly_spaced", "linearized_complement"]


def _mean_nll(model: Any, blocks: list[torch.Tensor]) -> float:
    total = count = 0
    for ids in blocks:
        t, c = nll(model, ids, batch_size=1)
        total, count = total + t, count + c
    return total / count


def layer_scores(model: Any, blocks: list[torch.Tensor], say=None) -> dict[str, Any]:
    """{"base_nll": the model's mean NLL on `blocks` (a list of [N, T] token blocks, e.g. one per source),
    "scores": {layer index: NLL recovered with that layer softmax}} for every converted layer."""
    layers = [layer.mixer.layer_idx for layer in linearized_layers(model)]
    if not layers:
        raise ValueError("the model has no converted layer to score")
    base = _mean_nll(model, blocks)
    scores = {}
    for i, index in enumerate(layers):
        with softmax_teacher(model, [index]):
            scores[index] = base - _mean_nll(model, blocks)
        if say:
            say(f"layer {index} ({i + 1}/{len(layers)}): recovers {scores[index]:.4f} nats")
    return {"base_nll": base, "scores": scores}


def choose_layers(scores: dict[int, float], k: int) -> list[int]:
    """The `k` layers with the highest scores, in layer order (ties: the lower index)."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be 0 to the {len(scores)} scored layers, got {k}")
    best = sorted(scores, key=lambda index: (-scores[index], index))[:k]
    return sorted(best)


def evenly_spaced(num_layers: int, k: int) -> list[int]:
    """`k` layer indices spread evenly over `num_layers` (the centre of each of k equal spans)."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"k must be 0 to {num_layers}, got {k}")
    return sorted({int((i + 0.5) * num_layers / k) for i in range(k)})


def linearized_complement(num_layers: int, softmax_layers: list[int]) -> list[int]:
    """The `mixer.layers` of a recipe that keeps `softmax_layers` as softmax: every other layer."""
    keep = set(softmax_layers)
    return [i for i in range(num_layers) if i not in keep]


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="a run folder (or a saved model folder, with --out)")
    parser.add_argument("--k", type=int, default=2, help="layers to keep as softmax (default 2)")
    parser.add_argument(
        "--sources", nargs="+", default=["austen", "brown"], help="held-out text to score on (data specs)"
    )
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block (default 1024)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per source (default 2)")
    parser.add_argument("--out", help="the JSON to write (default DIR/layer_scores.json in a run folder)")


def main(args) -> int:
    import json
    from pathlib import Path

    import zoo
    from zoo.atomic import write_json
    from zoo.data import load_corpus
    from zoo.long_context import document_blocks

    for flag, value, least in (
        ("--k", args.k, 0),
        ("--seq-len", args.seq_len, 2),
        ("--blocks", args.blocks, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    folder = Path(args.dir)
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    if args.out is None and model_dir == folder:
        raise ValueError(f"{folder} is not a run folder: give --out FILE for the scores")
    out = Path(args.out) if args.out else folder / "layer_scores.json"
    model, tokenizer = zoo.load_linearized(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer saved with the model")
    num_layers = model.config.num_hidden_layers
    if args.k > len(linearized_layers(model)):
        raise ValueError(f"--k {args.k}: the model has only {len(linearized_layers(model))} converted layers")
    corpus = load_corpus(args.sources)
    blocks = [
        document_blocks(tokenizer, corpus.heldout(s), args.seq_len, max_blocks=args.blocks)
        for s in corpus.sources
    ]
    result = layer_scores(model, blocks, say=lambda m: print(f"zoo: {m}", flush=True))
    chosen = choose_layers(result["scores"], args.k)
    report = {
        "model": str(model_dir),
        "sources": corpus.sources,
        "seq_len": args.seq_len,
        "blocks_per_source": args.blocks,
        "metric": "held-out mean NLL (nats) recovered with the layer's softmax attention given back",
        **result,
        "k": args.k,
        "chosen": chosen,
        "evenly_spaced": evenly_spaced(num_layers, args.k),
        "mixer_layers": linearized_complement(num_layers, chosen),
    }
    write_json(out, report)
    print(json.dumps({k: report[k] for k in ("base_nll", "chosen", "evenly_spaced")}))
    print(f"keep layers {chosen} as softmax: zoo run RECIPE 'mixer.layers={report['mixer_layers']}'")
    print(f"scores: {out}")
    return 0
