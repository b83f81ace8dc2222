"""The evaluation runner: edit through the method protocol, measure, summarise, for any method.

    result = evaluate(lm, requests, method, state, mode="independent", out="runs/rome")

Every edit is `edit, info = method.compute(model, state, requests)` then `jaxedit.apply(model,
edit)`; the edited model is measured as it is, a context edit included (scoring reads
`lm.context_text()`). The unedited model is measured first (the baseline, one batched pass
over every case, also what `known_only` reads), then one function per mode:

- `run_independent` (ROME / EasyEdit default): each case is edited from the original model and
  measured; params are immutable, so "revert" is using the original `lm` again.
- `run_sequential`: edits accumulate, `model <- apply(model, edit)`: weight edits add up and
  context edits compose (`ContextEdit.compose`: one context with every fact so far). Every
  `every` edits and after the last, all cases so far are measured on the accumulated model.
- `run_batch`: `compute` on chunks of `batch_size` requests (MEMIT-style methods; a group of
  requests, e.g. MQuAKE's rewrites of one case, is never split), each chunk measured on its
  own edited model.

An edit that changes nothing (the `none` method: an empty weight edit, no context) reuses the
baseline's scores. Per-case results are appended to `DIR/cases.jsonl` as they are measured (a
crash or Ctrl-C loses nothing; `resume=True` skips finished cases), then summarised into
`DIR/results.json` and `DIR/results.md` (`jaxedit.eval.report`). Metric definitions:
`jaxedit.eval.metrics`; what each request is scored on: `jaxedit.eval.measure`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxedit.edits import Edit, apply
from jaxedit.errors import InputError
from jaxedit.eval import report
from jaxedit.eval.datasets import group_cases
from jaxedit.eval.datasets.snippets import AttributeSnippets
from jaxedit.eval.generation import Decoding, generation_metrics
from jaxedit.eval.measure import Scores, case_metrics, is_known, measure
from jaxedit.eval.metrics import TfIdf
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

MODES = ("independent", "sequential", "batch")

EditFn = Callable[[LanguageModel, list[EditRequest]], tuple[Edit, dict]]


# ----------------------------------------------------------------------------- case log


class CaseLog:
    """`DIR/run.json` (what runs), `DIR/cases.jsonl` (one JSON line per measured case, appended
    and fsynced), `DIR/results.json` + `results.md`. Without a directory it records nothing."""

    def __init__(self, out: str | Path | None, header: dict, *, resume: bool):
        self.dir = None if out is None else Path(out)
        self.done: dict[str, dict] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cases = self.dir / "cases.jsonl"
        run_path = self.dir / "run.json"
        if resume:
            if run_path.exists():
                prev = json.loads(run_path.read_text())
                diff = sorted(k for k in set(prev) | set(header) if prev.get(k) != header.get(k))
                if diff:
                    raise InputError(f"--resume: {self.dir} holds a different run ({diff})")
            intact = _read_rows(self.cases)
            self.done = {str(row["case_id"]): row for row in intact if "case_id" in row}
            # Drop a line cut by the crash before appending: rows written after it would be
            # glued to it and lost to the next resume.
            self._rewrite(intact)
        elif self.cases.exists():
            self.cases.unlink()
        run_path.write_text(json.dumps(header, indent=2))

    def append(self, row: dict) -> None:
        if self.dir is None:
            return
        with open(self.cases, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=report.json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_results(self, result: dict) -> None:
        if self.dir is None:
            return
        text = json.dumps(result, indent=1, default=report.json_default)
        (self.dir / "results.json").write_text(text)
        (self.dir / "results.md").write_text(report.render(result) + "\n")

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.cases.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, default=report.json_default) + "\n" for r in rows))
        os.replace(tmp, self.cases)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is intact
    return rows


# ----------------------------------------------------------------------------- one run


@dataclass
class Generation:
    """Settings of the generation metrics: the decoding, and the attribute snippets whose
    texts are the consistency references (and ROME's TF-IDF corpus)."""

    decoding: Decoding
    snippets: AttributeSnippets | None = None
    tfidf: TfIdf | None = field(default=None, init=False)

    def __post_init__(self):
        if self.snippets is not None:
            self.tfidf = TfIdf.fit(self.snippets.texts)

    def measure(self, lm: LanguageModel, r: EditRequest) -> tuple[dict[str, float], list[str]]:
        refs = self.snippets.references(r) if self.snippets is not None else []
        return generation_metrics(lm, r, self.decoding, references=refs, tfidf=self.tfidf)


@dataclass
class _Run:
    """What every mode shares: the unedited model and its scores, the edit function, the log."""

    lm: LanguageModel
    edit_fn: EditFn
    baseline: dict[int, Scores]  # by id(request)
    log: CaseLog
    generation: Generation | None
    bar: Any
    rows: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    base_generation: dict[int, tuple[dict, list[str]]] = field(default_factory=dict)

    def edit(self, lm: LanguageModel, reqs: list[EditRequest]) -> tuple[LanguageModel, dict]:
        edit, info = self.edit_fn(lm, reqs)
        edited = apply(lm, edit)
        jax.block_until_ready(edited.params)
        return edited, info

    def unchanged(self, edited: LanguageModel) -> bool:
        """The edit changed nothing: same params, same context (e.g. the `none` method)."""
        return edited.params is self.lm.params and edited.context is self.lm.context

    def scores(self, edited: LanguageModel, reqs: Sequence[EditRequest]) -> list[Scores]:
        if self.unchanged(edited):
            return [self.baseline[id(r)] for r in reqs]
        return measure(edited, reqs)

    def record(self, reqs, posts, secs: float | None, edited: LanguageModel, info: dict) -> None:
        """Per-case metrics (edited and unedited) into the rows and the log."""
        for r, post in zip(reqs, posts, strict=True):
            pre = self.baseline[id(r)]
            row = {
                "case_id": r.case_id,
                "metrics": case_metrics(r, post, pre),
                "baseline": case_metrics(r, pre, pre),
                "seconds": secs,
                "edit": info,
            }
            if self.generation is not None:
                base, base_texts = self._base_generation(r)
                gen, texts = (
                    (base, base_texts)
                    if self.unchanged(edited)
                    else self.generation.measure(edited, r)
                )
                row["metrics"] |= gen
                row["baseline"] |= base
                row["generated"] = texts
            self.rows.append(row)
            self.log.append(row)

    def _base_generation(self, r: EditRequest) -> tuple[dict, list[str]]:
        if id(r) not in self.base_generation:
            self.base_generation[id(r)] = self.generation.measure(self.lm, r)
        return self.base_generation[id(r)]


# ----------------------------------------------------------------------------- modes


def run_independent(run: _Run, groups: list[list[EditRequest]]) -> None:
    """Each group edited from the original model, measured, dropped."""
    for g in groups:
        done = [run.log.done.get(str(r.case_id)) for r in g]
        if all(done):
            run.rows.extend(done)
            run.seconds.append(float(done[0].get("seconds") or 0.0))  # its measured time
            run.bar.update(1)
            continue
        t0 = time.time()
        edited, info = run.edit(run.lm, g)
        posts = run.scores(edited, g)
        secs = time.time() - t0
        run.seconds.append(secs)
        run.record(g, posts, secs, edited, info)
        run.bar.update(1)


def run_sequential(run: _Run, groups: list[list[EditRequest]], every: int | None) -> list[dict]:
    """Edits accumulate on one model; returns the checkpoints measured every `every` edits."""
    cur, infos, checkpoints = run.lm, [], []
    for k, g in enumerate(groups):
        t0 = time.time()
        cur, info = run.edit(cur, g)
        run.seconds.append(time.time() - t0)
        infos.append(info)
        if every and (k + 1) % every == 0 and k + 1 < len(groups):
            so_far = [r for gg in groups[: k + 1] for r in gg]
            posts = run.scores(cur, so_far)
            per_case = [
                case_metrics(r, p, run.baseline[id(r)]) for r, p in zip(so_far, posts, strict=True)
            ]
            checkpoints.append({"after": k + 1, "metrics": report.summarize(per_case)})
            run.log.append({"checkpoint": k + 1, "metrics": checkpoints[-1]["metrics"]})
        run.bar.update(1)
    posts = run.scores(cur, [r for g in groups for r in g])
    i = 0
    for g, info in zip(groups, infos, strict=True):
        run.record(g, posts[i : i + len(g)], None, cur, info)
        i += len(g)
    return checkpoints


def run_batch(run: _Run, groups: list[list[EditRequest]], batch_size: int | None) -> None:
    """One edit per chunk of about `batch_size` requests (whole groups), measured on its own."""
    size = batch_size or sum(map(len, groups))
    if size <= 0:
        raise InputError("--batch-size must be positive")
    for chunk in _chunks(groups, size):
        t0 = time.time()
        edited, info = run.edit(run.lm, chunk)
        posts = run.scores(edited, chunk)
        secs = (time.time() - t0) / len(chunk)
        run.seconds.extend([secs] * len(chunk))
        run.record(chunk, posts, secs, edited, info)
        run.bar.update(len(chunk))


def _chunks(groups: list[list[EditRequest]], size: int):
    """Consecutive groups joined into chunks of at most `size` requests (a bigger group alone)."""
    chunk: list[EditRequest] = []
    for g in groups:
        if chunk and len(chunk) + len(g) > size:
            yield chunk
            chunk = []
        chunk = chunk + g
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    lm: LanguageModel,
    requests: Sequence[EditRequest],
    method: EditMethod,
    state: Any,
    *,
    mode: str = "independent",
    known_only: bool = False,
    every: int | None = None,
    batch_size: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    generation: Decoding | None = None,
    snippets: AttributeSnippets | None = None,
    info: dict | None = None,
) -> dict:
    """Run an evaluation; returns the results dict (also written to `out` when given).

    Arguments:
        lm: the unedited model (never modified: every edit starts from it in independent mode).
        requests: edit requests; requests sharing `extra["group"]` are edited together.
        method, state: an `EditMethod` and what its `prepare` returned.
        known_only: keep only cases whose rewrite prompt the unedited model completes with
            target_true rather than target_new (lower mean token NLL); the rest are dropped
            and counted in `n_dropped`.
        every: sequential mode: also measure all edits so far every `every` edits.
        batch_size: batch mode: requests per edit call (default: all).
        generation: also measure fluency (and consistency with `snippets`) with this decoding.
        snippets: attribute snippets, the consistency references (`datasets.snippets`).
        info: extra JSON-able fields for results.json (data path, hparams, seed, ...); a
            resumed run must match them.
    """
    _check(mode, requests, resume, generation, snippets)
    t_start = time.time()
    groups = group_cases(list(requests))
    flat = [r for g in groups for r in g]
    baseline = {id(r): s for r, s in zip(flat, measure(lm, flat), strict=True)}
    n_dropped = 0
    if known_only:
        kept = [g for g in groups if all(is_known(r, baseline[id(r)]) for r in g)]
        n_dropped, groups = len(groups) - len(kept), kept
        if not groups:
            raise InputError("--known-only dropped every case: the model knows none of them")
    header = report.as_jsonable(
        {
            "method": method.name,
            "model": lm.name,
            "mode": mode,
            "n": len(groups),
            "known_only": known_only,
            "decoding": None if generation is None else dataclasses.asdict(generation),
            "snippets": None if snippets is None else snippets.path,
            **(info or {}),
        }
    )
    log = CaseLog(out, header, resume=resume)
    gen = None if generation is None else Generation(generation, snippets)
    bar = _progress(
        len(groups) if mode != "batch" else len(flat), progress, f"{method.name} {mode}"
    )
    edit_fn = lambda model, reqs: method.compute(model, state, reqs)
    run = _Run(lm, edit_fn, baseline, log, gen, bar)
    checkpoints: list[dict] = []
    try:
        if mode == "independent":
            run_independent(run, groups)
        elif mode == "sequential":
            checkpoints = run_sequential(run, groups, every)
        else:
            run_batch(run, groups, batch_size)
    finally:
        bar.close()
    result = {
        **header,
        "data": header.get("data", ""),
        "hparams": header.get("hparams"),
        "n_dropped": n_dropped,
        "metrics": report.summarize([r["metrics"] for r in run.rows]),
        "baseline": report.summarize([r["baseline"] for r in run.rows]),
        "seconds": {"per_edit": _spread(run.seconds), "total": time.time() - t_start},
        "checkpoints": checkpoints,
        "cases": run.rows,
    }
    log.write_results(result)
    return result


