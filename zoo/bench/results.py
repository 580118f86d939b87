"""The rows of a quality bench's results.json, built from its run folders' summary.json files.

Every row has every field of `ROW_FIELDS` (None where it does not apply). Rows:

- "teacher": the untouched teacher (the out-of-domain reference; its MMLU, passkey and decode cost);
- "teacher + LoRA": the fair in-domain reference, the teacher fine-tuned with the same stage-2 budget;
- one per mixer (kind "mixer");
- ablations (kind "ablation"): "<mixer> [LoRA only]" (no attention transfer, same total tokens) and,
  for each hybrid, "<mixer> [window branch]" / "<mixer> [linear branch]" (one branch of the trained
  model alone);
- a mixer whose run failed keeps its row with status "failed" and the error;
- a finished row of an earlier invocation into the same folder (other `--mixers`, same model and
  budget) is kept while its run folder holds a summary; `earlier_commands` names what made them.

`repeated_4grams`: the mean share of repeated 4-grams in greedy continuations of held-out prompts
(zoo.generation; `generation_samples` holds the first ones as text), the teacher's beside it.

Quality relations: `ratio_to_fair_reference` = final held-out perplexity / the fair reference's;
`ratio_ood_to_teacher` = final out-of-domain perplexity / the untouched teacher's. The share of the gap
closed is measured in bits per byte (log-perplexity, where equal steps mean equal gains):
`gap_closed_heldout` = (swap - final) / (swap - fair reference), `gap_closed_ood` the same against the
teacher out of domain. 1 means the reference was reached.

`long_context`: the run's summary table of perplexity by position (zoo.long_context.long_context_table:
the teacher, the free window and the model per source and bucket, and the share of the free window's gap
the model closes); `passkey_multikey`: accuracy by length of the multi-key passkey variant.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ROW_FIELDS", "empty_row", "mixer_rows", "reference_rows", "failed_row", "loss_curve"]

ROW_FIELDS = (
    "name",
    "kind",
    "mixer",
    "family",
    "ablation",
    "status",
    "error",
    "run_dir",
    "device",
    "ppl_heldout",
    "ppl_ood",
    "bpb_heldout",
    "bpb_ood",
    "per_source",
    "stages",
    "ratio_to_fair_reference",
    "ratio_ood_to_teacher",
    "gap_closed_heldout",
    "gap_closed_ood",
    "mmlu_accuracy",
    "mmlu_n",
    "mmlu_teacher_accuracy",
    "passkey",
    "passkey_teacher",
    "repeated_4grams",
    "repeated_4grams_teacher",
    "generation_samples",
    "mean_layer_mse_swap",
    "mean_layer_mse_stage1",
    "trainable_params",
    "trainable_percent",
    "tokens_stage1",
    "tokens_stage2",
    "seconds_stage1",
    "seconds_stage2",
    "peak_rss_bytes_stage1",
    "peak_rss_bytes_stage2",
    "peak_cuda_bytes_stage1",
    "peak_cuda_bytes_stage2",
    "decode_context",
    "decode_tokens_per_s",
    "state_bytes",
    "state_bytes_32k_extrapolated",
    "state_bytes_8k_extrapolated",
    "state_growth",
    "decode_by_context",
    "loss_curve_stage2",
    "long_context",
    "passkey_multikey",
)


def empty_row(
    name: str, kind: str, mixer: str | None, family: str | None, ablation: str | None = None
) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row |= {
        "name": name,
        "kind": kind,
        "mixer": mixer,
        "family": family,
        "ablation": ablation,
        "status": "done",
    }
    return row


def failed_row(
    name: str, kind: str, mixer: str, family: str | None, ablation: str | None, error: str, run_dir: str
) -> dict:
    return empty_row(name, kind, mixer, family, ablation) | {
        "status": "failed",
        "error": error,
        "run_dir": run_dir,
    }


def loss_curve(metrics_path: Path, stage: str) -> list[list[float]] | None:
    """[[tokens, loss], ...] of one stage from a metrics.jsonl file (None if absent)."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [[r["tokens"], r["loss"]] for r in rows if r.get("stage") == stage] or None


