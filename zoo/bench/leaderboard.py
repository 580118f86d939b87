"""leaderboard.md of a quality bench: the references first, then the mixers from best to worst final
held-out perplexity relative to the fair reference, then the ablations and any failures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["leaderboard_markdown", "ranked"]

FEATURE_MAP_MIXERS = {"hedgehog": "hedgehog", "t2r": "t2r", "linear-elu": "elu"}


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _pair(a: str, b: str) -> str:
    return a if a == b == "-" else f"{a} / {b}"


def _passkey(row: dict) -> str:
    if not row["passkey"]:
        return "-"
    return " / ".join(f"{acc:.2f}" for _, acc in sorted(row["passkey"].items(), key=lambda kv: int(kv[0])))


def _table(headers: Sequence[str], rows: list[dict], cells: Callable[[dict], list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return lines + [""]


def ranked(rows: list[dict]) -> list[dict]:
    """References first (teacher, then teacher + LoRA), then finished mixers by ratio to the fair reference
    (then by held-out perplexity), then failed ones."""
    refs = [r for r in rows if r["kind"] == "reference"]
    mixers = [r for r in rows if r["kind"] == "mixer" and r["status"] == "done"]
    mixers.sort(
        key=lambda r: (
            r["ratio_to_fair_reference"] is None,
            r["ratio_to_fair_reference"] or 0.0,
            r["ppl_heldout"] if r["ppl_heldout"] is not None else math.inf,
        )
    )
    return refs + mixers


def _quality_cells(row: dict) -> list[str]:
    return [
        f"**{row['name']}**" if row["kind"] == "reference" else row["name"],
        row["family"] or "-",
        _num(row["ppl_heldout"]),
        _num(row["ratio_to_fair_reference"], 3),
        _num(row["gap_closed_heldout"], 2),
        _num(row["ppl_ood"]),
        _num(row["ratio_ood_to_teacher"], 3),
        _num(row["bpb_heldout"], 3),
        _num(row["bpb_ood"], 3),
        _num(row["mmlu_accuracy"], 3),
        _passkey(row),
        _num(row["repeated_4grams"], 2),
        _pair(_num(row["mean_layer_mse_swap"], 4), _num(row["mean_layer_mse_stage1"], 4)),
    ]


def _cost_cells(row: dict) -> list[str]:
    percent = f" ({row['trainable_percent']:.2f}%)" if row["trainable_percent"] is not None else ""
    return [
        row["name"],
        _count(row["trainable_params"]) + percent,
        _pair(_count(row["tokens_stage1"]), _count(row["tokens_stage2"])),
        _pair(_num(row["seconds_stage1"], 0), _num(row["seconds_stage2"], 0)),
        _pair(_bytes(row["peak_rss_bytes_stage1"]), _bytes(row["peak_rss_bytes_stage2"])),
        _num(row["decode_tokens_per_s"], 1),
        _bytes(row["state_bytes"]),
        _bytes(row["state_bytes_32k_extrapolated"]),
    ]


def _stage_cells(row: dict) -> list[str]:
    def cell(stage: str) -> str:
        entry = (row["stages"] or {}).get(stage)
        return "-" if not entry else _pair(_num(entry["heldout"]), _num(entry["ood"]))

    return [row["name"], cell("teacher"), cell("swap"), cell("stage1"), cell("final")]


def _devices_lines(results: dict) -> list[str]:
    """A line naming where the runs ran, when that is not all the bench's device (a bench resumed or
    completed on another machine): their time and decode-speed columns do not compare across devices."""
    by_device: dict[str, list[str]] = {}
    for r in results["rows"]:
        if (
            r["kind"] != "reference"
            and r["status"] == "done"
            and not (r.get("ablation") or "").endswith("-branch")
        ):
            by_device.setdefault(r.get("device") or "not recorded", []).append(r["name"])
    if not by_device or list(by_device) == [results["device"]]:
        return []
    where = "; ".join(f"{device}: {', '.join(names)}" for device, names in by_device.items())
    return [f"- runs on more than one device (times and decode speeds compare only within one): {where}"]


def _header(results: dict) -> list[str]:
    b = results["budget"]
    passkey = ", ".join(map(str, b["passkey_lengths"])) or "none"
    return [
        f"# Quality leaderboard: {results['model']}, budget `{b['name']}`",
        "",
        f"{b['description']}.",
        "",
        f"- budget: seq_len {b['seq_len']}, stage 1 {b['stage1_tokens']:,} tokens (batch "
        f"{b['stage1_batch_size']}), "
        f"stage 2 {b['stage2_tokens']:,} tokens (batch {b['batch_size']}), {b['eval_blocks']} held-out "
        "blocks per "
        f"corpus, MMLU {b['mmlu']} questions (5-shot), passkey at {passkey} tokens x {b['passkey_trials']}",
        f"- seed {results['seed']}; device: {results['device']}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        *_devices_lines(results),
        f"- command: `{results['command']}`",
        *(f"- rows kept from an earlier command: `{c}`" for c in results.get("earlier_commands", [])),
        "",
        "Perplexity (ppl) and bits per byte (bpb) on held-out text of the training corpora and on a corpus "
        "never "
        "trained on (OOD). **x fair ref.**: final held-out ppl / the teacher fine-tuned with the same LoRA "
        "budget; "
        "**x teacher**: OOD ppl / the untouched teacher's. **gap closed**: share of the swap-only to "
        "fair-reference "
        "gap closed, in bpb. Passkey: retrieval accuracy at each context length. Repeats: share of repeated "
        "4-grams "
        "in greedy continuations of held-out prompts (loops, which perplexity does not see; read it beside "
        "perplexity: "
        "text without sense need not repeat). Transfer MSE: mean over "
        "layers, swap-only / after stage 1.",
        "",
    ]


def _ablation_sections(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows}
    heads = [
        "",
        "family",
        "ppl held-out",
        "x fair ref.",
        "gap closed",
        "ppl OOD",
        "x teacher",
        "bpb held-out",
        "bpb OOD",
        "MMLU",
        "passkey",
        "repeats",
        "transfer MSE",
    ]
    out: list[str] = []
    lora_only = [r for r in rows if r["ablation"] == "lora-only"]
    if lora_only:
        pairs = [x for r in lora_only for x in (by_name.get(r["mixer"]), r) if x is not None]
        out += ["## Ablation: attention transfer + LoRA vs LoRA alone (same total tokens)", ""]
        out += _table(heads, pairs, _quality_cells)
    maps = [by_name[m] for m in FEATURE_MAP_MIXERS if m in by_name and by_name[m]["status"] == "done"]
    if len(maps) > 1:
        out += ["## Ablation: feature maps under the same budget (hedgehog vs t2r vs elu)", ""]
        out += _table(heads, maps, _quality_cells)
    branch_rows = [r for r in rows if r["ablation"] in ("window-branch", "linear-branch")]
    if branch_rows:
        hybrids = list(dict.fromkeys(r["mixer"] for r in branch_rows))
        table = [
            x
            for m in hybrids
            for x in [by_name.get(m)] + [r for r in branch_rows if r["mixer"] == m]
            if x is not None
        ]
        out += ["## Ablation: each hybrid's window branch alone and linear branch alone (after training)", ""]
        out += _table(heads, table, _quality_cells)
    return out


#: the buckets the long-context table shows (the shorter ones are in results.json)
LONG_BUCKETS = ("1024-2048", "2048-4096", "4096-8192")


def _long_context_section(board: list[dict], rows: list[dict]) -> list[str]:
    """The long-context table: per source, the teacher, the free window and each mixer's (and ablation's)
    perplexity at positions past 1k, the share of the free window's gap each closes, and passkey (one key /
    four keys)."""
    order = {id(r): i for i, r in enumerate(board)}
    measured = [r for r in rows if r["kind"] in ("mixer", "ablation") and r.get("long_context")]
    measured.sort(key=lambda r: order.get(id(r), len(order)))
    if not measured:
        return []
    first = measured[0]["long_context"]
    sources = list(first["rows"]["teacher"])
    buckets = [b for b in LONG_BUCKETS if b in first["rows"]["teacher"][sources[0]]]
    window = first.get("free_window") or ["?", "?"]
    teacher_row = next((r for r in board if r["name"] == "teacher"), {"passkey": None})

    teacher_state = teacher_row.get("state_bytes_8k_extrapolated")

    def state(row):
        held = row.get("state_bytes_8k_extrapolated")
        if held is None:
            return "-"
        return _bytes(held) + (f" ({held / teacher_state:.3f}x)" if teacher_state else "")

    def cells(name, tables, shares, passkey, multikey, row=None):
        ppl = [" / ".join(_num(tables[s][b]["ppl"]) for b in buckets) for s in sources]
        gap = [" / ".join(_num((shares or {}).get(s, {}).get(b), 2) for b in buckets) for s in sources]
        return [name, *ppl, *gap, passkey, multikey, state(row or {})]

    def passkeys(row):
        return _passkey(row), _passkey({"passkey": row.get("passkey_multikey")})

    lines = [
        "## Long context",
        "",
        f"Perplexity by token position ({' / '.join(buckets)}) on held-out blocks that start at a document; "
        f"**free window**: the teacher's own attention cut to its last {window[0]} tokens and first "
        f"{window[1]} (StreamingLLM, untrained), the baseline a linearized model must beat past its window. "
        "**gap closed**: share of the gap between the free window and the teacher that the model closes, "
        "in log perplexity (1 = the teacher, 0 = the free window, below 0 = worse than not training). "
        "**state @8k**: decode state of one sequence at 8k context (extrapolated from the measured growth; a "
        "KV cache for softmax layers), and its share of the teacher's KV cache.",
        "",
    ]
    heads = [
        "",
        *(f"ppl {s}" for s in sources),
        *(f"gap closed {s}" for s in sources),
        "passkey",
        "multi-key",
        "state @8k (x teacher)",
    ]
    body = [
        cells("**teacher**", first["rows"]["teacher"], None, *passkeys(teacher_row), teacher_row),
        cells("**free window**", first["rows"]["free_window"], None, "-", "-"),
    ]
    if first["rows"].get("fair_reference"):
        body.insert(1, cells("**teacher + LoRA**", first["rows"]["fair_reference"], None, "-", "-"))
    for r in measured:
        t = r["long_context"]
        body.append(cells(r["name"], t["rows"]["final"], t["gap_closed"].get("final"), *passkeys(r), r))
    lines += ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    return lines + ["| " + " | ".join(c) + " |" for c in body] + [""]


def leaderboard_markdown(results: dict) -> str:
    rows = results["rows"]
    board = ranked(rows)
    passkey = "/".join(map(str, results["budget"]["passkey_lengths"])) or "-"
    ctx = next((r["decode_context"] for r in board if r["decode_context"]), None)
    lines = _header(results)
    lines += _long_context_section(board, rows)
    lines += ["## Quality", ""]
    lines += _table(
        [
            "",
            "family",
            "ppl held-out",
            "x fair ref.",
            "gap closed",
            "ppl OOD",
            "x teacher",
            "bpb held-out",
            "bpb OOD",
            "MMLU",
            f"passkey {passkey}",
            "repeats",
            "transfer MSE",
        ],
        board,
        _quality_cells,
    )
    lines += ["## Cost", ""]
    lines += _table(
        [
            "",
            "trainable",
            "tokens s1 / s2",
            "seconds s1 / s2",
            "peak RSS s1 / s2",
            f"decode tok/s @{ctx or '-'}",
            f"state @{ctx or '-'}",
            "state @32k (extrapolated)",
        ],
        board,
        _cost_cells,
    )
    lines += ["## Perplexity by stage (held-out / OOD)", ""]
    lines += _table(["", "teacher", "swap only", "after stage 1", "final"], board, _stage_cells)
    lines += _ablation_sections(rows)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed", ""] + [f"- {r['name']}: {r['error']}" for r in failed] + [""]
    pending = [r["name"] for r in rows if r["status"] == "pending"]
    if pending:
        lines += [
            "## Not run yet",
            "",
            f"{', '.join(pending)} (the bench command runs them; finished ones are kept)",
            "",
        ]
    return "\n".join(lines)
