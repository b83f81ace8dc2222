"""The evaluation runner: edit, measure, revert (or accumulate), summarise, for any method.

`evaluate(lm, requests, edit, mode=...)` measures the unedited model first (the baseline, one
batched pass over every case), then, per mode:

- `independent` (ROME / EasyEdit default): for each case, `edit(lm, [request])`, measure the
  edited model, drop it. Params are immutable, so "revert" is using the original `lm` again.
- `sequential`: edits accumulate (`lm <- edit(lm, [r]).model`; in-context prefixes are
  joined); every `every` edits and after the last, all edits so far are measured.
- `batch`: `edit(lm, chunk)` for chunks of `batch_size` requests (MEMIT-style methods), each
  chunk measured on its own edited model.

Each case is measured with one batched `metrics.score_targets` call over all its queries.
Per-case results are appended to `DIR/cases.jsonl` as they are measured (a crash or Ctrl-C
loses nothing; `resume=True` skips finished cases), then summarised into `DIR/results.json`
and `DIR/results.md`. Metric definitions: `jaxedit.eval.scoring`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxedit.errors import InputError
from jaxedit.eval import scoring as metrics
from jaxedit.eval.datasets import group_cases
from jaxedit.methods.legacy import EditResult
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

MODES = ("independent", "sequential", "batch")
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

EditFn = Callable[[LanguageModel, list[EditRequest]], EditResult]


# ----------------------------------------------------------------------------- queries


def queries(r: EditRequest) -> list[tuple[tuple, str, str]]:
    """Every (key, prompt, target) a request is scored on; keys say what each one is for."""
    q: list[tuple[tuple, str, str]] = []
    prompts = [("rw", 0, r.rewrite_prompt)] + [
        ("pp", i, p) for i, p in enumerate(r.paraphrase_prompts)
    ]
    for kind, i, p in prompts:
        q.append(((kind, i, "new"), p, r.target_new))
        if r.target_true:
            q.append(((kind, i, "true"), p, r.target_true))
    for i, probe in enumerate(r.neighborhood):
        q.append((("nb", i, "ans"), probe.prompt, probe.answers[0]))
        if _cf_neighbour(r, probe):
            q.append((("nb", i, "new"), probe.prompt, r.target_new))
    for name, probes in (("port", r.portability), ("rev", r.reverse)):
        for i, probe in enumerate(probes):
            for j, a in enumerate(probe.answers):
                q.append(((name, i, j), probe.prompt, a))
    return q


def _cf_neighbour(r: EditRequest, probe) -> bool:
    """CounterFact neighbours share the case's true object: ROME's NS compares new vs true."""
    return bool(r.target_true) and probe.answers[0] == r.target_true


def measure(
    lm: LanguageModel, requests: Sequence[EditRequest], *, prefix: str | None = None
) -> list[dict]:
    """Raw scores of every query of every request, in one batched scoring call.

    Returns per request {key: (nll, token_acc, exact, argmax ids)}.
    """
    uniq: dict[tuple[str, str], int] = {}
    per_req: list[list[tuple[tuple, int]]] = []
    for r in requests:
        rows = []
        for key, p, t in queries(r):
            idx = uniq.setdefault((p, t), len(uniq))
            rows.append((key, idx))
        per_req.append(rows)
    pairs = list(uniq)
    s = metrics.score_targets(lm, [p for p, _ in pairs], [t for _, t in pairs], prefix=prefix)
    nll, acc, exact = s.nll, s.token_acc, s.exact
    return [
        {k: (float(nll[i]), float(acc[i]), bool(exact[i]), s.argmax[i]) for k, i in rows}
        for rows in per_req
    ]


def case_metrics(r: EditRequest, post: dict, pre: dict | None = None) -> dict[str, float]:
    """The per-case metrics of `jaxedit.eval.scoring` from raw scores (see its table)."""
    m: dict[str, float] = {}
    NLL, ACC, EXACT, ARG = 0, 1, 2, 3
    n_pp = len(r.paraphrase_prompts)
    if r.target_true:
        for kind, name, n in (("rw", "efficacy", 1), ("pp", "paraphrase", n_pp)):
            if n == 0:
                continue
            new = np.array([post[(kind, i, "new")][NLL] for i in range(n)])
            true = np.array([post[(kind, i, "true")][NLL] for i in range(n)])
            m[f"{name}_score"] = metrics.efficacy_score(new, true)
            m[f"{name}_magnitude"] = metrics.efficacy_magnitude(new, true)
            m[f"{name}_acc"] = float(np.mean([post[(kind, i, "new")][EXACT] for i in range(n)]))
    cf = [i for i, p in enumerate(r.neighborhood) if _cf_neighbour(r, p)]
    if cf:
        new = np.array([post[("nb", i, "new")][NLL] for i in cf])
        true = np.array([post[("nb", i, "ans")][NLL] for i in cf])
        m["neighborhood_score"] = metrics.neighborhood_score(new, true)
        m["neighborhood_magnitude"] = metrics.neighborhood_magnitude(new, true)
        m["neighborhood_acc"] = float(np.mean([post[("nb", i, "ans")][EXACT] for i in cf]))
    m["reliability"] = post[("rw", 0, "new")][ACC]
    if n_pp:
        m["generalization"] = float(np.mean([post[("pp", i, "new")][ACC] for i in range(n_pp)]))
    if r.neighborhood:
        nb = range(len(r.neighborhood))
        m["specificity_acc"] = float(np.mean([post[("nb", i, "ans")][ACC] for i in nb]))
        if pre is not None:
            agree = [
                metrics.locality_agreement(pre[("nb", i, "ans")][ARG], post[("nb", i, "ans")][ARG])
                for i in nb
            ]
            m["locality"] = float(np.mean(agree))
    for name, probes in (("port", r.portability), ("rev", r.reverse)):
        if not probes:
            continue
        # Several aliases: the probe counts as its best-scoring alias.
        best = [
            max(post[(name, i, j)][ACC] for j in range(len(p.answers)))
            for i, p in enumerate(probes)
        ]
        if name == "rev":
            m["reverse"] = float(np.mean(best))
            continue
        m["portability"] = float(np.mean(best))
        by_kind: dict[str, list[float]] = defaultdict(list)
        for p, b in zip(probes, best, strict=True):
            by_kind[p.kind or "portability"].append(b)
        for kind, vals in by_kind.items():
            m[f"portability/{kind}"] = float(np.mean(vals))
    return m


def generation_metrics(
    lm: LanguageModel,
    r: EditRequest,
    *,
    prefix: str | None = None,
    max_new_tokens: int = 40,
    tfidf: metrics.TfIdf | None = None,
) -> dict[str, float]:
    """fluency (and consistency when the request has `extra["reference_texts"]`): greedy
    generations from the generation prompts (or the rewrite prompt when there are none)."""
    from jaxedit.models.generate import generate

    prompts = list(r.generation_prompts) or [r.rewrite_prompt]
    texts = [generate(lm, (prefix or "") + p, max_new_tokens) for p in prompts]
    texts = [p + t for p, t in zip(prompts, texts, strict=True)]
    m = {"fluency": metrics.fluency(texts)}
    refs = r.extra.get("reference_texts")
    if refs and tfidf is not None:
        m["consistency"] = metrics.consistency(tfidf, texts, refs)
    return m


# ----------------------------------------------------------------------------- summaries


def summarize(case_metrics_list: Sequence[dict[str, float]]) -> dict[str, dict]:
    """{name: {mean, std, n}} over the cases that have the metric; `score` = hmean of means."""
    vals: dict[str, list[float]] = defaultdict(list)
    for cm in case_metrics_list:
        for k, v in cm.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                vals[k].append(float(v))
    out = {
        k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
        for k, v in vals.items()
    }
    parts = ("efficacy_score", "paraphrase_score", "neighborhood_score")
    if all(p in out for p in parts):
        out["score"] = {
            "mean": metrics.harmonic_score(*(out[p]["mean"] for p in parts)),
            "std": None,
            "n": min(out[p]["n"] for p in parts),
        }
    return out


def _ordered(names) -> list[str]:
    names = set(names)
    head = [n for n in TABLE_ORDER if n in names]
    return head + sorted(names - set(head))


def table(result: dict) -> str:
    """Markdown table: metric | baseline | method (mean ± std, n)."""
    post, base = result.get("metrics", {}), result.get("baseline", {})
    method = result.get("method", "edited")
    lines = [f"| metric | unedited | {method} | n |", "|---|---|---|---|"]
    fmt = lambda s: (
        "—"
        if s is None
        else (f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s.get("std") is not None else ""))
    )
    for name in _ordered(set(post) | set(base)):
        n = (post.get(name) or base.get(name) or {}).get("n", "")
        lines.append(f"| {name} | {fmt(base.get(name))} | {fmt(post.get(name))} | {n} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    head = (
        f"{result['method']} on {result['model']}, {result['data']} "
        f"({result['n']} cases, mode {result['mode']}"
        + (f", {result['n_dropped']} dropped as unknown" if result.get("known_only") else "")
        + ")"
    )
    sec = result.get("seconds", {})
    pe = sec.get("per_edit") or {}
    tail = (
        f"edit+eval: median {pe.get('median') or 0:.2f} s/case, p90 {pe.get('p90') or 0:.2f} s, "
        f"total {sec.get('total') or 0:.1f} s"
    )
    return "\n".join([head, "", table(result), "", tail])


# ----------------------------------------------------------------------------- runner


def _append(path: Path | None, row: dict) -> None:
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, rows: list[dict]) -> None:
    """Replace `path` by `rows` (JSON lines) atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _read_done(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is intact
    return rows


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, disable=not enabled)


