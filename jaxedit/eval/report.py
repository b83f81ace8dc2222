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
    tail = (
        f"edit+eval: median {pe.get('median') or 0:.2f} s/case, p90 {pe.get('p90') or 0:.2f} s, "
        f"total {sec.get('total') or 0:.1f} s"
    )
    return "\n".join([head, "", table(result), "", tail])


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