def _check(mode, requests, resume, generation, snippets) -> None:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not requests:
        raise InputError("no requests to evaluate")
    if resume and mode != "independent":
        raise InputError("--resume works in independent mode only")
    if snippets is not None:
        if generation is None:
            raise InputError("--snippets are the references of generated texts: add --generation")
        if not any(snippets.references(r) for r in requests):
            raise InputError(
                f"no request matches a snippet of {snippets.path} by (relation_id, target_new "
                "id): only ROME-form CounterFact (and MQuAKE) records carry those ids"
            )


def _spread(secs: list[float]) -> dict:
    if not secs:
        return {"median": None, "p90": None}
    return {"median": float(np.median(secs)), "p90": float(np.percentile(secs, 90))}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, disable=not enabled)


# ----------------------------------------------------------------------------- demo helper


def quick_table(
    lm_before: LanguageModel, lm_after: LanguageModel, requests: Sequence[EditRequest]
) -> str:
    """A small before/after table of the main metrics (for `jaxedit demo` and notebooks).

    `lm_after` is the edited model (`jaxedit.apply(lm_before, edit)`, a context edit included).
    """
    pre = measure(lm_before, requests)
    post = measure(lm_after, requests)
    before = report.summarize([case_metrics(r, p, p) for r, p in zip(requests, pre, strict=True)])
    after = report.summarize(
        [case_metrics(r, q, p) for r, q, p in zip(requests, post, pre, strict=True)]
    )
    return report.quick_lines(before, after, len(requests))
