"""Why a window hybrid degrades past its training length: perplexity by position of the teacher, the free
window, the model and each of its branches alone, and the attention mass the model puts on keys older than
its terraced window (previous + current 64-token block) against the softmax of the same queries and keys.

    python docs/scripts/long_context_diagnosis.py runs/demo-lolcats/model > diagnosis.json

Results and reading: docs/long-context.md.
"""

import json
import sys

import torch

import zoo
from zoo.convert import branch, linearized_layers
from zoo.data import load_corpus
from zoo.long_context import bucket_table, document_blocks, free_window_model, position_nll
from zoo.mixers.base import repeat_kv
from zoo.teacher import load_teacher

LENGTH, BLOCKS, EDGES = 2048, 2, (0, 256, 1024, 2048)


def ppl(model, blocks):
    return {
        s: {k: round(v["ppl"], 2) for k, v in bucket_table(position_nll(model, ids), ids.shape[0]).items()}
        for s, ids in blocks.items()
    }


def far_mass(model, ids):
    """Mean attention weight on keys older than the terraced window, per query-position bucket: the model's
    hybrid weights and the softmax of the same q, k (causal, all keys)."""
    sums = {"model": [0.0] * 3, "softmax": [0.0] * 3}
    calls = [0]

    def hook(mixer, args, out):
        q, k = args[0], args[1]
        with torch.no_grad():
            hybrid = mixer.attention_weights(q, k)[0].float()
            scores = (q[0] @ repeat_kv(k, mixer.num_heads)[0].transpose(-1, -2)) * mixer.head_dim**-0.5
            i = torch.arange(scores.shape[-1])
            soft = torch.softmax(scores.masked_fill(i[None, :] > i[:, None], float("-inf")).float(), -1)
            far = i[None, :] < ((i[:, None] // mixer.window) - 1).clamp(min=0) * mixer.window
            for j, (lo, hi) in enumerate(zip(EDGES, EDGES[1:])):
                sums["model"][j] += (hybrid[:, lo:hi] * far[lo:hi]).sum(-1).mean().item()
                sums["softmax"][j] += (soft[:, lo:hi] * far[lo:hi]).sum(-1).mean().item()
        calls[0] += 1

    handles = [layer.mixer.register_forward_hook(hook) for layer in linearized_layers(model)]
    with torch.no_grad():
        model(input_ids=ids[:1], use_cache=False)
    for h in handles:
        h.remove()
    names = [f"{lo}-{hi}" for lo, hi in zip(EDGES, EDGES[1:])]
    return {kind: dict(zip(names, (round(x / calls[0], 4) for x in v))) for kind, v in sums.items()}


def main(folder):
    model, tokenizer = zoo.load_linearized(folder)
    teacher, _ = load_teacher("smollm2-135m")
    corpus = load_corpus(["austen", "brown"])
    blocks = {
        s: document_blocks(tokenizer, corpus.heldout(s), LENGTH, max_blocks=BLOCKS) for s in corpus.sources
    }
    out = {
        "teacher": ppl(teacher, blocks),
        "free window 64+4": ppl(free_window_model(teacher, 64, 4), blocks),
    }
    out["model"] = ppl(model, blocks)
    for name in ("window", "linear"):
        with branch(model, name):
            out[f"model, {name} branch alone"] = ppl(model, blocks)
    out["far mass"] = far_mass(model, blocks["austen"])
    out["window share a per layer"] = [
        round(torch.sigmoid(layer.mixer.window_logit.float()).mean().item(), 3)
        for layer in linearized_layers(model)
    ]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
