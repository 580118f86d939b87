"""Stage-2 distillation: the teacher computed inside the linearized model, the KL term, and its use in
training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from zoo_testing import FAMILIES, tiny_model

import zoo
from zoo.transfer.loop import LoopConfig
from zoo.transfer.stage2 import (
    add_lora,
    as_teacher,
    check_lora_fits,
    next_token_loss,
    run_stage2,
    stage2_loss,
    teacher_kl,
)

MIXERS = zoo.list_mixers()


def student_of(teacher, mixer: str, layers=None, lora: bool = True):
    """`teacher` linearized (its own copy) and, with `lora`, wrapped in LoRA whose B matrices are not
    zero, so the adapters change the output."""
    model = copy.deepcopy(teacher)
    torch.manual_seed(1)
    zoo.linearize(model, mixer, layers=layers)
    if not lora:
        return model.eval()
    model = add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


@pytest.mark.parametrize("mixer", MIXERS)
def test_as_teacher_gives_the_untouched_teachers_logits(mixer):
    teacher = tiny_model("llama").eval()
    student = student_of(teacher, mixer)
    ids = torch.randint(3, 128, (2, 19))
    with torch.no_grad():
        expected = teacher(ids).logits
        own = student(input_ids=ids, use_cache=False).logits
        with as_teacher(student):
            inside = student(input_ids=ids, use_cache=False).logits
        after = student(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    assert (own - expected).abs().max() > 1e-3  # the student is not the teacher outside the block
    torch.testing.assert_close(after, own, atol=0, rtol=0)  # and is itself again after it


@pytest.mark.parametrize("family", FAMILIES)
def test_as_teacher_in_every_family_with_some_layers_converted(family):
    teacher = tiny_model(family, num_hidden_layers=3).eval()
    student = student_of(teacher, "gated-delta", layers=[0, 2])
    plain = student_of(teacher, "hedgehog", lora=False)  # no peft wrapper: nothing to switch off
    ids = torch.randint(3, 128, (2, 17))
    with torch.no_grad():
        expected = teacher(ids).logits
        for model in (student, plain):
            with as_teacher(model):
                torch.testing.assert_close(
                    model(input_ids=ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5
                )


def test_as_teacher_restores_the_student_when_the_block_raises():
    student = student_of(tiny_model("llama").eval(), "hedgehog")
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        own = student(input_ids=ids, use_cache=False).logits
        with pytest.raises(RuntimeError, match="boom"), as_teacher(student):
            raise RuntimeError("boom")
        torch.testing.assert_close(student(input_ids=ids, use_cache=False).logits, own, atol=0, rtol=0)


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mixer", ["hedgehog", "lolcats", "gated-delta"])
def test_as_teacher_with_the_references_lora_is_the_fine_tuned_teacher(mixer):
    """The fair reference (the teacher + its own LoRA) computed inside the student, whose LoRA is back
    after."""
    teacher = tiny_model("llama").eval()
    torch.manual_seed(5)
    reference = add_lora(copy.deepcopy(teacher), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    student = student_of(teacher, mixer)
    own = lora_tensors(student)
    ids = torch.randint(3, 128, (2, 15))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert (expected - teacher(ids).logits).abs().max() > 1e-3  # the reference's LoRA matters
        before = student(input_ids=ids, use_cache=False).logits
        with as_teacher(student, lora_tensors(reference)):
            inside = student(input_ids=ids, use_cache=False).logits
        after = student(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(inside, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    for name, value in lora_tensors(student).items():
        torch.testing.assert_close(value, own[name], atol=0, rtol=0)


def test_distilling_from_the_reference_trains_the_students_lora(tmp_path):
    teacher = tiny_model("llama").eval()
    reference = lora_tensors(student_of(teacher, "softmax"))  # the same LoRA names as any student's
    student = student_of(teacher, "hedgehog")
    blocks = torch.randint(3, 128, (4, 16))
    loss, extra = stage2_loss(student, 1.0, reference)(blocks[:2])
    loss.backward()  # the swap happened before the student's forward: autograd saw no in-place change
    assert extra["kl"] > 0 and all(p.grad is not None for n, p in student.named_parameters() if "lora_" in n)
    cfg = LoopConfig(
        name="stage2", tokens=4 * 16 * 2, batch_size=2, lr=1e-2, log_every=1, checkpoint_every=100
    )
    start = lora_tensors(student)
    run_stage2(student, blocks, cfg, tmp_path, distill=1.0, teacher_lora=reference)
    moved = lora_tensors(student)
    assert all(not torch.equal(moved[n], start[n]) for n in start if "lora_A" in n)
    assert all(not torch.equal(moved[n], reference[n]) for n in reference)


def test_a_reference_lora_that_does_not_fit_is_a_clear_error():
    student = student_of(tiny_model("llama"), "hedgehog")
    fits = lora_tensors(student)
    with pytest.raises(ValueError, match="holds no tensor"):
        check_lora_fits(student, {})
    name = next(iter(fits))
    with pytest.raises(ValueError, match="other shapes"):
        check_lora_fits(student, {name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="not LoRA parameters of the model"):
        stage2_loss(student, 1.0, {"model.embed_tokens.weight": torch.zeros(1)})
    check_lora_fits(student, fits)


def test_teacher_kl_is_the_mean_kl_over_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / 14
    torch.testing.assert_close(teacher_kl(s, t), expected)
    assert teacher_kl(t, t).abs() < 1e-6 and teacher_kl(s, t) > 0


def test_distill_loss_is_next_token_loss_plus_weighted_kl_and_trains_only_the_student():
    teacher = tiny_model("llama").eval()
    student = student_of(teacher, "hedgehog")
    ids = torch.randint(3, 128, (2, 16))
    loss, extra = stage2_loss(student, distill=0.5)(ids)
    with torch.no_grad():
        ce = next_token_loss(student, ids)
        kl = teacher_kl(student(input_ids=ids, use_cache=False).logits, teacher(ids).logits)
    torch.testing.assert_close(loss.detach(), ce + 0.5 * kl)
    assert extra["ce"] == pytest.approx(ce.item(), rel=1e-5) and extra["kl"] == pytest.approx(
        kl.item(), rel=1e-5
    )
    loss.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    plain, plain_extra = stage2_loss(student, distill=0.0)(ids)
    torch.testing.assert_close(plain.detach(), ce)
    assert plain_extra == {}


def test_bad_distill_input_is_a_clear_error():
    with pytest.raises(ValueError, match="stage2.distill must be >= 0"):
        stage2_loss(student_of(tiny_model("llama"), "hedgehog"), distill=-1.0)
    with pytest.raises(ValueError, match="needs a converted model"):
        stage2_loss(add_lora(tiny_model("llama"), rank=4, alpha=8), distill=1.0)


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    """The same stage 2 with and without the KL term: with it, the student ends closer to the teacher
    than it started; without it (the next-token loss on random tokens), it drifts away."""
    torch.manual_seed(0)
    teacher = tiny_model("llama").eval()
    start = student_of(teacher, "hedgehog")
    blocks = torch.randint(3, 128, (8, 24))
    cfg = LoopConfig(
        name="stage2", tokens=8 * 24 * 3, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=100
    )

    def kl_to_teacher(model) -> float:
        with torch.no_grad():
            return teacher_kl(model(input_ids=blocks, use_cache=False).logits, teacher(blocks).logits).item()

    def kl_after(distill: float) -> float:
        student = copy.deepcopy(start)
        run_stage2(student, blocks, cfg, tmp_path / f"d{distill}", distill=distill)
        return kl_to_teacher(student)

    kl_start = kl_to_teacher(start)
    distilled, plain = kl_after(50.0), kl_after(0.0)
    assert distilled < kl_start < plain
    logged = (tmp_path / "d50.0" / "metrics.jsonl").read_text()
    assert '"kl"' in logged and '"ce"' in logged
