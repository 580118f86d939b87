"""Whether a window hybrid's linear branch helps or hurts past its training length: perplexity by position
of a trained model with both branches and with its window branch alone (zoo.convert.branch, the same
weights), on one corpus's held-out blocks.

    python docs/scripts/window_branch_at_length.py RUN/model [SOURCE] [LENGTH] [BLOCKS] > out.json

Defaults: brown, 4,096 tokens, 4 blocks (the long bench's). Results: docs/long-context.md ("The recipes fixed
for length").
"""

import json
import sys

import torch

import zoo
from zoo.convert import branch
from zoo.data import load_corpus
from zoo.long_context import bucket_table, document_blocks, position_nll


def main(folder: str, source: str = "brown", length: int = 4096, blocks: int = 4) -> None:
    model, tokenizer = zoo.load_linearized(folder)
    ids = document_blocks(tokenizer, load_corpus([source]).heldout(source), length, max_blocks=blocks)

    def ppl():
        with torch.no_grad():
            table = bucket_table(position_nll(model, ids), ids.shape[0])
        return {bucket: round(row["ppl"], 2) for bucket, row in table.items()}

    out = {"source": source, "length": length, "blocks": int(ids.shape[0]), "both branches": ppl()}
    with branch(model, "window"):
        out["window branch alone"] = ppl()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3], *(int(a) for a in sys.argv[3:5]))
