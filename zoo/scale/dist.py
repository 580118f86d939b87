"""The torch.distributed context of a run: which rank this process is, of how many, on which device.

A process started by `torchrun` finds RANK, WORLD_SIZE and LOCAL_RANK in its environment and joins
the process group (NCCL on GPUs, gloo on CPUs); a plain process is rank 0 of 1 and joins nothing.
Coordination (barriers, small objects) always goes over a gloo group, so a rank that finishes its
blocks early can wait for the others for hours without tripping NCCL's watchdog. How long it may
wait is ZOO_DIST_TIMEOUT_MINUTES (default 1440: a day).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "ZOO_DIST_TIMEOUT_MINUTES"


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Distributed:
    """This process's place in the run. `world == 1` means no process group at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _coordination: Any = None  # the gloo group used for barriers and objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self._coordination)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._coordination)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1440")
    try:
        minutes = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 minutes, got {raw}")
    return timedelta(minutes=minutes)


def init_distributed(device: str = "auto") -> Distributed:
    """Join torchrun's process group if there is one. `device` is the recipe's: auto, cpu or cuda;
    with CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for, but no CUDA device is available; use device=cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world == 1:
        return Distributed(device=where)
    timeout = _timeout()
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timeout, device_id=where if use_cuda else None
        )
    coordination = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else dist.group.WORLD
    return Distributed(
        rank=rank, world=world, local_rank=local_rank, device=where, _coordination=coordination
    )
