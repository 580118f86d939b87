"""English-like text and a small tokenizer made with no download: for checks that must train where no
corpus or hub can be reached (`zoo bench gpu`'s training step on a lent GPU, and the test suite)."""

from __future__ import annotations

import random
from pathlib import Path

#: common English words; sentences of them give text a tokenizer and a language model can learn from
WORDS = (
    "the of and to a in that he was it his for with as had you not be her on at by which have or from "
    "this him but all she they were my are me one their so an said them we who would been will no when "
    "there if more out up into do any your what has man could other than our some very time upon about "
    "may its only now like little then can should made did us such great before must two these see "
    "know over much down after first mr good men own never most old shall day where those came come "
    "himself way work life without go make well through being long say might how am too even def "
    "lady house mother father sister letter morning evening walk garden road river king people city"
).split()


def write_text_files(folder: Path, n_files: int, words_per_file: int, seed: int) -> list[Path]:
    """`n_files` files doc000.txt ... in `folder` of about `words_per_file` words each: sentences of 5 to 14
    of `WORDS`, the same for the same seed."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        sentences, count = [], 0
        while count < words_per_file:
            n = rng.randint(5, 14)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
            count += n
        path = folder / f"doc{i:03d}.txt"
        path.write_text(" ".join(sentences) + "\n")
        paths.append(path)
    return paths


def small_bpe_tokenizer(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE of `vocab_size` tokens (256 bytes, the merges, <pad> <eos> <bos>) trained on
    `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
