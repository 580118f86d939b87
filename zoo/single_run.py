"""A run in one process (`zoo run` without torchrun or block-wise stage 1), phase by phase: teacher, convert,
stage 1, stage 2, evaluations, save. Each phase records its results as soon as they are known and skips what
the run folder's record already holds (zoo.run_state), so a run killed anywhere resumes where it was."""

from __future__ import annotations

import sys
import time

import torch

from zoo.devices import pick_device, pick_dtype
from zoo.generation import generate_text
from zoo.io import FINAL_MODEL_DIR
from zoo.measures import (
    cached_reference,
    long_context_of,
    measure,
    teacher_measures,
    teacher_reference,
    wanted_measures,
)
from zoo.peak_memory import PeakMemory
from zoo.phases import FINAL_MEASURES, RunPhases
from zoo.recipe import Recipe
from zoo.reference import (
    fair_reference_model,
    teacher_lora_folder,
    teacher_lora_reference,
    teacher_lora_weights,
)
from zoo.run_data import RunData
from zoo.run_state import RunState
from zoo.summary import stage1_worse_than_swap


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


class SingleRun(RunPhases):
    """A run in one process, phase by phase; each phase records its results as soon as they are known
    and skips what the folder's record already holds (zoo.run_state)."""

    def __init__(self, recipe: Recipe, state: RunState):
        self.recipe, self.state, self.out = recipe, state, state.out
        self.progress, self.remember = state.progress, state.remember
        self.device = pick_device(recipe.device)
        self.dtype = pick_dtype(recipe.model.dtype, self.device)

    def run(self) -> dict:
        import zoo

        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        t_start = time.time()
        self.model, self.tokenizer = zoo.load_teacher(
            recipe.model.name, dtype=self.dtype, device=str(self.device)
        )
        self.data = RunData(recipe, self.tokenizer)
        _say(
            f"{self.data.train_blocks.shape[0]} training blocks of {recipe.data.seq_len} tokens from "
            f"{self.data.train_sources}; out-of-domain: {self.data.ood_sources or 'none'}"
        )
        model_params = sum(p.numel() for p in self.model.parameters())
        teacher_side = self.teacher()
        self.convert()
        self.stage1()
        trainable = self.stage2()
        self.evaluate(teacher_side)
        sample = self.sample_and_save(self.model, self.device)
        self.decode(teacher_side)
        return self.record_summary(trainable, sample, time.time() - t_start, model_params)

    def teacher(self) -> dict:
        """The teacher's evaluation, fair reference, sample and side of each measure (cached across runs)."""
        recipe, data, model, progress, remember = (
            self.recipe,
            self.data,
            self.model,
            self.progress,
            self.remember,
        )
        if "teacher" not in progress:
            _say("evaluating the teacher")
            teacher_key = {
                "model": recipe.to_dict()["model"],
                "data": recipe.data_key(),
                "max_blocks": recipe.eval.max_blocks,
                "device": self.device.type,
            }
            remember("teacher", cached_reference("teacher-eval", teacher_key, lambda: data.evaluate(model)))
        self.record_reference(lambda: teacher_lora_reference(recipe, data, self.device, self.dtype))
        teacher_side = teacher_measures(
            recipe,
            data,
            model,
            self.tokenizer,
            self.device,
            [m for m in wanted_measures(recipe) if m not in progress],
        )
        if "long_context" in teacher_side and recipe.eval.teacher_lora:  # the fair reference at length too
            teacher_side["long_context"] = teacher_side["long_context"] | {
                "fair_reference": self.fair_reference_long_context()
            }
        if "teacher_sample" not in progress:  # the teacher's own continuation, shown beside the model's
            remember(
                "teacher_sample",
                generate_text(
                    model,
                    self.tokenizer,
                    recipe.eval.generate_prompt,
                    recipe.eval.generate_tokens,
                    self.device,
                ),
            )
        return teacher_side

    def fair_reference_long_context(self) -> dict:
        """The fair reference's perplexity by position (cached like the teacher's measures)."""
        recipe = self.recipe
        kind, key = teacher_reference("long_context", recipe, self.device)
        key = key | {"fair_reference": teacher_lora_folder(recipe)[0].name}

        def compute():
            _say("fair reference: long_context (computed once, then cached)")
            fair = fair_reference_model(recipe, self.data, self.device, self.dtype)
            return long_context_of(
                fair, self.tokenizer, self.data, recipe.eval.long_context, recipe.eval.long_context_blocks
            )

        return cached_reference(f"fair-{kind}", key, compute)

    def convert(self) -> None:
        import zoo
        from zoo.transfer.stage1 import layer_mse

        recipe = self.recipe
        torch.manual_seed(recipe.seed)  # the mixers' initialization is part of the run's determinism
        zoo.linearize(self.model, recipe.mixer.name, layers=recipe.mixer.layers, **recipe.mixer_options())
        blocks = self.data.train_blocks
        self.mse_blocks = blocks[: min(recipe.eval.mse_blocks, blocks.shape[0])]
        if "swap" not in self.progress:
            _say(f"evaluating the swapped model ({recipe.mixer.name}, untrained)")
            self.remember(
                "swap", self.data.evaluate(self.model) | {"layer_mse": layer_mse(self.model, self.mse_blocks)}
            )

    def stage1(self) -> None:
        from zoo.transfer.stage1 import layer_mse, run_stage1

        recipe, s1, model = self.recipe, self.recipe.stage1, self.model
        if not (s1.enabled and s1.tokens > 0):
            return
        if not any(".mixer." in n for n, _ in model.named_parameters()):
            _say(f"stage 1 skipped: {recipe.mixer.name} has no parameters to transfer")
            return
        with PeakMemory() as peak:
            stats = run_stage1(
                model,
                self.data.stage_blocks(s1),
                s1.loop("stage1", recipe.seed),
                self.out,
                attention_ce=s1.attention_ce,
                attention_ce_max_len=s1.attention_ce_max_len,
                device=self.device,
            )
        self.record_stage1(
            model,
            stats | {"peak_memory": peak.result()},
            lambda: {"layer_mse": layer_mse(model, self.mse_blocks)},
        )
        warn_if_stage1_worse(self.progress)

    def stage2(self) -> int:
        """LoRA (and the mixers, if the recipe says); returns the run's trainable parameter count."""
        from zoo.transfer.stage2 import run_stage2, with_stage2_lora

        recipe, s2 = self.recipe, self.recipe.stage2
        mixer_params = sum(p.numel() for n, p in self.model.named_parameters() if ".mixer." in n)
        if not (s2.enabled and s2.tokens > 0):
            return mixer_params
        self.model = with_stage2_lora(self.model, s2, recipe.seed)
        # before the peak-memory window: computing a missing reference is not stage 2's memory
        reference = (
            teacher_lora_weights(recipe, self.data, self.device, self.dtype)
            if s2.distill and s2.distill_from == "reference"
            else None
        )
        with PeakMemory() as peak:
            stats = run_stage2(
                self.model,
                self.data.stage_blocks(s2),
                s2.loop("stage2", recipe.seed),
                self.out,
                device=self.device,
                distill=s2.distill,
                teacher_lora=reference,
            )
        if "stage2_train" not in self.progress:
            self.remember("stage2_train", stats | {"peak_memory": peak.result()})
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) + (
            0 if s2.train_mixer else mixer_params
        )

    def say(self, message: str) -> None:
        _say(message)

    def evaluate(self, teacher_side: dict) -> None:
        self.record_final(self.model, teacher_side, [m for m in FINAL_MEASURES if m in teacher_side])

    def decode(self, teacher_side: dict) -> None:
        """Decode speed and state bytes, timed on the model as saved (LoRA merged), not through peft."""
        import zoo

        if "decode" not in teacher_side:
            return
        del self.model
        saved, _ = zoo.load_linearized(self.out / FINAL_MODEL_DIR, dtype=self.dtype, device=str(self.device))
        _say("decode speed and state memory: final model")
        self.remember(
            "decode",
            {
                "teacher": teacher_side["decode"],
                "final": measure("decode", self.recipe, self.data, saved, self.tokenizer),
            },
        )


def warn_if_stage1_worse(progress: dict) -> None:
    warning = stage1_worse_than_swap(progress)
    if warning:
        _say(f"WARNING: {warning}")
