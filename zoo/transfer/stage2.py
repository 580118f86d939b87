"""Stage 2, LoRA: low-rank adapters on q/k/v/o recover quality with the next-token loss; the mixers'
own parameters train too when the recipe asks. Optionally distilled: a KL term pulls the model's
next-token distribution toward the teacher's, which lives inside the same model (softmax attention in
every converted layer, LoRA off, or the fair reference's LoRA in its place), so distillation costs one
extra forward and no second copy of the weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.convert import linearized_layers, softmax_teacher
from zoo.transfer.loop import LoopConfig, train_loop


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    train_mixer: bool = False,
) -> nn.Module:
    """Wrap `model` with peft LoRA on `targets`; only LoRA (and, if asked, mixer) parameters train."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif ".mixer." in name:
            p.requires_grad_(train_mixer)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer during the backward pass instead of keeping its activations
    (non-reentrant checkpointing: works through peft and FSDP2). Same results, less memory."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


@contextmanager
def as_teacher(model: nn.Module, lora: dict[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` computes the teacher: softmax attention in every converted layer
    (zoo.convert.softmax_teacher) and, where `model` is a peft model, its adapters off (the projections
    under them are the teacher's).

    With `lora` (parameter name -> tensor, as the fair reference's checkpoint holds them), the teacher
    is the teacher fine-tuned with that LoRA: those weights stand in for the model's own LoRA within
    the block, copied in place, so open it before the model's own forward of a step, not between that
    forward and its backward."""
    _require_converted(model)
    if lora is None:
        adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    else:
        adapters = _lora_swapped_in(model, lora)
    with adapters, softmax_teacher(model):
        yield model


def _require_converted(model: nn.Module) -> None:
    if not linearized_layers(model):
        raise ValueError(
            "distillation needs a converted model (zoo.linearize): this one has no converted layer"
        )


@contextmanager
def _lora_swapped_in(model: nn.Module, lora: dict[str, torch.Tensor]) -> Iterator[None]:
    params = dict(model.named_parameters())
    own = {}
    with torch.no_grad():
        try:
            for name, value in lora.items():
                own[name] = params[name].detach().clone()
                params[name].copy_(value)
            yield
        finally:
            for name, value in own.items():
                params[name].copy_(value)


def check_lora_fits(model: nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """A clear error unless every tensor of `lora` is a LoRA parameter of `model` with the same shape."""
    if not lora:
        raise ValueError("the reference LoRA holds no tensor")
    params = dict(model.named_parameters())
    unknown = [n for n in lora if n not in params or "lora_" not in n]
    wrong = [n for n in lora if n in params and params[n].shape != lora[n].shape]
    if unknown or wrong:
        raise ValueError(
            "the reference LoRA does not fit this model's LoRA (it needs the same stage2.lora "
            f"settings): not LoRA parameters of the model {unknown[:3]}, other shapes {wrong[:3]}"
        )


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions; logits [B, T, V]."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def stage2_loss(
    model: nn.Module, distill: float = 0.0, teacher_lora: dict[str, torch.Tensor] | None = None
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
    """loss_fn for train_loop: the next-token loss, plus `distill` x the KL to the teacher's next-token
    distribution when `distill` > 0 (both parts logged). With `teacher_lora`, the teacher is the teacher
    fine-tuned with that LoRA (see `as_teacher`)."""
    if distill < 0:
        raise ValueError(f"stage2.distill must be >= 0 (0 = off), got {distill}")
    if distill == 0:
        return lambda batch: (next_token_loss(model, batch), {})
    _require_converted(model)  # clear errors now rather than at the first step
    if teacher_lora is not None:
        check_lora_fits(model, teacher_lora)

    def loss_fn(batch: torch.Tensor):
        with torch.no_grad(), as_teacher(model, teacher_lora):  # first: its LoRA swap must precede the graph
            teacher_logits = model(input_ids=batch, use_cache=False).logits
        out = model(input_ids=batch, labels=batch, use_cache=False)
        kl = teacher_kl(out.logits, teacher_logits)
        return out.loss + distill * kl, {"ce": out.loss.item(), "kl": kl.item()}

    return loss_fn


def run_stage2(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: LoopConfig,
    run_dir: Path,
    device="cpu",
    distill: float = 0.0,
    teacher_lora: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Fine-tune the trainable parameters of a model from `add_lora` with the next-token loss
    (+ `distill` x the KL to the teacher, or to the teacher + `teacher_lora`)."""
    return train_loop(model, blocks, cfg, stage2_loss(model, distill, teacher_lora), run_dir, device=device)


def with_stage2_lora(model: nn.Module, stage2, seed: int) -> nn.Module:
    """`model` with stage 2's LoRA (`stage2`: a recipe's Stage2Config) added, and gradient checkpointing if
    it asks. LoRA's random init is seeded from `seed` alone, so it does not depend on what ran before."""
    torch.manual_seed(seed + 1)
    model = add_lora(
        model,
        stage2.lora.rank,
        stage2.lora.alpha,
        stage2.lora.dropout,
        stage2.lora.targets,
        stage2.train_mixer,
    )
    if stage2.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
