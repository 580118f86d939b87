"""A trained window hybrid evaluated with its linear branch's mass capped at N keys (the mixer option
`linear_mass_tokens`), no retraining: perplexity by position per cap.

    python docs/scripts/linear_mass_cap_without_training.py runs/demo-lolcats/model none,128,32,8

Results: docs/long-context.md.
"""

import json
import sys

import zoo
from zoo.convert import linearized_layers
from zoo.data import load_corpus
from zoo.long_context import bucket_table, document_blocks, position_nll

LENGTH, BLOCKS = 2048, 2


def main(folder, caps):
    model, tokenizer = zoo.load_linearized(folder)
    corpus = load_corpus(["austen", "brown"])
    blocks = {
        s: document_blocks(tokenizer, corpus.heldout(s), LENGTH, max_blocks=BLOCKS) for s in corpus.sources
    }
    out = {}
    for cap in caps.split(","):
        for layer in linearized_layers(model):
            layer.mixer.config["linear_mass_tokens"] = None if cap == "none" else int(cap)
        out[cap] = {
            s: {
                k: round(v["ppl"], 2) for k, v in bucket_table(position_nll(model, ids), ids.shape[0]).items()
            }
            for s, ids in blocks.items()
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
