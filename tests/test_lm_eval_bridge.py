"""The lm-evaluation-harness bridge on a linearized tiny model and a task of our own on a local
dataset (no network), checked against the same multiple-choice scoring done by hand."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from zoo_testing import tiny_model, tiny_tokenizer, write_text_files

import zoo
from zoo.lm_eval_bridge import run_lm_eval

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm_eval is not installed (pip install 'zoo-linearize[lmeval]')",
)

WORDS = ["yes", "no", "good", "old", "time", "house", "road", "day"]
CHOICES = ["man", "city", "river"]

TASK = """task: zoo_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def linearized(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    texts = [p.read_text() for p in write_text_files(root / "text", 4, 300, seed=1)]
    tokenizer = tiny_tokenizer(texts)
    model = tiny_model(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    zoo.linearize(model, "hedgehog")
    return model, tokenizer, root


def write_task(root) -> list[dict]:
    docs = [
        {"question": f"The king said {w} and the", "choices": CHOICES, "answer": i % 3}
        for i, w in enumerate(WORDS)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "tiny.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return docs


@torch.no_grad()
def accuracy_by_hand(model, tokenizer, docs) -> float:
    """lm_eval's multiple-choice rule: the choice whose " choice" continuation has the highest
    log-likelihood."""
    right = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer.encode(doc["question"], add_special_tokens=False)
            whole = tokenizer.encode(doc["question"] + " " + choice, add_special_tokens=False)
            continuation = whole[len(context) :]
            logits = (
                model(input_ids=torch.tensor([whole[:-1]]), use_cache=False).logits[0].float().log_softmax(-1)
            )
            scores.append(sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


@needs_lm_eval
def test_a_linearized_model_on_a_local_task(linearized, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer, root = linearized
    docs = write_task(root)
    out = run_lm_eval(model, tokenizer, ["zoo_tiny_choice"], include_path=root / "tasks")
    assert out["n_samples"]["zoo_tiny_choice"]["effective"] == len(docs)
    assert out["results"]["zoo_tiny_choice"]["acc,none"] == accuracy_by_hand(model, tokenizer, docs)
    json.dumps(out)  # plain values only


def test_without_lm_eval_the_error_says_how_to_install(linearized, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    model, tokenizer, _ = linearized
    with pytest.raises(RuntimeError, match=r"zoo-linearize\[lmeval\]"):
        run_lm_eval(model, tokenizer, ["anything"])
