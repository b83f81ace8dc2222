"""Summaries and tables of evaluation results (the `results.json` / `results.md` an
evaluation writes; the benchmarks and notebooks read the same dicts)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxedit.eval import metrics

# Order of metrics in tables (others follow alphabetically).
TABLE_ORDER = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "score",
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "efficacy_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "reliability",
    "generalization",
    "specificity_acc",
    "locality",
    "portability",
    "reverse",
    "efficacy_gen",
    "paraphrase_gen",
    "neighborhood_gen",
    "specificity_gen",
    "locality_gen",
    "portability_gen",
    "reverse_gen",
    "fluency",
    "consistency",
)
SCORE_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def summarize(case_metrics: Sequence[dict[str, float]]) -> dict[str, dict]:
    """{name: {mean, std, n}} over the cases that have the metric; `score` = hmean of the
    ES / PS / NS means (MEMIT's order: average over cases first)."""
    vals: dict[str, list[float]] = defaultdict(list)
    for cm in case_metrics:
        for k, v in cm.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                vals[k].append(float(v))
    out = {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
        for k, v in vals.items()
    }
    if all(p in out for p in SCORE_PARTS):
        out["score"] = {
            "mean": metrics.harmonic_score(*(out[p]["mean"] for p in SCORE_PARTS)),
            "std": None,
            "n": min(out[p]["n"] for p in SCORE_PARTS),
        }
    return out


def ordered(names) -> list[str]:
    """Metric names in table order."""
    names = set(names)
    head = [n for n in TABLE_ORDER if n in names]
    return head + sorted(names - set(head))


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    std = f" ± {s['std']:.3f}" if s.get("std") is not None else ""
    return f"{s['mean']:.3f}{std}"


def table(result: dict) -> str:
    """Markdown table: metric | unedited | method (mean ± std) | n."""
    post, base = result.get("metrics", {}), result.get("baseline", {})
    lines = [f"| metric | unedited | {result.get('method', 'edited')} | n |", "|---|---|---|---|"]
    for name in ordered(set(post) | set(base)):
        n = (post.get(name) or base.get(name) or {}).get("n", "")
        lines.append(f"| {name} | {_cell(base.get(name))} | {_cell(post.get(name))} | {n} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    """The results.md text: what ran, the table, the timings."""
    dropped = f", {result['n_dropped']} dropped as unknown" if result.get("known_only") else ""
    head = (
        f"{result['method']} on {result['model']}, {result['data']} "
        f"({result['n']} cases, mode {result['mode']}{dropped})"
    )
    if result.get("decoding"):
        d = result["decoding"]
        head += f"\ngeneration: top-k {d['top_k']}, {d['max_out_len']} tokens, seed {d['seed']}"
    sec = result.get("seconds", {})
    pe = sec.get("per_edit") or {}
    per = "round" if result.get("mode") == "sequential" else "case"
    what = "edit" if per == "round" else "edit+eval"
    tail = (
        f"{what}: median {pe.get('median') or 0:.2f} s/{per}, p90 {pe.get('p90') or 0:.2f} s, "
        f"total {sec.get('total') or 0:.1f} s"
    )
    if result.get("rounds"):
        b = result.get("batch_size")
        each = f"up to {b} requests" if b else "one case"
        head += f"\nlifelong: {result['rounds']} rounds of {each} each, measured on the final model"
    parts = [head, "", table(result)]
    if result.get("general"):
        parts += ["", general_table(result["general"])]
    if result.get("curve"):
        parts += ["", curve_table(result["curve"])]
    return "\n".join([*parts, "", tail])


def general_table(general: dict) -> str:
    """Markdown table of the general block: metric | unedited | edited | edited / unedited."""
    post, base = general.get("edited") or {}, general.get("unedited") or {}
    lines = [
        f"| general ({general.get('model', 'edited')}) | unedited | edited | ratio |",
        "|---|---|---|---|",
    ]
    for name in sorted(set(post) | set(base)):
        a, b = base.get(name), post.get(name)
        ratio = f"{b / a:.3f}" if a and b is not None else "—"
        lines.append(f"| {name} | {_num(a)} | {_num(b)} | {ratio} |")
    return "\n".join(lines)


# Curve columns: these metrics where present, then the general block's.
CURVE_METRICS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "score",
    "reliability",
    "generalization",
    "locality",
)


def curve_table(curve: Sequence[dict]) -> str:
    """Markdown table of a lifelong curve: edits | rounds | main metrics | general | s."""
    names = [n for n in CURVE_METRICS if any(n in p.get("metrics", {}) for p in curve)]
    gen = sorted({k for p in curve for k in (p.get("general") or {})})
    lines = [
        "| edits | rounds | " + " | ".join(names + gen) + " | seconds |",
        "|---" * (3 + len(names) + len(gen)) + "|",
    ]
    for p in curve:
        cells = [_num((p["metrics"].get(n) or {}).get("mean")) for n in names]
        cells += [_num((p.get("general") or {}).get(k)) for k in gen]
        lines.append(
            f"| {p['edits']} | {p['rounds']} | " + " | ".join(cells) + f" | {p['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def quick_lines(before: dict, after: dict, n_facts: int) -> str:
    """A small before/after text table of the main metrics (demo, notebooks)."""
    names = [
        n
        for n in (
            "efficacy_score",
            "paraphrase_score",
            "neighborhood_score",
            "reliability",
            "generalization",
            "locality",
            "reverse",
            "portability",
        )
        if n in before or n in after
    ]
    w = max(map(len, names)) + 2
    fmt = lambda s: "     —" if s is None else f"{s['mean']:8.2f}"
    lines = [f"{'metric':<{w}}{'before':>8}{'after':>8}   ({n_facts} facts)"]
    lines += [f"{n:<{w}}{fmt(before.get(n))}{fmt(after.get(n))}" for n in names]
    return "\n".join(lines)


def json_default(o: Any) -> Any:
    """numpy values as Python numbers / lists; anything else as its string."""
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def as_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types (what a reader of the written file gets back)."""
    return json.loads(json.dumps(obj, default=json_default))
