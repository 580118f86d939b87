"""Stage 2, LoRA: low-rank adapters on q/k/v/o recover quality with the next-token loss; the mixers'
own parameters train too when the recipe asks. Optionally distilled: a KL term pulls the model's
next-token distribution toward the teacher's, which lives inside the same model (softmax attention in
every converted layer, LoRA off), so distillation costs one extra forward and no second copy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.transfer.loop import LoopConfig, train_loop


def add_lora(model: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
             targets=("q_proj", "k_proj", "v_proj", "o_proj"), train_mixer: bool = False) -> nn.Module:
    """Wrap `model` with peft LoRA on `targets`; only LoRA (and, if asked, mixer) parameters train."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
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


def _zoo_model(model: nn.Module) -> nn.Module:
    """The converted causal LM inside `model` (a peft wrapper, an FSDP-wrapped one, or the model itself)."""
    for module in model.modules():
        if hasattr(module, "_zoo_context"):
            return module
    raise ValueError("distillation needs a converted model (zoo.linearize): this one has no converted layer")


@contextmanager
def as_teacher(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes the teacher: softmax attention in every converted layer and,
    where `model` is a peft model, its adapters off (the projections under them are the teacher's)."""
    ctx = _zoo_model(model)._zoo_context()
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with adapters_off:
        ctx.softmax = True
        try:
            yield model
        finally:
            ctx.softmax = False


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions; logits [B, T, V]."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def stage2_loss(model: nn.Module, distill: float = 0.0) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
    """loss_fn for train_loop: the next-token loss, plus `distill` x the KL to the teacher's next-token
    distribution when `distill` > 0 (both parts logged)."""
    if distill < 0:
        raise ValueError(f"stage2.distill must be >= 0 (0 = off), got {distill}")
    if distill == 0:
        return lambda batch: (next_token_loss(model, batch), {})
    _zoo_model(model)  # a clear error now rather than at the first step

    def loss_fn(batch: torch.Tensor):
        out = model(input_ids=batch, labels=batch, use_cache=False)
        with torch.no_grad(), as_teacher(model):
            teacher_logits = model(input_ids=batch, use_cache=False).logits
        kl = teacher_kl(out.logits, teacher_logits)
        return out.loss + distill * kl, {"ce": out.loss.item(), "kl": kl.item()}
    return loss_fn


def run_stage2(model: nn.Module, blocks: torch.Tensor, cfg: LoopConfig, run_dir: Path, device="cpu",
               distill: float = 0.0) -> dict:
    """Fine-tune the trainable parameters of a model from `add_lora` with the next-token loss
    (+ `distill` x the KL to the teacher)."""
    return train_loop(model, blocks, cfg, stage2_loss(model, distill), run_dir, device=device)
