"""Stage 2 at scale: LoRA fine-tuning under FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each decoder layer and then the whole model are sharded over the ranks, so each GPU holds 1/world
of the weights between uses. The recipe's global batch (stage2.batch_size sequences) is split
evenly over the ranks; FSDP averages the gradients, which makes a step the same as one process
taking the whole batch. Checkpoints gather the sharded LoRA weights and optimizer state into the
same safetensors files a single process writes (rank 0 writes them), so a run resumes on any
number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from zoo.scale.dist import Distributed
from zoo.transfer.loop import CheckpointIO, LoopConfig, train_loop
from zoo.transfer.stage2 import stage2_loss


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoint I/O for FSDP2 models: whole tensors gathered on every rank, written by rank 0,
    re-sharded like their parameter when read back."""

    def __init__(self, ctx: Distributed):
        self.ctx = ctx
        self.writes = ctx.is_main

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        return tensor.detach().cpu().contiguous()

    def place(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(like, DTensor):
            local = full.detach().to(like.to_local().device, like.dtype)
            return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
        return full.to(like.device, like.dtype)

    def barrier(self) -> None:
        self.ctx.barrier()


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, through a peft wrapper if there is one."""
    return _causal_lm(model).model.layers


def shard_model(model: nn.Module, ctx: Distributed, dtype: torch.dtype) -> nn.Module:
    """`fully_shard` each decoder layer, then the root, over all ranks (in place; returns `model`).

    In bf16/fp16 the weights are all-gathered in that dtype and gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    policy = (
        MixedPrecisionPolicy()
        if dtype == torch.float32
        else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # generate() calls the inner model's forward, not the root's: the root's own weights (embeddings,
    # final norm, LM head) must be gathered around it too
    register_fsdp_forward_method(model, "generate")
    return model


def load_sharded(ctx: Distributed, build_full, build_meta, dtype: torch.dtype) -> nn.Module:
    """A model sharded over all ranks with rank 0's weights: rank 0 builds it whole in host memory
    (`build_full()`), the other ranks only its structure on the meta device (`build_meta()`), all
    shard it, and rank 0's tensors are broadcast into everyone's shards. One copy of the model in
    host memory for the whole launch, not one per rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = build_full() if ctx.is_main else build_meta()
    full = dict(model.state_dict()) if ctx.is_main else {}  # holds the whole tensors until broadcast
    shard_model(model, ctx, dtype)
    if not ctx.is_main:
        model.to_empty(device=ctx.device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full
    base = _causal_lm(model).model  # RoPE's buffers are in no state dict: rebuilt on every rank
    base.rotary_emb = type(base.rotary_emb)(base.config).to(ctx.device)
    return model


def data_parallel_loss(local_loss, ctx: Distributed):
    """loss_fn for train_loop from `local_loss` (a loss_fn for one process): this rank's share of the
    global batch; the value returned is the global batch's mean loss (the same on every rank), its
    gradient this rank's share's. The extra numbers logged are this rank's."""

    def loss_fn(batch: torch.Tensor):
        if batch.shape[0] % ctx.world:
            raise ValueError(
                f"stage2.batch_size={batch.shape[0]} must be a multiple of the number of ranks "
                f"({ctx.world}): each rank takes an equal share of every batch"
            )
        loss, extra = local_loss(batch.chunk(ctx.world)[ctx.rank])
        total = loss.detach().clone()
        dist.all_reduce(total)
        return loss + (total / ctx.world - loss.detach()), extra

    return loss_fn


def run_sharded_stage2(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: LoopConfig,
    run_dir,
    ctx: Distributed,
    distill: float = 0.0,
    teacher_lora: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Stage 2 on an FSDP2-sharded model from `shard_model` (every rank calls it with the same data).
    `teacher_lora` (whole tensors by parameter name, as a checkpoint holds them) is sharded like the
    model's own LoRA before distilling from it."""
    io = ShardedCheckpointIO(ctx)
    if teacher_lora is not None:
        params = dict(model.named_parameters())
        teacher_lora = {n: io.place(t, params[n]) if n in params else t for n, t in teacher_lora.items()}
    return train_loop(
        model,
        blocks,
        cfg,
        data_parallel_loss(stage2_loss(model, distill, teacher_lora), ctx),
        run_dir,
        device=ctx.device,
        io=io,
    )