def _quality(
    row: dict, final: dict | None, swap: dict | None, teacher: dict | None, fair: dict | None
) -> dict:
    """The final quality columns of a row and how they compare with the references."""
    if final is None:
        return row
    row |= {
        "ppl_heldout": final["heldout"],
        "ppl_ood": final["ood"],
        "bpb_heldout": final["bpb_heldout"],
        "bpb_ood": final["bpb_ood"],
        "per_source": final["per_source"],
    }
    if fair:
        row["ratio_to_fair_reference"] = final["heldout"] / fair["heldout"]
        row["gap_closed_heldout"] = _gap_closed(swap, final, fair, "bpb_heldout")
    if teacher and teacher.get("ood") and final.get("ood"):
        row["ratio_ood_to_teacher"] = final["ood"] / teacher["ood"]
        row["gap_closed_ood"] = _gap_closed(swap, final, teacher, "bpb_ood")
    return row


def _gap_closed(swap: dict | None, final: dict, reference: dict, key: str) -> float | None:
    if not swap or swap.get(key) is None or reference.get(key) is None:
        return None
    gap = swap[key] - reference[key]
    return (swap[key] - final[key]) / gap if gap else None


def _passkey_by_length(result: dict | None) -> dict | None:
    return {length: r["accuracy"] for length, r in result["lengths"].items()} if result else None


def _decode_columns(result: dict | None) -> dict:
    if not result:
        return {}
    by_context = {
        ctx: {
            "decode_tokens_per_s": r["decode_tokens_per_s"],
            "decode_ms_per_token": r["decode_ms_per_token"],
            "state_bytes": r["state_bytes"],
            **{part: r[part] for part in ("mixer_state_bytes", "kv_cache_bytes") if part in r},
        }
        for ctx, r in result["contexts"].items()
    }
    last = max(by_context, key=int)
    return {
        "decode_context": int(last),
        "decode_tokens_per_s": by_context[last]["decode_tokens_per_s"],
        "state_bytes": by_context[last]["state_bytes"],
        "state_bytes_32k_extrapolated": result["state_bytes_extrapolated"].get("32768"),
        "state_bytes_8k_extrapolated": result["state_bytes_extrapolated"].get("8192"),
        "state_growth": result["state_growth"],
        "decode_by_context": by_context,
    }


def _generation_columns(summary: dict, side: str) -> dict:
    """The repeats columns from a summary's generation measure, `side` "teacher" or "final"."""
    generation = summary.get("generation") or {}
    mine, teacher = generation.get(side) or {}, generation.get("teacher") or {}
    return {
        "repeated_4grams": mine.get("repeated_4grams"),
        "repeated_4grams_teacher": teacher.get("repeated_4grams"),
        "generation_samples": mine.get("samples"),
    }


def _peak(entry: dict | None, key: str) -> int | None:
    return entry.get(key) if entry else None


