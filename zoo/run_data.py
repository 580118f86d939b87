"""A run's data: the corpus, its training blocks and the held-out evaluation sets."""

from __future__ import annotations

import math

import torch

from zoo.recipe import Recipe


def pooled(per_source: dict[str, dict]) -> dict:
    """Token-weighted perplexity and bits per byte over several sources."""
    tokens = sum(r["tokens"] for r in per_source.values())
    if not tokens:
        return {"ppl": float("nan"), "bpb": float("nan"), "tokens": 0}
    nll = sum(math.log(r["ppl"]) * r["tokens"] for r in per_source.values())
    bpb = sum(r["bpb"] * r["tokens"] for r in per_source.values()) / tokens
    return {"ppl": math.exp(nll / tokens), "bpb": bpb, "tokens": tokens}


class RunData:
    """The run's corpus, training blocks and held-out evaluation sets (in-domain and out-of-domain)."""

    def __init__(self, recipe: Recipe, tokenizer):
        from zoo.data import load_corpus, token_blocks

        d = recipe.data  # checked before anything loads (zoo.preflight.check_data): no source in both lists
        # a source that fails is an error, unless the recipe says data.skip_unavailable
        self.corpus = load_corpus(
            list(d.train) + list(d.eval_ood),
            heldout_fraction=d.heldout_fraction,
            seed=d.seed,
            strict=not d.skip_unavailable,
        )
        self.train_sources = [s for s in d.train if s in self.corpus.sources]
        self.ood_sources = [s for s in d.eval_ood if s in self.corpus.sources]
        self.skipped_sources = [s for s in [*d.train, *d.eval_ood] if s not in self.corpus.sources]
        if not self.train_sources:
            raise ValueError(f"none of the training sources {list(d.train)} could be loaded")
        self._train_docs = [doc for s in self.train_sources for doc in self.corpus.train(s)]
        self._blocks = {d.seq_len: token_blocks(tokenizer, self._train_docs, d.seq_len)}
        self.train_blocks = self._blocks[d.seq_len]
        self.tokenizer = tokenizer
        self.recipe = recipe

    def stage_blocks(self, stage) -> torch.Tensor:
        """The training blocks of a stage config: of its `seq_len`, or data.seq_len where it has none."""
        from zoo.data import token_blocks

        length = stage.seq_len or self.recipe.data.seq_len
        if length not in self._blocks:
            self._blocks[length] = token_blocks(self.tokenizer, self._train_docs, length)
        return self._blocks[length]

    def evaluate(self, model) -> dict:
        from zoo.evaluate import evaluate_corpus

        e = self.recipe.eval
        per = evaluate_corpus(
            model,
            self.tokenizer,
            self.corpus,
            self.train_sources + self.ood_sources,
            self.recipe.data.seq_len,
            e.max_blocks,
        )
        return {
            "heldout": pooled({s: per[s] for s in self.train_sources}),
            "ood": pooled({s: per[s] for s in self.ood_sources}) if self.ood_sources else None,
            "per_source": per,
        }

    def long_context_documents(self) -> dict[str, list]:
        """Source -> held-out documents, for the long-context measures: the training corpora, then the
        out-of-domain ones."""
        return {s: self.corpus.heldout(s) for s in self.train_sources + self.ood_sources}

    def generation_documents(self) -> list:
        """Held-out documents of the training corpora, taking each corpus in turn: the prompts to continue."""
        by_source = [self.corpus.heldout(s) for s in self.train_sources]
        return [
            docs[i] for i in range(max(map(len, by_source), default=0)) for docs in by_source if i < len(docs)
        ]

    def passkey_filler(self) -> list:
        """Held-out documents to hide passkeys in: the out-of-domain corpora's, else the training
        corpora's."""
        return [doc for s in (self.ood_sources or self.train_sources) for doc in self.corpus.heldout(s)]
