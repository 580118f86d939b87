"""Stage 2, LoRA: low-rank adapters on q/k/v/o recover quality with the next-token loss; the mixers'
own parameters train too when the recipe asks."""

from __future__ import annotations

from pathlib import Path

import torch
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


def run_stage2(model: nn.Module, blocks: torch.Tensor, cfg: LoopConfig, run_dir: Path, device="cpu") -> dict:
    """Fine-tune the trainable parameters of a model from `add_lora` with the next-token loss."""
    return train_loop(model, blocks, cfg, lambda batch: (next_token_loss(model, batch), {}), run_dir, device=device)
