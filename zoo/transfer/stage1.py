"""Stage 1, attention transfer: each converted layer's mixer learns to reproduce the teacher's
softmax attention output (MSE), teacher-forced: the teacher's output is what flows on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zoo.convert import LinearizedAttention, freeze_all_but_mixers, linearized_layers, teacher_forced
from zoo.transfer.loop import LoopConfig, train_loop


def converted_attention(model: nn.Module) -> dict[int, LinearizedAttention]:
    """The converted layers of `model` (or of a wrapper around it) by layer index, in order."""
    found = {layer.layer_idx: layer for layer in linearized_layers(model)}
    if not found:
        raise ValueError("the model has no converted layer: call zoo.linearize(model, mixer) first")
    return dict(sorted(found.items()))


def transfer_losses(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    attention_ce: float = 0.0,
    attention_ce_max_len: int = 128,
    inputs_embeds: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """One teacher-forced forward (zoo.convert.teacher_forced); returns each converted layer's transfer
    loss (MSE of the attention output after o_proj, plus the optional attention-weight cross-entropy).

    Give `input_ids` [B, T], or `inputs_embeds` [B, T, hidden] to start from given hidden states
    (block-wise transfer feeds a block the stored teacher states entering it this way)."""
    converted = converted_attention(model)
    with teacher_forced(
        model, attention_ce=attention_ce, attention_ce_max_len=attention_ce_max_len, mask=attention_mask
    ) as losses:
        # run the decoder only up to the last converted layer: later layers and the LM head teach nothing
        handle = converted[max(converted)].register_forward_hook(_stop_forward)
        try:
            model.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                use_cache=False,
            )
        except _LastConvertedLayerDone:
            pass
        finally:
            handle.remove()
        return dict(sorted(losses.items()))


class _LastConvertedLayerDone(Exception):
    """Raised after the last converted layer's forward: nothing later in the model is needed."""


def _stop_forward(module, args, output):
    raise _LastConvertedLayerDone


def run_stage1(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: LoopConfig,
    run_dir: Path,
    attention_ce: float = 0.0,
    attention_ce_max_len: int = 128,
    device="cpu",
) -> dict:
    """Train only the mixers' parameters by attention transfer. Logs the per-layer losses.

    `blocks` holds token ids [N, T], or hidden states entering the first layer held (block-wise
    transfer: zoo.scale.store.StoredInputs, whose batches are [B, T, hidden] floats)."""
    freeze_all_but_mixers(model)

    def loss_fn(batch):
        hidden = batch.is_floating_point()
        losses = transfer_losses(
            model,
            None if hidden else batch,
            attention_ce=attention_ce,
            attention_ce_max_len=attention_ce_max_len,
            inputs_embeds=batch if hidden else None,
        )
        total = torch.stack(list(losses.values())).sum()
        return total, {"layer_loss": {str(i): round(v.item(), 8) for i, v in losses.items()}}

    return train_loop(model, blocks, cfg, loss_fn, run_dir, device=device)


@torch.no_grad()
def layer_mse(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Mean per-layer transfer MSE over `blocks` (no training)."""
    was_training = model.training
    model.eval()
    sums: dict[int, float] = {}
    n = 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(next(model.parameters()).device)
        for idx, loss in transfer_losses(model, batch).items():
            sums[idx] = sums.get(idx, 0.0) + loss.item() * batch.shape[0]
        n += batch.shape[0]
    model.train(was_training)
    return {idx: s / n for idx, s in sums.items()}
