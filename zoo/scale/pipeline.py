"""`zoo run` at scale: a recipe with `stage1.blockwise`, or any recipe under torchrun.

    torchrun --standalone --nproc-per-node 8 -m zoo.cli run recipes/llama-3.1-70b/lolcats.yaml

Every rank runs this same function; what it does, in order (each step resumes where it stopped):

1. store    the teacher's hidden states entering each block, shards spread over the ranks
2. stage 1  block-wise attention transfer, blocks spread over the ranks; rank 0 stitches them
3. stage 2  LoRA under FSDP2 across all ranks (one process: no FSDP), evaluated before and after
4. output   rank 0 writes model/ (LoRA merged as the recipe says) and summary.json

The run folder (on a filesystem every rank sees) is the one `zoo run` writes, plus store/ (unless
stage1.blockwise.store names another folder), blocks/ and stage1/.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

from zoo.atomic import verify_dir, write_json
from zoo.devices import pick_dtype
from zoo.phases import FINAL_MEASURES, RunPhases
from zoo.recipe import Recipe
from zoo.run_data import RunData
from zoo.scale.blockwise import (
    STITCHED,
    derived_seed,
    linearize_layers,
    mixer_names,
    plan_blocks,
    stitch,
    train_blocks,
)
from zoo.scale.dist import Distributed, init_distributed
from zoo.scale.skeleton import CheckpointReader, checkpoint_folder
from zoo.scale.store import HiddenStateStore, StoreLayout, build_store, tokens_fingerprint
from zoo.transfer.loop import read_checkpoint

#: the measures a scaled run takes on the sharded teacher and model, all ranks in step: all of them but decode
#: speed (a timing of one device's decoding, which a sharded model does not show) and the long-context
#: measures (their free-window baseline is a converted copy of the whole teacher), which it refuses
SCALED_MEASURES = tuple(name for name in FINAL_MEASURES if name != "long_context")


def _say(ctx: Distributed, msg: str) -> None:
    if ctx.is_main:
        print(f"zoo: {msg}", file=sys.stderr, flush=True)


def check_supported(recipe: Recipe) -> None:
    if recipe.eval.decode_contexts:
        raise ValueError(
            "eval.decode_contexts: decode speed is not measured by block-wise or torchrun runs (a "
            "sharded model's decoding times no one device); set eval.decode_contexts=[] and time the "
            "saved model with `zoo eval DIR --decode ...`"
        )
    for stage in ("stage1", "stage2"):
        if getattr(recipe, stage).seq_len is not None:
            raise ValueError(
                f"{stage}.seq_len: block-wise and torchrun runs train every stage at data.seq_len; set "
                f"{stage}.seq_len=null"
            )
    if recipe.eval.long_context:
        raise ValueError(
            "eval.long_context: the long-context measures are not taken by block-wise or torchrun runs; set "
            "eval.long_context=0 and measure the saved model with `zoo eval DIR --long 2048`"
        )


def run_scaled(recipe: Recipe, out_dir: str | Path, redo: tuple[str, ...] = ()) -> dict | None:
    """Run `recipe` into `out_dir` as this rank's part of the launch. Rank 0 returns the summary,
    the other ranks None."""
    check_supported(recipe)
    ctx = init_distributed(recipe.device)
    try:
        return ScaledRun(recipe, Path(out_dir), ctx, redo).run()
    finally:
        ctx.close()


class ScaledRun(RunPhases):
    """One rank's part of a scaled run; every rank takes the same steps in the same order."""

    def __init__(self, recipe: Recipe, out: Path, ctx: Distributed, redo: tuple[str, ...] = ()):
        self.recipe, self.out, self.ctx, self.redo = recipe, out, ctx, redo
        self.dtype = pick_dtype(recipe.model.dtype, ctx.device)
        self.progress: dict = {}
        self.state = None  # rank 0's claim on the run folder (zoo.run_state)

    # ------------------------------------------------------------------------------ bookkeeping

    def remember(self, key: str, value):
        self.progress[key] = value
        if self.ctx.is_main:
            self.state.remember(key, value)
        return value

    def _prepare(self) -> dict | None:
        """Rank 0 claims the folder; every rank gets its progress. Returns a finished run's summary."""
        from zoo.run_state import open_run

        finished = None
        if self.ctx.is_main:
            self.state = open_run(self.recipe, self.out, self.redo)
            self.progress = self.state.progress
            finished = self.state.finished_summary
            checkpoint_folder(self.recipe.model.name)  # an embedded teacher is materialized once, here
        self.ctx.barrier()
        self.progress, finished = self.ctx.broadcast(
            (self.progress, finished)
        )  # every rank takes the same branches
        return finished

    # ------------------------------------------------------------------------------ the run

    def run(self) -> dict | None:
        t_start = time.time()
        try:
            finished = self._prepare()
            if finished is not None:
                _say(
                    self.ctx,
                    f"{self.out} is a finished run: its summary follows (--redo eval evaluates it again)",
                )
                return finished if self.ctx.is_main else None
            return self._run(t_start)
        finally:
            if self.state is not None:
                self.state.lock.release()

    def _run(self, t_start: float) -> dict | None:
        from transformers import AutoConfig, AutoTokenizer

        recipe, ctx = self.recipe, self.ctx
        self.folder = checkpoint_folder(recipe.model.name)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if ctx.is_main:  # rank 0 tokenizes (and caches) first; the others then read the cache
            self.data = RunData(recipe, self.tokenizer)
        ctx.barrier()
        if not ctx.is_main:
            self.data = RunData(recipe, self.tokenizer)
        num_layers = AutoConfig.from_pretrained(self.folder).num_hidden_layers
        self.converted = recipe.mixer.layer_indices(num_layers)
        _say(
            ctx,
            f"{ctx.world} process(es) on {ctx.device.type}; {self.data.train_blocks.shape[0]} training "
            f"sequences of {recipe.data.seq_len} tokens",
        )
        self.stitched = self.stage1(num_layers)
        self.stage2()
        summary = self.finish(time.time() - t_start) if ctx.is_main else None
        ctx.barrier()
        return summary

    def stage1(self, num_layers: int) -> Path | None:
        """Store, block-wise transfer, stitching. Returns the stitched mixers (None: no stage 1)."""
        recipe, ctx, out = self.recipe, self.ctx, self.out
        s1 = recipe.stage1
        if not (s1.enabled and s1.tokens > 0):
            return None
        expected = mixer_names(self.folder, recipe, self.converted)
        if not expected:
            _say(ctx, f"stage 1 skipped: {recipe.mixer.name} has no parameters to transfer")
            return None
        if (out / STITCHED).is_file():
            return out / STITCHED
        blocks = plan_blocks(num_layers, s1.blockwise.block_size or num_layers, self.converted)
        reader = CheckpointReader(self.folder)
        store = self.open_store(blocks)
        _say(
            ctx,
            f"store: {store.root}: the inputs of {len(blocks)} block(s) of "
            f"{s1.blockwise.block_size or num_layers} "
            f"layer(s) for {store.layout.sequences} sequences, {store.layout.nbytes() / 1e9:.3g} GB",
        )
        build_store(
            store, reader, self.stage1_sequences(), self.dtype, ctx.device, s1.batch_size, ctx.rank, ctx.world
        )
        ctx.barrier()
        train_blocks(blocks, recipe, reader, store, out, self.dtype, ctx.device, ctx.rank, ctx.world)
        ctx.barrier()
        if ctx.is_main:
            self.remember("stage1_blocks", stitch(blocks, out, expected))
            _say(ctx, f"stage 1: {len(blocks)} block(s) stitched into {out / STITCHED}")
        ctx.barrier()
        self.progress = ctx.broadcast(self.progress)
        return out / STITCHED

    def stage1_sequences(self) -> torch.Tensor:
        """The training sequences block-wise stage 1 stores and trains on [N, T]: a seeded sample (in
        the data's order) of stage1.blockwise.sequences, or of as many as stage1.tokens reaches."""
        s1, ids = self.recipe.stage1, self.data.train_blocks
        wanted = s1.blockwise.sequences or -(-s1.tokens // ids.shape[1])
        if wanted >= ids.shape[0]:
            return ids
        generator = torch.Generator().manual_seed(derived_seed(self.recipe.seed, "stored-sequences", 0))
        return ids[torch.randperm(ids.shape[0], generator=generator)[:wanted].sort().values]

    def open_store(self, blocks) -> HiddenStateStore:
        from transformers import AutoConfig

        s1, ids = self.recipe.stage1, self.stage1_sequences()
        config = AutoConfig.from_pretrained(self.folder)
        layout = StoreLayout(
            model=self.recipe.model.name,
            num_layers=config.num_hidden_layers,
            layers=[b.start for b in blocks],
            sequences=ids.shape[0],
            seq_len=ids.shape[1],
            hidden_size=config.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            shard_sequences=s1.blockwise.shard_sequences,
            tokens_sha256=tokens_fingerprint(ids),
        )
        root = Path(s1.blockwise.store) if s1.blockwise.store else self.out / "store"
        if self.ctx.is_main:
            store = HiddenStateStore.open(root, layout, create=True)
        self.ctx.barrier()
        if not self.ctx.is_main:
            store = HiddenStateStore.open(root, layout, create=False)
        return store

    # ------------------------------------------------------------------------------ stage 2

    def student(self, meta: bool = False):
        """teacher + per-layer-seeded mixers + the stitched stage-1 mixers (+ LoRA if stage 2 runs),
        in host memory; with `meta`, the same structure on the meta device (no weights)."""
        import zoo
        from zoo.scale.skeleton import skeleton
        from zoo.transfer.stage2 import with_stage2_lora

        s2 = self.recipe.stage2
        lora = s2.enabled and s2.tokens > 0
        if meta:
            model = skeleton(self.folder, self.dtype)
            with torch.device("meta"):
                linearize_layers(model, self.recipe, self.converted)
                return with_stage2_lora(model, s2, self.recipe.seed) if lora else model
        model, _ = zoo.load_teacher(str(self.folder), dtype=self.dtype)
        linearize_layers(model, self.recipe, self.converted)
        if self.stitched is not None:
            verify_dir(self.stitched.parent)  # a file changed since stage 1 wrote it is an error naming it
            missing, unexpected = model.load_state_dict(load_file(str(self.stitched)), strict=False)
            lacking = [k for k in missing if ".mixer." in k]
            if lacking or unexpected:
                raise RuntimeError(
                    f"{self.stitched} does not fit the model: lacks {lacking[:5]}, "
                    f"has unknown {unexpected[:5]}"
                )
        return with_stage2_lora(model, s2, self.recipe.seed) if lora else model  # as zoo run: seeded alike

    def teacher(self, meta: bool = False):
        import zoo
        from zoo.scale.skeleton import skeleton

        return (
            skeleton(self.folder, self.dtype)
            if meta
            else zoo.load_teacher(str(self.folder), dtype=self.dtype)[0]
        )

    def build(self, make):
        """`make(meta)`'s model on this run's device(s): sharded over the ranks (FSDP2, rank 0's
        weights), or moved to the one device of a one-process run."""
        from zoo.scale.fsdp_lora import load_sharded

        if self.ctx.world == 1:
            return make(False).to(self.ctx.device)
        return load_sharded(self.ctx, lambda: make(False), lambda: make(True), self.dtype)

    def say(self, message: str) -> None:
        _say(self.ctx, message)

    def stage2(self) -> None:
        """Teacher eval and measures, stage-1 eval, LoRA, final eval and measures: all ranks together on
        the sharded models, recorded through the phases every run shares (zoo.phases)."""
        from zoo.measures import wanted_measures

        recipe, s2 = self.recipe, self.recipe.stage2
        measures = [n for n in wanted_measures(recipe) if n in SCALED_MEASURES and n not in self.progress]
        teacher_side = self.teacher_side(measures)
        self.record_reference(self.fair_reference)
        if not self.final_pending(measures):
            return
        model = self.build(self.student)
        self.record_stage1(model, lambda: self.progress.get("stage1_blocks", {}))
        if s2.enabled and s2.tokens > 0:  # after its last step, the checkpoint is loaded and nothing trains
            reference = self.reference_lora() if s2.distill and s2.distill_from == "reference" else None
            stats = self.train_stage2(model, s2.loop("stage2", recipe.seed), self.out, s2.distill, reference)
            if "stage2_train" not in self.progress:
                self.remember("stage2_train", stats)
        self.record_final(model, teacher_side, measures)

    def train_stage2(
        self, model, cfg, run_dir: Path, distill: float = 0.0, reference: dict | None = None
    ) -> dict:
        """LoRA training of `model` (sharded over the ranks, or on the one device)."""
        from zoo.scale.fsdp_lora import run_sharded_stage2
        from zoo.transfer.stage2 import run_stage2

        if self.ctx.world > 1:
            return run_sharded_stage2(
                model, self.data.train_blocks, cfg, run_dir, self.ctx, distill=distill, teacher_lora=reference
            )
        return run_stage2(
            model,
            self.data.train_blocks,
            cfg,
            run_dir,
            device=self.ctx.device,
            distill=distill,
            teacher_lora=reference,
        )

    def fair_reference(self) -> dict:
        """The fair reference (the teacher + the same LoRA budget on the same data), from the zoo cache (the
        same entry a one-process run uses) or trained now on the sharded teacher, all ranks in step."""
        from zoo.reference import teacher_lora_folder
        from zoo.transfer.stage2 import add_lora

        recipe, ctx, s2 = self.recipe, self.ctx, self.recipe.stage2
        folder, key_src = teacher_lora_folder(recipe)
        result_path = folder / "result.json"
        known = ctx.broadcast(
            json.loads(result_path.read_text()) if ctx.is_main and result_path.exists() else None
        )
        if known is not None:
            return known
        _say(
            ctx,
            "fair reference: fine-tuning the teacher with the same LoRA budget (computed once, then cached)",
        )

        def make(meta: bool):
            torch.manual_seed(recipe.seed)  # as a one-process run: LoRA's init depends on the seed only
            teacher = self.teacher(meta)
            with torch.device("meta") if meta else nullcontext():
                return add_lora(teacher, s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.lora.targets)

        teacher = self.build(make)
        stats = self.train_stage2(teacher, s2.loop("teacher_lora", recipe.seed), folder)
        result = {"eval": self.data.evaluate(teacher), "train": stats, "recipe_key": json.loads(key_src)}
        if ctx.is_main:
            write_json(result_path, result)
        ctx.barrier()
        return result

    def reference_lora(self) -> dict:
        """The fair reference's LoRA tensors (whole, by parameter name), for stage2.distill_from=reference."""
        from zoo.reference import teacher_lora_folder

        self.fair_reference()
        folder, _ = teacher_lora_folder(self.recipe)
        return load_file(str(folder / "checkpoints" / "teacher_lora" / "trainable.safetensors"))

    def teacher_side(self, measures: list[str]) -> dict:
        """Evaluates the teacher if not done yet, and returns its result of each of `measures`: from the
        reference cache (rank 0 reads it, every rank gets it) or computed now on the sharded teacher."""
        from zoo.measures import measure, read_reference, teacher_reference, write_reference

        recipe, ctx = self.recipe, self.ctx
        references = {name: teacher_reference(name, recipe, ctx.device) for name in measures}
        known = ctx.broadcast(
            {name: read_reference(*ref) for name, ref in references.items()} if ctx.is_main else None
        )
        missing = [name for name in measures if known[name] is None]
        if "teacher" in self.progress and not missing:
            return known
        teacher = self.build(self.teacher)
        if "teacher" not in self.progress:
            _say(ctx, "evaluating the teacher")
            self.remember("teacher", self.data.evaluate(teacher))
        for name in missing:
            _say(ctx, f"teacher: {name} (computed once, then cached)")
            known[name] = measure(name, recipe, self.data, teacher, self.tokenizer)
            if ctx.is_main:
                write_reference(*references[name], known[name])
        return known

    # ------------------------------------------------------------------------------ output

    def finish(self, wall: float) -> dict:
        """Rank 0: the final model rebuilt in memory from stage 2's last checkpoint, saved; the summary."""
        recipe, s2 = self.recipe, self.recipe.stage2
        model = self.student()
        mixers = sum(p.numel() for n, p in model.named_parameters() if ".mixer." in n)
        trainable = mixers
        if s2.enabled and s2.tokens > 0:
            _, weights, _ = read_checkpoint(self.out / "checkpoints" / "stage2", "stage2")  # verified
            missing = sorted(set(weights) - {n for n, _ in model.named_parameters()})
            if missing:
                raise RuntimeError(f"stage 2's checkpoint has parameters the model lacks: {missing[:5]}")
            model.load_state_dict(weights, strict=False)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) + (
                0 if s2.train_mixer else mixers
            )
        model_params = sum(
            p.numel() for n, p in model.named_parameters() if "lora_" not in n and ".mixer." not in n
        )
        sample = self.sample_and_save(model)
        extra = {"processes": self.ctx.world, "block_size": recipe.stage1.blockwise.block_size}
        return self.record_summary(trainable, sample, wall, model_params, **extra)
