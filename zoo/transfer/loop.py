"""The training loop both stages share: deterministic batches, AdamW, atomic checkpoints, resume,
NaN guard, progress and metrics."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.atomic import ChecksumError, atomic_dir, atomic_file, verify_dir
from zoo.faults import fault_point


class NaNLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, changed since it was written, or holding
    non-finite weights. `stage` names the stage (the loop's name) whose checkpoint it is."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


#: the files of a checkpoint folder (an older zoo wrote them without a manifest)
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "trainer.json")


#: AdamW's own (beta1, beta2): every stage's default
ADAM_BETAS = (0.9, 0.999)


@dataclass(kw_only=True)
class TrainingConfig:
    """How a stage trains: the fields that recipes' stage sections (zoo.recipe) and the loop share."""

    tokens: int = 0  # training tokens (steps = tokens / (batch_size * seq_len))
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    lr_schedule: str = "constant"  # after the linear warm-up: "constant" or "cosine" (down to 10% of lr)
    adam_betas: list[float] = field(default_factory=lambda: list(ADAM_BETAS))  # AdamW's (beta1, beta2)
    checkpoint_every: int = 50  # optimizer steps; 0 = only at the end
    log_every: int = 10  # optimizer steps

    def loop(self, name: str, seed: int) -> LoopConfig:
        """The loop's config for a stage that trains as this one says, named `name`."""
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingConfig)}
        return LoopConfig(name=name, seed=seed, **shared)


@dataclass(kw_only=True)
class LoopConfig(TrainingConfig):
    """One run of `train_loop`: how it trains, what it is called and its seed."""

    name: str  # "stage1", "stage2", ...: names the checkpoint folder and the metrics rows
    seed: int = 0


def num_steps(tokens: int, batch_size: int, seq_len: int) -> int:
    return math.ceil(tokens / (batch_size * seq_len)) if tokens > 0 else 0


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Rows of the blocks tensor for `step`: epochs of seeded permutations, so a resumed run sees
    exactly the batches an uninterrupted one would."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n_blocks)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n_blocks, generator=g)
        take = min(batch_size - len(rows), n_blocks - offset)
        rows.extend(perm[offset : offset + take].tolist())
    return torch.tensor(rows)


LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(kind: str, lr: float, steps: int) -> Callable[[int], float]:
    """step -> learning rate: a linear warm-up over min(20, steps/10) steps, then `kind`. A pure
    function of the step, so a resumed run follows the same schedule."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")
    warmup = max(1, min(20, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if kind == "constant":
            return lr
        progress = (step - warmup) / max(1, steps - 1 - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return lr_at


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class CheckpointIO:
    """How `train_loop` turns parameters and optimizer state into whole CPU tensors for a checkpoint
    and back, and whether this process writes files. The default: one process, local tensors.
    Sharded training (FSDP2, zoo.scale.fsdp_lora) gathers and re-shards instead; every process
    calls `gather` (it may be collective) and only the writer writes."""

    writes = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().cpu().contiguous()

    def place(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`full` (as read from a checkpoint) laid out like `like` (device, dtype, sharding)."""
        return full.to(like.device, like.dtype)

    def barrier(self) -> None:
        """Wait until every process is here (after a checkpoint is written)."""


def _save_checkpoint(
    folder: Path,
    step: int,
    params: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    extra: dict,
    io: CheckpointIO,
) -> None:
    names = list(params)
    opt_tensors = {}
    for i, name in enumerate(names):
        for key, value in opt.state.get(params[name], {}).items():
            opt_tensors[f"{i}.{key}"] = io.gather(value)
    weights = {n: io.gather(p) for n, p in params.items()}
    if io.writes:
        with atomic_dir(folder, label=f"{folder.name}:{step}", known=CHECKPOINT_FILES) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "names": names, **extra}))
    io.barrier()


def read_checkpoint(folder: Path, name: str) -> tuple[dict, dict, dict]:
    """trainer.json, the weights and the optimizer tensors of a checkpoint, each checked: the folder's
    checksums (when it has them), readable files, finite weights. Any fault is a CheckpointError naming
    the file."""
    from safetensors import SafetensorError

    try:
        verify_dir(folder)
    except ChecksumError as err:
        raise CheckpointError(str(err), name) from None
    path = folder / "trainer.json"
    try:
        meta = json.loads(path.read_text())
        weights = load_file(str(path := folder / "trainable.safetensors"))
        opt_tensors = load_file(str(path := folder / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})", name) from None
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{folder / 'trainable.safetensors'}: non-finite weights in {bad[:3]}", name)
    return meta, weights, opt_tensors


def _load_checkpoint(
    folder: Path,
    params: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    io: CheckpointIO,
    name: str = "",
) -> dict:
    meta, weights, opt_tensors = read_checkpoint(folder, name or folder.name)
    if meta.get("names") != list(params):
        raise RuntimeError(
            f"checkpoint {folder} was written for other trainable parameters; "
            "delete it or use the recipe it was written with"
        )
    with torch.no_grad():
        for pname, p in params.items():
            p.copy_(io.place(weights[pname], p))
    for i, pname in enumerate(meta["names"]):
        p = params[pname]
        state = {key.split(".", 1)[1]: t for key, t in opt_tensors.items() if key.split(".", 1)[0] == str(i)}
        if state:
            # AdamW keeps `step` as a CPU scalar; the moments are laid out like their parameter
            opt.state[p] = {key: t.cpu() if key == "step" else io.place(t, p) for key, t in state.items()}
    return meta


