"""The phases every run records, whoever computes them: one implementation for the single-process run
(zoo.single_run) and each rank of a scaled run (zoo.scale.pipeline).

A runner builds and trains the models its own way (in memory, or sharded over ranks with block-wise stage 1)
and hands them here; these methods evaluate them, record each result in the run's progress as soon as it is
known, and skip what the record already holds, so a killed run resumes where it was. A runner provides
`recipe`, `out` (the run folder), `data` (zoo.run_data.RunData), `tokenizer`, `progress`, `remember(key,
value)` and `say(message)`.
"""

from __future__ import annotations

from collections.abc import Callable

from zoo.atomic import write_json
from zoo.faults import fault_point
from zoo.generation import generate_text
from zoo.io import save_run_model
from zoo.measures import branch_ablation, measure
from zoo.summary import build_summary

#: the measures taken on the final model beside the teacher's (decode speed: timed apart, on the saved model)
FINAL_MEASURES = ("mmlu", "passkey", "generation", "long_context")


class RunPhases:
    """Mixed into a runner: the phases' evaluation and bookkeeping."""

    def say(self, message: str) -> None:
        raise NotImplementedError

    def record_reference(self, compute: Callable[[], dict]) -> None:
        """The fair reference (`compute()` -> {"train", "eval"}), if asked for and not yet recorded."""
        if self.recipe.eval.teacher_lora and "teacher_lora" not in self.progress:
            reference = compute()
            self.remember("teacher_lora_train", reference["train"])
            self.remember("teacher_lora", reference["eval"])

    def record_stage1(self, model, train: dict | Callable[[], dict], extra: Callable[[], dict] | None = None):
        """Stage 1's training statistics and the evaluation of `model` after it (plus `extra()` measures)."""
        if "stage1_train" not in self.progress:
            self.remember("stage1_train", train() if callable(train) else train)
        if "stage1" not in self.progress:
            self.say("evaluating the model after stage 1")
            self.remember("stage1", {**self.data.evaluate(model), **(extra() if extra else {})})

    def final_pending(self, measures: list[str]) -> bool:
        """Whether `record_final` has anything left to do."""
        branches = self.recipe.eval.branches and "branches" not in self.progress
        return "final" not in self.progress or bool(measures) or branches

    def sample_and_save(self, model, device=None) -> str:
        """The greedy continuation of the recipe's prompt by `model`; then `model` saved to model/."""
        e = self.recipe.eval
        sample = (
            generate_text(model, self.tokenizer, e.generate_prompt, e.generate_tokens, device or "cpu")
            if e.generate_tokens
            else ""
        )
        save_run_model(model, self.tokenizer, self.out, merge=self.recipe.stage2.merge_on_save)
        return sample

    def record_summary(self, trainable: int, sample: str, wall: float, model_params: int, **extra) -> dict:
        """summary.json from the progress record (and `extra` fields), written atomically; returned."""
        data = self.data
        summary = build_summary(self.recipe, self.progress, trainable, sample, wall, model_params) | extra
        summary["data_sources"] = {
            "train": data.train_sources,
            "eval_ood": data.ood_sources,
            "skipped": data.skipped_sources,
        }
        write_json(self.out / "summary.json", summary)
        fault_point("summary")
        return summary

    def record_final(self, model, teacher_side: dict, measures: list[str]) -> None:
        """The final model's evaluation, each of `measures` beside the teacher's, and the branch ablation."""
        recipe = self.recipe
        if "final" not in self.progress:
            self.say("evaluating the final model")
            self.remember("final", self.data.evaluate(model))
        for name in measures:
            self.say(f"{name}: final model")
            final = measure(name, recipe, self.data, model, self.tokenizer)
            self.remember(name, {"teacher": teacher_side[name], "final": final})
        if recipe.eval.branches and "branches" not in self.progress:
            self.remember("branches", branch_ablation(recipe, self.data, model, self.tokenizer))