def _measure_edited(lm, res: EditResult, reqs, pre_by_id) -> list[dict]:
    """Post-edit scores; an edit that changed nothing (same params, no context) reuses the
    baseline instead of recomputing identical numbers (`--method none`)."""
    if res.model.params is lm.params and not res.context:
        return [pre_by_id[id(r)] for r in reqs]
    return measure(res.model, reqs, prefix=res.context)


def _known(r: EditRequest, pre: dict) -> bool | None:
    if not r.target_true:
        return None
    return pre[("rw", 0, "true")][0] < pre[("rw", 0, "new")][0]


def evaluate(
    lm: LanguageModel,
    requests: Sequence[EditRequest],
    edit: EditFn,
    *,
    method: str = "custom",
    mode: str = "independent",
    known_only: bool = False,
    every: int | None = None,
    batch_size: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    generation: bool = False,
    tfidf: metrics.TfIdf | None = None,
    info: dict | None = None,
) -> dict:
    """Run an evaluation; returns the results dict (also written to `out` when given).

    Arguments:
        lm: the unedited model (never modified: every edit starts from it in independent mode).
        requests: edit requests; requests sharing `extra["group"]` are edited together.
        edit: `edit(lm, requests) -> EditResult` (a prepared `jaxedit.methods.legacy` method).
        known_only: keep only cases whose rewrite prompt the unedited model completes with
            target_true rather than target_new (lower mean token NLL); the rest are dropped
            and counted in `n_dropped`.
        every: sequential mode: also measure all edits so far every `every` edits.
        batch_size: batch mode: requests per edit call (default: all).
        info: extra fields for results.json (data path, hparams, seed, ...).
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not requests:
        raise InputError("no requests to evaluate")
    t_start = time.time()
    groups = group_cases(list(requests))
    flat = [r for g in groups for r in g]
    pre_all = measure(lm, flat)  # the baseline: one batched pass over every case
    pre_by_id = {id(r): p for r, p in zip(flat, pre_all, strict=True)}

    n_dropped = 0
    if known_only:
        kept = [g for g in groups if all(_known(r, pre_by_id[id(r)]) for r in g)]
        n_dropped = len(groups) - len(kept)
        groups = kept
        if not groups:
            raise InputError("--known-only dropped every case: the model knows none of them")

    out_dir = Path(out) if out is not None else None
    cases_path = None
    done: dict[str, dict] = {}
    header = {
        "method": method,
        "model": lm.name,
        "mode": mode,
        "n": len(groups),
        "known_only": known_only,
        **(info or {}),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cases_path = out_dir / "cases.jsonl"
        run_path = out_dir / "run.json"
        if resume:
            if mode != "independent":
                raise InputError("--resume works in independent mode only")
            if run_path.exists():
                prev = json.loads(run_path.read_text())
                diff = {k for k in header if prev.get(k) != header[k] and k != "hparams"}
                if diff:
                    raise InputError(f"--resume: {out_dir} holds a different run ({sorted(diff)})")
            intact = _read_done(cases_path)
            done = {str(row["case_id"]): row for row in intact if "case_id" in row}
            # Drop a line cut by the crash before appending: rows written after it would be
            # glued to it and lost to the next resume.
            _rewrite(cases_path, intact)
        elif cases_path.exists():
            cases_path.unlink()
        run_path.write_text(json.dumps(header, indent=2, default=_json_default))

    rows: list[dict] = []
    checkpoints: list[dict] = []
    edit_seconds: list[float] = []

    def finish_case(g, result: EditResult, post: list[dict], secs: float, lm_post):
        for r, p in zip(g, post, strict=True):
            pre = pre_by_id[id(r)]
            m = case_metrics(r, p, pre)
            b = case_metrics(r, pre, pre)
            if generation:
                m |= generation_metrics(lm_post, r, prefix=result.context, tfidf=tfidf)
                b |= generation_metrics(lm, r, tfidf=tfidf)
            row = {
                "case_id": r.case_id,
                "metrics": m,
                "baseline": b,
                "seconds": secs,
                "edit": result.summary or {},
            }
            rows.append(row)
            _append(cases_path, row)

    bar = _progress(len(groups), progress, f"{method} {mode}")
    try:
        if mode == "independent":
            for g in groups:
                if str(g[0].case_id) in done:
                    rows.extend(done[str(r.case_id)] for r in g if str(r.case_id) in done)
                    # a resumed case keeps the time it took when it was measured
                    edit_seconds.append(float(done[str(g[0].case_id)].get("seconds", 0.0)))
                    bar.update(1)
                    continue
                t0 = time.time()
                res = edit(lm, list(g))
                jax.block_until_ready(res.model.params)
                post = _measure_edited(lm, res, g, pre_by_id)
                secs = time.time() - t0
                edit_seconds.append(secs)
                finish_case(g, res, post, secs, res.model)
                bar.update(1)
        elif mode == "sequential":
            cur, contexts, last = lm, [], None
            for k, g in enumerate(groups):
                t0 = time.time()
                last = edit(cur, list(g))
                jax.block_until_ready(last.model.params)
                edit_seconds.append(time.time() - t0)
                cur = last.model
                if last.context:
                    contexts.append(last.context)
                if every and (k + 1) % every == 0 and k + 1 < len(groups):
                    so_far = [r for gg in groups[: k + 1] for r in gg]
                    post = measure(cur, so_far, prefix="".join(contexts) or None)
                    summ = summarize(
                        [
                            case_metrics(r, p, pre_by_id[id(r)])
                            for r, p in zip(so_far, post, strict=True)
                        ]
                    )
                    checkpoints.append({"after": k + 1, "metrics": summ})
                    _append(cases_path, {"checkpoint": k + 1, "metrics": summ})
                bar.update(1)
            prefix = "".join(contexts) or None
            final = EditResult(model=cur, context=prefix, summary=last.summary if last else {})
            post = measure(cur, flat_of(groups), prefix=prefix)
            i = 0
            for g in groups:
                finish_case(g, final, post[i : i + len(g)], None, cur)
                i += len(g)
        else:  # batch
            reqs = flat_of(groups)
            size = batch_size or len(reqs)
            if size <= 0:
                raise InputError("--batch-size must be positive")
            for lo in range(0, len(reqs), size):
                chunk = reqs[lo : lo + size]
                t0 = time.time()
                res = edit(lm, chunk)
                jax.block_until_ready(res.model.params)
                post = _measure_edited(lm, res, chunk, pre_by_id)
                secs = (time.time() - t0) / len(chunk)
                edit_seconds.append(secs)
                for r, p in zip(chunk, post, strict=True):
                    finish_case([r], res, [p], secs, res.model)
                bar.update(len(chunk))
    finally:
        bar.close()

    secs = list(edit_seconds)
    result = {
        **header,
        "data": (info or {}).get("data", ""),
        "n_dropped": n_dropped,
        "hparams": (info or {}).get("hparams"),
        "metrics": summarize([r["metrics"] for r in rows]),
        "baseline": summarize([r["baseline"] for r in rows]),
        "seconds": {
            "per_edit": {
                "median": float(np.median(secs)) if secs else None,
                "p90": float(np.percentile(secs, 90)) if secs else None,
            },
            "total": time.time() - t_start,
        },
        "checkpoints": checkpoints,
        "cases": rows,
    }
    if out_dir is not None:
        (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=_json_default))
        (out_dir / "results.md").write_text(render(result) + "\n")
    return result


def flat_of(groups: Sequence[Sequence[EditRequest]]) -> list[EditRequest]:
    return [r for g in groups for r in g]


# ----------------------------------------------------------------------------- demo helper


def quick_table(
    lm_before: LanguageModel,
    lm_after: LanguageModel,
    requests: Sequence[EditRequest],
    *,
    context: str | None = None,
) -> str:
    """A small before/after table of the main metrics (for `jaxedit demo` and notebooks).

    `lm_after` is the edited model (or `lm_before` plus an in-context `context`).
    """
    pre = measure(lm_before, requests)
    post = measure(lm_after, requests, prefix=context)
    before = summarize([case_metrics(r, p, p) for r, p in zip(requests, pre, strict=True)])
    after = summarize([case_metrics(r, q, p) for r, q, p in zip(requests, post, pre, strict=True)])
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
    lines = [f"{'metric':<{w}}{'before':>8}{'after':>8}   ({len(requests)} facts)"]
    for n in names:
        b = before.get(n, {}).get("mean")
        a = after.get(n, {}).get("mean")
        f = lambda x: "     —" if x is None else f"{x:8.2f}"
        lines.append(f"{n:<{w}}{f(b)}{f(a)}")
    return "\n".join(lines)


def as_jsonable(result: dict) -> dict[str, Any]:
    return json.loads(json.dumps(result, default=_json_default))