def _trim_metrics(metrics_path: Path, name: str, after_step: int) -> None:
    """Drop rows of this stage past the checkpoint we resume from, so the log reads as one clean run."""
    if not metrics_path.exists():
        return
    kept = [
        line
        for line in metrics_path.read_text().splitlines()
        if line.strip()
        and not (json.loads(line).get("stage") == name and json.loads(line).get("step", 0) > after_step)
    ]
    with atomic_file(metrics_path) as f:
        f.write("".join(line + "\n" for line in kept))


def _resume(
    ckpt: Path,
    params: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    io: CheckpointIO,
    name: str,
    steps: int,
    metrics_path: Path,
) -> tuple[int, float, float | None]:
    """(step, seconds, loss) to go on from: the checkpoint's, or (0, 0.0, None) with none. Metrics rows past
    that step (all of them, starting afresh) were never kept, and are dropped."""
    start, seconds, loss = 0, 0.0, None
    if ckpt.exists():
        meta = _load_checkpoint(ckpt, params, opt, io, name)
        start, seconds, loss = meta["step"], meta.get("seconds", 0.0), meta.get("loss")
        if io.writes:
            print(f"zoo: {name}: resuming from step {start}/{steps} ({ckpt})", file=sys.stderr)
    if io.writes:
        _trim_metrics(metrics_path, name, start)
    return start, seconds, loss


def _log_step(
    metrics_path: Path,
    cfg: LoopConfig,
    done: int,
    steps: int,
    start: int,
    seq_len: int,
    elapsed: float,
    values: dict,
) -> None:
    """One metrics row (appended to metrics.jsonl) and one progress line with the speed and ETA."""
    tok_s = (done - start) * cfg.batch_size * seq_len / max(elapsed, 1e-9)
    eta = (steps - done) * elapsed / max(done - start, 1)
    row = {
        "stage": cfg.name,
        "step": done,
        "steps": steps,
        "loss": values["loss"],
        "tokens": done * cfg.batch_size * seq_len,
        "tokens_per_s": tok_s,
        **values,
    }
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"zoo: {cfg.name} step {done}/{steps} loss {values['loss']:.5g} {tok_s:,.0f} tok/s "
        f"ETA {_fmt_seconds(eta)}",
        file=sys.stderr,
        flush=True,
    )


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_loop(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: LoopConfig,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    run_dir: Path,
    device: torch.device | str = "cpu",
    io: CheckpointIO | None = None,
) -> dict:
    """Train the parameters of `model` that require grad on `blocks` [N, T].

    `blocks` is a tensor of token ids or anything with `.ndim`, `.shape` (N, T) and tensor indexing
    by a 1-D tensor of rows (zoo.scale.store.StoredInputs serves stored hidden states this way).
    `io` says how checkpoints are gathered and who writes them and the metrics (default: this
    process, local tensors).

    `loss_fn(batch)` returns the scalar loss and a dict of extra numbers to log. Checkpoints go to
    `run_dir/checkpoints/<name>` every `checkpoint_every` steps (atomically); an existing checkpoint
    is resumed. Returns {"steps", "tokens", "seconds", "final_loss"}.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"{cfg.name}: no training blocks (got a tensor of shape {tuple(blocks.shape)})")
    seq_len = blocks.shape[1]
    steps = num_steps(cfg.tokens, cfg.batch_size, seq_len)
    params = trainable_named(model)
    if steps == 0:
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "final_loss": None}
    if not params:
        raise ValueError(f"{cfg.name}: nothing to train (no parameter requires grad)")
    io = io or CheckpointIO()
    opt = torch.optim.AdamW(
        list(params.values()), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    lr_at = lr_schedule(cfg.lr_schedule, cfg.lr, steps)
    ckpt = run_dir / "checkpoints" / cfg.name
    metrics_path = run_dir / "metrics.jsonl"
    start, seconds_before, last_loss = _resume(ckpt, params, opt, io, cfg.name, steps, metrics_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    t0 = time.time()
    for step in range(start, steps):
        batch = blocks[batch_indices(step, cfg.batch_size, blocks.shape[0], cfg.seed)].to(device)
        loss, extra = loss_fn(batch)
        if not torch.isfinite(loss):
            model.eval()
            raise NaNLossError(
                f"{cfg.name}: the loss is {loss.item()} at step {step + 1}; the last good checkpoint "
                f"({ckpt if ckpt.exists() else 'none yet'}) is kept. Lower the learning rate "
                f"({cfg.name}.lr={cfg.lr}) or check the data."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        last_loss = loss.item()
        done = step + 1
        elapsed = time.time() - t0
        if io.writes and (done % cfg.log_every == 0 or done == steps):
            _log_step(
                metrics_path,
                cfg,
                done,
                steps,
                start,
                seq_len,
                elapsed,
                {"loss": last_loss, "lr": lr_at(step), **extra},
            )
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == steps:
            _save_checkpoint(
                ckpt, done, params, opt, {"seconds": seconds_before + elapsed, "loss": last_loss}, io
            )
        fault_point(f"{cfg.name}:{done}")  # the kill-and-resume tests crash here (zoo.faults)
    model.eval()
    seconds = seconds_before + (time.time() - t0)
    return {
        "steps": steps,
        "tokens": steps * cfg.batch_size * seq_len,
        "seconds": seconds,
        "final_loss": last_loss,
    }
