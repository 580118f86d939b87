"""The engine, tested over the whole registry on tiny Llama, Mistral, Qwen2 and Qwen3 models.

A newly registered mixer is tested here by what already exists."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo_testing import FAMILIES, tiny_model

import zoo
from zoo.cache import ZooCache
from zoo.mixers import Mixer, register_mixer
from zoo.transfer.loop import LoopConfig
from zoo.transfer.stage1 import layer_mse, run_stage1
from zoo.transfer.stage2 import add_lora, run_stage2

MIXERS = zoo.list_mixers()
TOL = dict(atol=2e-4, rtol=1e-3)


def small_options(mixer: str) -> dict:
    """The mixer's own test options (short windows, few taps, small features): far shorter than the test
    sequences, so the linear part of a hybrid, the chunk edges and the carried state are all exercised."""
    return dict(zoo.get_mixer(mixer).test_options)


def converted(family: str, mixer: str, seed: int = 0, **kw):
    model = tiny_model(family, seed=seed, **kw)
    torch.manual_seed(seed + 1)
    zoo.linearize(model, mixer, **small_options(mixer))
    return model.eval()


def test_registry_lists_builtins():
    for name in (
        "softmax",
        "linear-elu",
        "t2r",
        "hedgehog",
        "lolcats",
        "lolcats-terraced",
        "gla",
        "liger-gla",
        "liger",
        "retention",
        "delta",
        "gated-delta",
        "gated-delta-conv",
        "mamba2",
        "flow",
        "based",
        "based-window",
    ):
        assert name in MIXERS, f"{name} is not registered"


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_mixer("softmax")
        class Another(Mixer):
            pass


def test_unknown_mixer_lists_registered():
    with pytest.raises(KeyError, match="registered mixers: .*softmax"):
        zoo.get_mixer("no-such-mixer")


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown option"):
        zoo.linearize(tiny_model("llama"), "softmax", window=3)


def test_unsupported_family_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supported families: llama, mistral, qwen2, qwen3"):
        zoo.linearize(model, "softmax")


def test_layers_subset_and_freezing():
    model = tiny_model("llama", num_hidden_layers=3)
    zoo.linearize(model, "hedgehog", layers=[0, 2])
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LinearizedAttention", "LlamaAttention", "LinearizedAttention"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mixer." in n for n in trainable)
    assert model.config.zoo_mixers[1] is None
    with pytest.raises(ValueError, match="out of range"):
        zoo.linearize(tiny_model("llama"), "softmax", layers=[5])


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_reproduces_teacher(family):
    teacher = tiny_model(family)
    model = copy.deepcopy(teacher)
    zoo.linearize(model, "softmax")
    ids = torch.randint(3, 128, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_split_and_carry(mixer, family):
    """Prefill a prefix, then the rest with the carried state: the same logits as one pass."""
    model = converted(family, mixer)
    ids = torch.randint(3, 128, (2, 29))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        first = model(ids[:, :11], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, ZooCache) and cache.get_seq_length() == 11
        second = model(ids[:, 11:28], past_key_values=cache, use_cache=True)
        third = model(ids[:, 28:], past_key_values=second.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), whole, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_with_cache_equals_recompute(mixer, family):
    model = converted(family, mixer)
    prompt = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert cached.tolist() == seq.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_batched_left_padding_equals_one_by_one(mixer, family):
    model = converted(family, mixer)
    prompts = [torch.randint(3, 128, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert batched[i, width:].tolist() == alone[0, len(p) :].tolist(), f"prompt {i} differs"


@pytest.mark.parametrize("mixer", MIXERS)
def test_sampling_generate_runs(mixer):
    model = converted("llama", mixer)
    torch.manual_seed(0)
    out = model.generate(
        torch.randint(3, 128, (2, 5)), max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0
    )
    assert out.shape == (2, 10)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_save_then_load_gives_identical_logits(mixer, family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = converted(family, mixer)
    with torch.no_grad():  # perturb the mixer so a reload of fresh initial values would show
        for name, p in model.named_parameters():
            if ".mixer." in name:
                p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(3, 128, (2, 19))
    with torch.no_grad():
        ref = model(ids).logits
    zoo.save_linearized(model, None, tmp_path / "m")
    loaded, tokenizer = zoo.load_linearized(tmp_path / "m")
    assert tokenizer is None and type(loaded).__name__ == type(model).__name__
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=0, rtol=0)
        torch.testing.assert_close(auto(ids).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", MIXERS)
def test_stage1_lowers_every_layer_mse(mixer, family, tmp_path):
    model = converted(family, mixer)
    if not any(p.requires_grad for p in model.parameters()):
        before = layer_mse(model, torch.randint(3, 128, (4, 32)))
        if mixer == "softmax":
            assert max(before.values()) < 1e-10  # the teacher itself: nothing to learn
        pytest.skip(f"{mixer} has no trainable parameters")
    torch.manual_seed(0)
    blocks = torch.randint(3, 128, (16, 32))
    before = layer_mse(model, blocks)
    cfg = LoopConfig(
        name="stage1", tokens=16 * 32 * 3, batch_size=4, lr=1e-2, log_every=100, checkpoint_every=100
    )
    stats = run_stage1(model, blocks, cfg, tmp_path)
    after = layer_mse(model, blocks)
    assert stats["steps"] == 12
    for idx in before:
        assert after[idx] < before[idx], f"layer {idx}: MSE {before[idx]:.3g} -> {after[idx]:.3g}"


def test_stage1_attention_cross_entropy_runs(tmp_path):
    model = converted("llama", "hedgehog")
    blocks = torch.randint(3, 128, (8, 16))
    cfg = LoopConfig(name="stage1", tokens=8 * 16, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=100)
    stats = run_stage1(model, blocks, cfg, tmp_path, attention_ce=1.0, attention_ce_max_len=32)
    assert stats["steps"] == 2 and stats["final_loss"] > 0


@pytest.mark.parametrize("train_mixer", [False, True])
def test_stage2_trains_only_lora_and_asked_mixers(train_mixer, tmp_path):
    model = converted("llama", "hedgehog")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = add_lora(model, rank=4, alpha=8, train_mixer=train_mixer)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert all("lora_" in n or (train_mixer and ".mixer." in n) for n in trainable)
    assert any(".mixer." in n for n in trainable) == train_mixer
    for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{target}.lora_A" in n for n in trainable)
    blocks = torch.randint(3, 128, (8, 16))
    cfg = LoopConfig(
        name="stage2", tokens=8 * 16 * 2, batch_size=4, lr=1e-2, log_every=100, checkpoint_every=100
    )
    run_stage2(peft_model, blocks, cfg, tmp_path)
    merged = peft_model.merge_and_unload()
    for n, p in merged.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".mixer." in n:
            assert changed == train_mixer, n
        elif not any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj")):
            assert not changed, f"{n} changed but is frozen"


def test_interrupted_loop_resumes_to_the_same_result(tmp_path):
    """A loop killed after its step-3 checkpoint resumes there and ends where an uninterrupted one ends."""
    from zoo.transfer.loop import train_loop
    from zoo.transfer.stage2 import next_token_loss

    blocks = torch.randint(3, 128, (8, 16))
    cfg = LoopConfig(name="stage2", tokens=8 * 16 * 2, batch_size=2, lr=1e-2, log_every=1, checkpoint_every=3)

    def fresh():
        torch.manual_seed(0)
        return add_lora(converted("llama", "hedgehog"), rank=4, alpha=8)

    full = fresh()
    run_stage2(full, blocks, cfg, tmp_path / "full")

    interrupted = fresh()
    steps = {"n": 0}

    def dies_at_step_5(batch):
        steps["n"] += 1
        if steps["n"] == 5:
            raise KeyboardInterrupt
        return next_token_loss(interrupted, batch), {}

    with pytest.raises(KeyboardInterrupt):
        train_loop(interrupted, blocks, cfg, dies_at_step_5, tmp_path / "cut")
    resumed = fresh()
    stats = run_stage2(resumed, blocks, cfg, tmp_path / "cut")
    assert stats["steps"] == 8
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    logged = [line for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 8  # the rows past the checkpoint were dropped, then written again


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    from zoo.transfer.loop import NaNLossError, train_loop

    model = converted("llama", "hedgehog")
    blocks = torch.randint(3, 128, (4, 16))
    cfg = LoopConfig(name="stage1", tokens=4 * 16 * 4, batch_size=2, lr=1e-2, log_every=1, checkpoint_every=1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        p = next(p for p in model.parameters() if p.requires_grad)
        loss = p.sum() * 0 + (float("nan") if calls["n"] == 3 else 1.0)
        return loss, {}

    with pytest.raises(NaNLossError, match="step 3.*last good checkpoint"):
        train_loop(model, blocks, cfg, loss_fn, tmp_path)
    import json

    assert json.loads((tmp_path / "checkpoints" / "stage1" / "trainer.json").read_text())["step"] == 2


def test_empty_blocks_are_an_error(tmp_path):
    from zoo.transfer.loop import train_loop

    with pytest.raises(ValueError, match="no training blocks"):
        train_loop(
            converted("llama", "hedgehog"),
            torch.zeros(0, 16, dtype=torch.long),
            LoopConfig(name="stage1", tokens=10, batch_size=1, lr=1e-3),
            lambda b: None,
            tmp_path,
        )


@pytest.mark.parametrize("mixer", MIXERS)
def test_linear_state_does_not_grow(mixer):
    """A linear mixer's decode state is constant in size; a window hybrid keeps only its window."""
    model = converted("llama", mixer)
    cache = None
    sizes = []
    with torch.no_grad():
        out = model(torch.randint(3, 128, (1, 8)), use_cache=True)
        cache = out.past_key_values
        for _ in range(200):
            out = model(torch.randint(3, 128, (1, 1)), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            sizes.append(cache.state_bytes())
    family = zoo.get_mixer(mixer).family
    if family == "softmax":
        assert sizes[-1] > sizes[0]
    else:
        assert sizes[-1] == sizes[-100], f"{mixer} state grew from {sizes[-100]} to {sizes[-1]} bytes"