def mixer_rows(
    summary: dict,
    name: str,
    kind: str,
    family: str | None,
    ablation: str | None,
    run_dir: Path,
    references: dict,
    relative_to: Path,
) -> list[dict]:
    """The row of one finished run, plus its branch-ablation rows for a hybrid. `references` holds the
    bench-wide "teacher" and "fair" perplexity entries, used where the run has none of its own."""
    teacher = summary.get("ppl_teacher") or references.get("teacher")
    fair = summary.get("ppl_teacher_lora") or references.get("fair")
    row = empty_row(name, kind, summary["mixer"], family, ablation)
    row["run_dir"] = (
        str(run_dir.relative_to(relative_to)) if run_dir.is_relative_to(relative_to) else str(run_dir)
    )
    row["stages"] = {k: summary.get(f"ppl_{k}") for k in ("teacher", "swap", "stage1", "final")}
    _quality(row, summary.get("ppl_final"), summary.get("ppl_swap"), teacher, fair)
    mmlu = summary.get("mmlu") or {}
    passkey = summary.get("passkey") or {}
    decode = summary.get("decode") or {}
    row |= {
        "device": summary.get("device"),  # None for runs made before summaries recorded it
        "mmlu_accuracy": mmlu.get("final", {}).get("accuracy"),
        "mmlu_n": mmlu.get("final", {}).get("n"),
        "mmlu_teacher_accuracy": mmlu.get("teacher", {}).get("accuracy"),
        "passkey": _passkey_by_length(passkey.get("final")),
        "passkey_teacher": _passkey_by_length(passkey.get("teacher")),
        "passkey_multikey": _passkey_by_length((passkey.get("final") or {}).get("multikey")),
        "long_context": summary.get("long_context"),
        **_generation_columns(summary, "final"),
        "mean_layer_mse_swap": summary.get("mean_layer_mse_swap"),
        "mean_layer_mse_stage1": summary.get("mean_layer_mse_stage1"),
        "trainable_params": summary.get("trainable_params"),
        "trainable_percent": summary.get("trainable_percent"),
        "tokens_stage1": summary.get("tokens_stage1"),
        "tokens_stage2": summary.get("tokens_stage2"),
        "seconds_stage1": summary.get("seconds_stage1"),
        "seconds_stage2": summary.get("seconds_stage2"),
        "peak_rss_bytes_stage1": _peak(summary.get("peak_memory_stage1"), "peak_rss_bytes"),
        "peak_rss_bytes_stage2": _peak(summary.get("peak_memory_stage2"), "peak_rss_bytes"),
        "peak_cuda_bytes_stage1": _peak(summary.get("peak_memory_stage1"), "peak_cuda_bytes"),
        "peak_cuda_bytes_stage2": _peak(summary.get("peak_memory_stage2"), "peak_cuda_bytes"),
        "loss_curve_stage2": loss_curve(run_dir / "metrics.jsonl", "stage2"),
        **_decode_columns(decode.get("final")),
    }
    rows = [row]
    for branch, result in (summary.get("branches") or {}).items():
        b = empty_row(f"{name} [{branch} branch]", "ablation", summary["mixer"], family, f"{branch}-branch")
        b["run_dir"] = row["run_dir"]
        b["stages"] = {"teacher": teacher, "swap": summary.get("ppl_swap"), "final": result["ppl"]}
        _quality(b, result["ppl"], summary.get("ppl_swap"), teacher, fair)
        b["passkey"] = _passkey_by_length(result.get("passkey"))
        b["passkey_teacher"] = row["passkey_teacher"]
        for key in ("device", "trainable_params", "trainable_percent", "tokens_stage1", "tokens_stage2"):
            b[key] = row[key]
        rows.append(b)
    return rows


def reference_rows(summary: dict, teacher_lora_metrics: Path | None) -> list[dict]:
    """The untouched teacher and the fair reference (teacher + LoRA), from any run's summary (they are
    shared by every run of the bench)."""
    teacher, fair = summary.get("ppl_teacher"), summary.get("ppl_teacher_lora")
    mmlu = (summary.get("mmlu") or {}).get("teacher") or {}
    passkey = _passkey_by_length((summary.get("passkey") or {}).get("teacher"))
    t = empty_row("teacher", "reference", None, "softmax")
    t["stages"] = {"teacher": teacher}
    _quality(t, teacher, None, teacher, fair)  # no swap: no gap to close
    t |= {
        "mmlu_accuracy": mmlu.get("accuracy"),
        "mmlu_n": mmlu.get("n"),
        "mmlu_teacher_accuracy": mmlu.get("accuracy"),
        "passkey": passkey,
        "passkey_teacher": passkey,
        "passkey_multikey": _passkey_by_length(
            ((summary.get("passkey") or {}).get("teacher") or {}).get("multikey")
        ),
        **_generation_columns(summary, "teacher"),
        "trainable_params": 0,
        "trainable_percent": 0.0,
        "tokens_stage1": 0,
        "tokens_stage2": 0,
        "device": summary.get("device"),
        **_decode_columns((summary.get("decode") or {}).get("teacher")),
    }
    rows = [t]
    if fair:
        train = summary.get("teacher_lora_train") or {}
        params = train.get("trainable_params")
        f = empty_row("teacher + LoRA", "reference", None, "softmax")
        f["stages"] = {"teacher": teacher, "final": fair}
        _quality(f, fair, None, teacher, fair)
        model_params = summary.get("model_params")
        f |= {
            "trainable_params": params,
            "trainable_percent": 100.0 * params / model_params if params and model_params else None,
            "tokens_stage1": 0,
            "tokens_stage2": train.get("tokens"),
            "seconds_stage2": train.get("seconds"),
            "peak_rss_bytes_stage2": _peak(train.get("peak_memory"), "peak_rss_bytes"),
            "peak_cuda_bytes_stage2": _peak(train.get("peak_memory"), "peak_cuda_bytes"),
            "mmlu_teacher_accuracy": t["mmlu_accuracy"],
            "passkey_teacher": passkey,
            "loss_curve_stage2": loss_curve(teacher_lora_metrics, "teacher_lora")
            if teacher_lora_metrics
            else None,
        }
        rows.append(f)
    return rows
