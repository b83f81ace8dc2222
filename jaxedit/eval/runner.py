"""The evaluation runner: edit through the method protocol, measure, summarise, for any method.

    result = evaluate(lm, requests, method, state, mode="independent", out="runs/rome")

The edited model is `jaxedit.apply(model, edit)` and is measured as it is, a context edit
included (scoring reads `lm.context_text()`). The unedited model is measured first (the
baseline, one batched pass over every case, also what `known_only` reads), then one function
per mode:

- `run_independent` (ROME / EasyEdit default): `method.compute` per case (a group of requests,
  e.g. MQuAKE's rewrites of one case, together) from the original model, measured, dropped;
  params are immutable, so "revert" is using the original `lm` again.
- `run_sequential` (lifelong editing): rounds of requests, `batch_size` per round (whole groups,
  never split; default one group per round), each `edit, info, state = method.step(model,
  state, round)` on the model every earlier round edited; the edits accumulate (weight edits
  add up, context edits compose into one context). Every case is measured on the final model
  after the last round (AlphaEdit's protocol); every `every` rounds a curve point measures all
  cases edited so far, and the general block, on the model so far.
- `run_batch` (MEMIT-style mass editing): `method.compute` (stateless) on chunks of
  `batch_size` requests (whole groups), each chunk measured on its own edited model.

Answer metrics by generation (`measure.measure_generated`: greedy continuations of every
prompt a case is scored on, `*_gen`) run with `gen_metrics=True`, and by default with
`generation` (`jaxedit eval` also turns them on for runs of at most `GEN_METRICS_MAX_CASES`
cases); the unedited model's continuations are decoded once for all cases, the edited model's
per case (per chunk / on the final model in batch / sequential mode), in batched calls.

Every run also measures general ability, unedited vs edited (`jaxedit.eval.general`:
perplexity of a fixed text, accuracy on facts the run does not edit, fluency); the edited
model is the final one (sequential) or the one after the last edit (independent, batch).

Files, in `out`: per-case results appended to `cases.jsonl` as they are measured (a crash or
Ctrl-C loses nothing; also `{"curve": point}` and, in independent mode, `{"general": the last
edited model's block, "after": its case id}` lines), then `results.json` and `results.md`
(`jaxedit.eval.report`). `resume=True` continues a run: independent mode skips finished cases;
sequential mode restarts from the checkpoint written after every round,
`lifelong/progress.json` (rounds done, their case ids, infos, curve, seconds) naming
`lifelong/round-NNNNNN/` (`edit.safetensors`: the accumulated edit, one delta per weight;
`state`: `method.save_state`); a resumed run ends with the results of an uninterrupted one. A
resumed run may have more cases than the one it continues (a larger `--n`): the finished ones
are kept (sequential: the saved rounds must be its first rounds) and the rest are run.
Several processes (`jaxedit.distributed.initialize`) split the work: each process runs its
share of the cases (independent mode) or chunks (batch mode), `distributed.work_share` (every
n-th), on its own devices, and the rows are joined in case order (`distributed.gather_units`), so
every process returns what one process would; only process 0 writes files (its cases.jsonl gets
the other processes' rows when they are joined; on --resume every process skips the cases
process 0's log holds). Each process measures the unedited model on its own cases only. A
sequential run's rounds edit one model in order: every process runs all of them. A model on a
mesh spanning processes is one SPMD program: every process then runs every case in lockstep.

Metric definitions: `jaxedit.eval.metrics`; what each request is scored on:
`jaxedit.eval.measure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxedit import distributed
from jaxedit import progress as progress_bars
from jaxedit.edits import Edit, WeightEdit, apply, load_edit, save_edit
from jaxedit.errors import CheckpointError, InputError
from jaxedit.eval import report
from jaxedit.eval.datasets import group_cases
from jaxedit.eval.datasets.snippets import AttributeSnippets
from jaxedit.eval.general import GeneralSuite, measure_general, with_known_facts
from jaxedit.eval.generation import Decoding, generation_metrics
from jaxedit.eval.measure import (
    GEN_MARGIN,
    GenScores,
    Scores,
    case_metrics,
    gen_case_metrics,
    is_known,
    measure,
    measure_generated,
)
from jaxedit.eval.metrics import TfIdf
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

MODES = ("independent", "sequential", "batch")
GEN_METRICS_MAX_CASES = 200  # `jaxedit eval`: answer metrics by generation up to this many cases
LIFELONG_DIR = "lifelong"
PROGRESS_FORMAT = "jaxedit-lifelong-progress"


# ----------------------------------------------------------------------------- case log


class CaseLog:
    """`DIR/run.json` (what runs), `DIR/cases.jsonl` (one JSON line per measured case, appended
    and fsynced), `DIR/results.json` + `results.md`. Without a directory it records nothing."""

    def __init__(self, out: str | Path | None, header: dict, *, resume: bool):
        self.dir = None if out is None else Path(out)
        self.done: dict[str, dict] = {}
        # independent runs: the general block measured after the edit of case id "after"
        self.general_after: dict[str | None, dict] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cases = self.dir / "cases.jsonl"
        run_path = self.dir / "run.json"
        if resume:
            if run_path.exists():
                prev = json.loads(run_path.read_text())
                # Another n (--n, --max-cases) is the same run cut elsewhere: a larger one extends
                # it (finished cases are kept; sequential rounds must be a prefix, checked there).
                keys = (set(prev) | set(header)) - {"n"}
                diff = sorted(k for k in keys if prev.get(k) != header.get(k))
                if diff:
                    raise InputError(f"--resume: {self.dir} holds a different run ({diff})")
            intact = _read_rows(self.cases)
            self.done = {str(row["case_id"]): row for row in intact if "case_id" in row}
            self.general_after = {r.get("after"): r["general"] for r in intact if "general" in r}
            # Drop a line cut by the crash before appending: rows written after it would be
            # glued to it and lost to the next resume.
            self.rewrite(intact)
        else:
            if self.cases.exists():
                self.cases.unlink()
            shutil.rmtree(self.dir / LIFELONG_DIR, ignore_errors=True)  # a fresh run
        _write_atomic(run_path, json.dumps(header, indent=2))

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
        _write_atomic(self.dir / "results.json", text)
        _write_atomic(self.dir / "results.md", report.render(result) + "\n")

    def rewrite(self, rows: list[dict]) -> None:
        """cases.jsonl holds exactly `rows` (atomically)."""
        if self.dir is None:
            return
        _write_atomic(
            self.cases, "".join(json.dumps(r, default=report.json_default) + "\n" for r in rows)
        )


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything before it is intact
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """What every mode shares: the unedited model and its scores, the method, the log."""

    lm: LanguageModel
    method: EditMethod
    state: Any
    baseline: dict[int, Scores]  # by id(request)
    log: CaseLog
    generation: Generation | None
    general: GeneralSuite | None
    bar: Any
    resume: bool = False
    t_start: float = field(default_factory=time.time)
    rows: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    base_generation: dict[int, tuple[dict, list[str]]] = field(default_factory=dict)
    base_general: dict | None = None
    last_general: dict | None = None  # the general block of the model after the last edit
    general_seconds: float = 0.0  # spent measuring edited models' general blocks
    gen_base: dict[int, GenScores] | None = None  # unedited continuations (None: no *_gen)
    units: dict[int, dict] = field(default_factory=dict)  # this process's rows by case / chunk

    @contextlib.contextmanager
    def unit(self, k: int):
        """Record the rows and seconds that case (or chunk) `k` adds (joined across processes
        by `join_processes`)."""
        n_rows, n_secs = len(self.rows), len(self.seconds)
        yield
        self.units[k] = {"rows": self.rows[n_rows:], "seconds": self.seconds[n_secs:]}

    def edit(self, lm: LanguageModel, reqs: list[EditRequest]) -> tuple[LanguageModel, dict]:
        """`method.compute` (stateless) applied to `lm`."""
        edit, info = self.method.compute(lm, self.state, reqs)
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

    def general_of(self, edited: LanguageModel) -> dict | None:
        """The general block's metrics of `edited` (None when the run measures none)."""
        if self.general is None:
            return None
        if self.unchanged(edited) and self.base_general is not None:
            return self.base_general
        t0 = time.time()
        out = measure_general(edited, self.general)
        self.general_seconds += time.time() - t0
        return out

    def record(
        self, reqs, posts, secs: float | None, edited: LanguageModel, info: dict, gens=None
    ) -> None:
        """Per-case metrics (edited and unedited) into the rows and the log (`gens`: the
        continuations on `edited` when already decoded)."""
        info = report.as_jsonable(info)  # as a resumed run reads it back
        gens = self.generated(edited, reqs) if gens is None else gens
        for k, (r, post) in enumerate(zip(reqs, posts, strict=True)):
            pre = self.baseline[id(r)]
            row = {
                "case_id": r.case_id,
                "metrics": case_metrics(r, post, pre),
                "baseline": case_metrics(r, pre, pre),
                "seconds": secs,
                "edit": info,
            }
            if gens is not None:
                g, g0 = gens[k], self.gen_base[id(r)]
                row["metrics"] |= gen_case_metrics(r, g, g0)
                row["baseline"] |= gen_case_metrics(r, g0, g0)
                row["continuations"] = {"/".join(map(str, key)): s.text for key, s in g.items()}
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

    def generated(self, edited: LanguageModel, reqs) -> list[GenScores] | None:
        """The greedy continuations of `reqs` on `edited` (None when the run has no *_gen)."""
        if self.gen_base is None:
            return None
        if self.unchanged(edited):
            return [self.gen_base[id(r)] for r in reqs]
        return measure_generated(edited, reqs)

    def summary(
        self, edited: LanguageModel, reqs: list[EditRequest], posts=None, gens=None
    ) -> dict:
        """The summary metrics of `reqs` measured on `edited` (a curve point; `posts` / `gens`:
        its scores / continuations when already measured)."""
        posts = self.scores(edited, reqs) if posts is None else posts
        gens = self.generated(edited, reqs) if gens is None else gens
        per_case = []
        for k, (r, p) in enumerate(zip(reqs, posts, strict=True)):
            m = case_metrics(r, p, self.baseline[id(r)])
            if gens is not None:
                m |= gen_case_metrics(r, gens[k], self.gen_base[id(r)])
            per_case.append(m)
        return report.summarize(per_case)

    def _base_generation(self, r: EditRequest) -> tuple[dict, list[str]]:
        if id(r) not in self.base_generation:
            self.base_generation[id(r)] = self.generation.measure(self.lm, r)
        return self.base_generation[id(r)]


# ----------------------------------------------------------------------------- modes


def run_independent(
    run: _Run, groups: list[list[EditRequest]], mine: Sequence[int] | None = None
) -> None:
    """Each group edited from the original model (`method.compute`), measured, dropped; `mine`:
    the indices of the groups this process runs (default all)."""
    last = len(groups) - 1
    for k in range(len(groups)) if mine is None else mine:
        g = groups[k]
        with run.unit(k):
            done = [run.log.done.get(str(r.case_id)) for r in g]
            if all(done):
                run.rows.extend(done)
                run.seconds.append(float(done[0].get("seconds") or 0.0))  # its measured time
                run.bar.update(1, timed=False)
                continue
            t0 = time.time()
            edited, info = run.edit(run.lm, g)
            posts = run.scores(edited, g)
            secs = time.time() - t0
            run.seconds.append(secs)
            run.record(g, posts, secs, edited, info)
            if k == last and run.general is not None:
                run.last_general = run.general_of(edited)
                run.log.append({"general": run.last_general, "after": str(g[-1].case_id)})
            run.bar.update(1)
    owner = mine is None or last in mine
    if owner and run.general is not None and run.last_general is None:
        # measured by the run this one resumes, after the same last case (a line without
        # "after" comes from an older version of this file)
        after = run.log.general_after
        run.last_general = after.get(str(groups[-1][-1].case_id), after.get(None))
        if run.last_general is None:  # (it stopped before): the last case's edit again
            run.last_general = run.general_of(run.edit(run.lm, groups[-1])[0])


def run_batch(
    run: _Run, chunks: list[list[EditRequest]], mine: Sequence[int] | None = None
) -> None:
    """One `method.compute` (stateless) per chunk (`batch_chunks`) from the original model,
    measured on its own; `mine`: the chunks this process runs (default all). The general block
    is measured after the last chunk."""
    for k in range(len(chunks)) if mine is None else mine:
        chunk = chunks[k]
        with run.unit(k):
            t0 = time.time()
            edited, info = run.edit(run.lm, chunk)
            posts = run.scores(edited, chunk)
            secs = (time.time() - t0) / len(chunk)
            run.seconds.extend([secs] * len(chunk))
            run.record(chunk, posts, secs, edited, info)
            run.bar.update(len(chunk))
        if k == len(chunks) - 1:
            run.last_general = run.general_of(edited)


def batch_chunks(groups: list[list[EditRequest]], batch_size: int | None) -> list:
    """A batch run's chunks: about `batch_size` requests each (whole groups; default all)."""
    return list(_chunks(groups, batch_size or sum(map(len, groups))))


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


def rounds_of(groups: list[list[EditRequest]], batch_size: int | None) -> list[list[EditRequest]]:
    """The rounds of a sequential run: `batch_size` requests each (whole groups), or one group
    per round."""
    return list(_chunks(groups, batch_size)) if batch_size else [list(g) for g in groups]


def run_sequential(
    run: _Run, groups: list[list[EditRequest]], every: int | None, batch_size: int | None
) -> dict:
    """Rounds of `method.step` on the accumulated model; every case measured on the final one.

    Returns {"curve": points every `every` rounds and after the last, "round_seconds",
    "rounds", "before": seconds spent by the runs this one resumes}.
    """
    rounds = rounds_of(groups, batch_size)
    ckpt = _Checkpoints(run.log.dir, run.method)
    p = ckpt.resume(run, rounds) if run.resume else None
    state = run.state if p is None else p.state
    acc, done = (None, 0) if p is None else (p.edit, p.rounds_done)
    infos, curve = ([], []) if p is None else (p.infos, p.curve)
    round_secs, before = ([], 0.0) if p is None else (p.round_seconds, p.seconds)
    run.log.rewrite([{"curve": c} for c in curve])  # cases are measured after the last round
    cur = run.lm if acc is None else apply(run.lm, acc)
    elapsed = lambda: before + time.time() - run.t_start
    run.bar.update(done, timed=False)
    for k in range(done, len(rounds)):
        t0 = time.time()
        edit, info, state = run.method.step(cur, state, rounds[k])
        acc = _accumulate(acc, edit)
        # The accumulated edit on the unedited model (one rounding per weight, not one per
        # round): a resumed run, which starts from the saved edit, gets the same model.
        cur = apply(run.lm, acc)
        jax.block_until_ready(cur.params)
        round_secs.append(time.time() - t0)
        infos.append(report.as_jsonable(info))
        if every and (k + 1) % every == 0 and k + 1 < len(rounds):
            curve.append(_point(run, cur, rounds[: k + 1], elapsed()))
            run.log.append({"curve": curve[-1]})
        ckpt.save(k + 1, rounds[: k + 1], acc, state, infos, curve, round_secs, elapsed())
        run.bar.update(1)
    flat = [r for rr in rounds for r in rr]
    posts, gens = run.scores(cur, flat), run.generated(cur, flat)
    i = 0
    for reqs, info in zip(rounds, infos, strict=True):
        j = i + len(reqs)
        run.record(reqs, posts[i:j], None, cur, info, None if gens is None else gens[i:j])
        i = j
    run.last_general = run.general_of(cur)
    if every:  # the last point: the final scores (without fluency, as the others)
        metrics = run.summary(cur, flat, posts, gens)
        point = {"edits": len(flat), "rounds": len(rounds), "metrics": metrics}
        curve.append(point | {"general": run.last_general, "seconds": elapsed()})
        run.log.append({"curve": curve[-1]})
    run.seconds.extend(round_secs)
    return {"curve": curve, "round_seconds": round_secs, "rounds": len(rounds), "before": before}


def _point(run: _Run, cur: LanguageModel, done: list[list[EditRequest]], seconds: float) -> dict:
    reqs = [r for rr in done for r in rr]
    return {
        "edits": len(reqs),
        "rounds": len(done),
        "metrics": run.summary(cur, reqs),
        "general": run.general_of(cur),
        "seconds": seconds,
    }


def _accumulate(acc: Edit | None, edit: Edit) -> Edit:
    """All rounds so far as one edit (a weight edit: one delta per (site, layer))."""
    total = edit if acc is None else acc.compose(edit)
    return total.consolidated() if isinstance(total, WeightEdit) else total


# ----------------------------------------------------------------------------- processes


def open_log(out: str | Path | None, header: dict, *, resume: bool) -> CaseLog:
    """The run's `CaseLog`: process 0 writes the files; with several processes, every process
    learns the cases process 0's log holds (and fails with process 0's error, if any)."""
    if jax.process_count() == 1:
        return CaseLog(out, header, resume=resume)
    log, error = CaseLog(None, header, resume=False), None
    if jax.process_index() == 0:
        try:
            log = CaseLog(out, header, resume=resume)
        except InputError as e:  # every process must stop, not wait for process 0
            error = str(e)
    after = [[k, v] for k, v in log.general_after.items()]  # (a None key: JSON has none)
    first = distributed.allgather_json({"error": error, "done": log.done, "after": after})[0]
    if first["error"] is not None:
        raise InputError(first["error"])
    log.done = first["done"]
    log.general_after = {k: v for k, v in first["after"]}
    return log


def join_processes(run: _Run, units: list[list[EditRequest]], mode: str) -> None:
    """Every process's rows and seconds in case (chunk) order, and the general block measured
    after the last one, on every process; process 0 logs the rows the others measured."""
    last = len(units) - 1
    general = {last: {"general": run.last_general}}
    mine = [(k, u | general.get(k, {})) for k, u in run.units.items()]
    every = distributed.gather_units(report.as_jsonable(mine))
    run.rows = [row for k in range(len(units)) for row in every[k]["rows"]]
    run.seconds = [sec for k in range(len(units)) for sec in every[k]["seconds"]]
    if run.general is not None:
        run.last_general = every[last]["general"]
    fresh = lambda row: str(row["case_id"]) not in run.log.done  # noqa: E731 (not resumed)
    for k in range(len(units)):
        if k not in run.units:
            for row in filter(fresh, every[k]["rows"]):
                run.log.append(row)
    last_id = str(units[last][-1].case_id)
    if mode == "independent" and run.general is not None and last not in run.units:
        if last_id not in run.log.done:
            run.log.append({"general": run.last_general, "after": last_id})


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class _Progress:
    rounds_done: int
    edit: Edit | None
    state: Any
    infos: list[dict]
    curve: list[dict]
    round_seconds: list[float]
    seconds: float


class _Checkpoints:
    """`DIR/lifelong/progress.json` names the last complete `round-NNNNNN/` directory (the
    accumulated edit and the method's state after that round); written after every round: the
    directory first (under a temporary name, then renamed), progress.json last (tmp +
    os.replace), older rounds removed. A crash at any point leaves the previous checkpoint."""

    def __init__(self, out: Path | None, method: EditMethod):
        self.root = None if out is None else out / LIFELONG_DIR
        self.method = method

    def save(self, n: int, done, acc, state, infos, curve, round_secs, seconds: float) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"round-{n:06d}"
        tmp, final = self.root / f".{name}.tmp", self.root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_edit(acc, tmp / "edit.safetensors")
        self.method.save_state(state, tmp / "state")
        shutil.rmtree(final, ignore_errors=True)  # left by a crash before progress.json moved
        os.replace(tmp, final)
        progress = {
            "format": PROGRESS_FORMAT,
            "version": 1,
            "rounds_done": n,
            "checkpoint": name,
            "round_case_ids": [[r.case_id for r in rr] for rr in done],
            "infos": infos,
            "curve": curve,
            "round_seconds": round_secs,
            "seconds": seconds,
        }
        _write_atomic(
            self.root / "progress.json", json.dumps(progress, default=report.json_default)
        )
        for old in self.root.glob("round-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, run: _Run, rounds: list[list[EditRequest]]) -> _Progress | None:
        """The saved progress of this run (None: nothing saved yet), checked against it."""
        if self.root is None:
            raise InputError("--resume needs the output directory of the run")
        path = self.root / "progress.json"
        if not path.exists():
            return None
        try:
            p = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from e
        if p.get("format") != PROGRESS_FORMAT or p.get("version") != 1:
            raise CheckpointError(f"{path}: not a lifelong progress file of version 1")
        n = int(p["rounds_done"])
        want = [[r.case_id for r in rr] for rr in rounds[:n]]
        if n > len(rounds) or report.as_jsonable(want) != p["round_case_ids"]:
            raise InputError(
                f"--resume: the {n} rounds saved in {self.root} are not this run's first "
                "rounds (other data, order or --batch-size)"
            )
        d = self.root / p["checkpoint"]
        edit = load_edit(d / "edit.safetensors")
        state = self.method.load_state(run.state, d / "state")
        return _Progress(
            n, edit, state, p["infos"], p["curve"], p["round_seconds"], float(p["seconds"])
        )


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
    general: GeneralSuite | bool = True,
    max_cases: int | None = None,
    info: dict | None = None,
    gen_metrics: bool | None = None,
) -> dict:
    """Run an evaluation; returns the results dict (also written to `out` when given).

    Arguments:
        lm: the unedited model (never modified: every edit starts from it in independent mode).
        requests: edit requests; requests sharing `extra["group"]` are edited together.
        method, state: an `EditMethod` and what its `prepare` returned.
        mode: "independent", "sequential" (lifelong) or "batch" (see the module docstring).
        known_only: keep only cases whose rewrite prompt the unedited model completes with
            target_true rather than target_new (lower mean token NLL); the rest are dropped
            and counted in `n_dropped`.
        every: sequential mode: a curve point every `every` rounds (and after the last).
        batch_size: sequential mode: requests per round (default one group); batch mode:
            requests per edit call (default all).
        resume: continue the run in `out` (independent and sequential modes).
        generation: also measure fluency (and consistency with `snippets`) with this decoding.
        snippets: attribute snippets, the consistency references (`datasets.snippets`).
        general: what the general block measures (`jaxedit.eval.general.GeneralSuite`);
            True: the default suite (the shipped WikiText-2 slice and fluency prompts, no
            known facts: pass a suite with facts for `known_facts_acc`); False: no block.
        max_cases: keep at most this many cases after the filters (known_only, conflicts).
        info: extra JSON-able fields for results.json (data path, hparams, seed, ...); a
            resumed run must match them.
        gen_metrics: measure the answer metrics by greedy generation (`*_gen`); None: when
            `generation` is given.
    Returns:
        {run header..., "n_dropped", "metrics", "baseline" (summaries: {name: {mean, std,
        n}}), "general": {"edited", "unedited", "model", "seconds"} or None (what it
        measured on: "general_setup"),
        "rounds" and "curve" (sequential; points with `every`: [{"edits", "rounds",
        "metrics", "general", "seconds"}]), "seconds": {"per_edit": {median, p90},
        "per_round" (sequential), "total"}, "cases": per-case rows}.
    """
    suite = GeneralSuite.default() if general is True else (general or None)
    _check(mode, requests, resume, generation, snippets, every, batch_size)
    if suite is not None:  # known facts: the candidates the unedited model knows
        suite = with_known_facts(suite, lm)
    t_start = time.time()
    groups = group_cases(list(requests))
    flat = [r for g in groups for r in g]
    # Several processes with a process-local model: each measures (and edits) its own cases.
    split = distributed.splits_work(lm.params)
    if split and mode == "sequential" and resume:
        raise InputError("--resume of a sequential run over several processes: resume it in one")
    baseline: dict[int, Scores] = {}
    if known_only or not split:
        baseline = {id(r): s for r, s in zip(flat, measure(lm, flat), strict=True)}
    n_dropped = 0
    if known_only:
        kept = [g for g in groups if all(is_known(r, baseline[id(r)]) for r in g)]
        n_dropped, groups = len(groups) - len(kept), kept
        if not groups:
            raise InputError("--known-only dropped every case: the model knows none of them")
    n_conflicts = 0
    if mode != "independent":
        # Edits that accumulate or share a solve cannot hold one (prompt, subject) with two
        # targets (one key, two values: MEMIT/AlphaEdit refuse such a batch): a case that
        # contradicts an earlier one is skipped and counted.
        kept, seen = [], {}
        for g in groups:
            if all(seen.get((r.prompt, r.subject), r.target_new) == r.target_new for r in g):
                kept.append(g)
                seen.update({(r.prompt, r.subject): r.target_new for r in g})
        n_conflicts, groups = len(groups) - len(kept), kept
    if max_cases is not None:
        if max_cases <= 0:
            raise InputError(f"--max-cases must be positive, got {max_cases}")
        groups = groups[:max_cases]
    header = report.as_jsonable(
        {
            "method": method.name,
            "model": lm.name,
            "mode": mode,
            "n": len(groups),
            "known_only": known_only,
            **({"batch_size": batch_size} if mode != "independent" else {}),
            **({"every": every} if mode == "sequential" else {}),
            "decoding": None if generation is None else dataclasses.asdict(generation),
            "snippets": None if snippets is None else snippets.path,
            "general_setup": None if suite is None else suite.setup(),
            **(info or {}),
        }
    )
    log = open_log(out, header, resume=resume)
    gen = None if generation is None else Generation(generation, snippets)
    # The units of work: cases (groups), chunks, or rounds (sequential: never split)
    units = groups if mode == "independent" else None
    units = batch_chunks(groups, batch_size) if mode == "batch" else units
    mine = None if units is None or not split else distributed.work_share(len(units))
    if mine is None:
        kept = [r for g in groups for r in g]
    else:  # what this process scores
        kept = [r for k in mine for r in units[k]]
    todo = [r for r in kept if id(r) not in baseline]
    if todo:
        baseline.update(zip(map(id, todo), measure(lm, todo), strict=True))
    if mode == "sequential":
        total, unit = len(rounds_of(groups, batch_size)), "round"
    else:
        n_cases = len(units if mine is None else mine)
        total, unit = (n_cases, "case") if mode == "independent" else (len(kept), "request")
    t0 = time.time()
    base_general = None if suite is None else measure_general(lm, suite)
    t_general = time.time() - t0
    enabled = progress and jax.process_index() == 0
    bar = _progress(total, enabled, f"{method.name} {mode}", unit)
    run = _Run(lm, method, state, baseline, log, gen, suite, bar, resume, t_start)
    run.base_general = base_general
    if gen_metrics is None:
        gen_metrics = generation is not None
    if gen_metrics:
        run.gen_base = dict(zip(map(id, kept), measure_generated(lm, kept), strict=True))
    seq: dict = {}
    bar.restart_clock()  # the estimate times the cases, not the set-up above
    try:
        if mode == "independent":
            run_independent(run, groups, mine)
        elif mode == "sequential":
            seq = run_sequential(run, groups, every, batch_size)
        else:
            run_batch(run, units, mine)
    finally:
        bar.close()
    if mine is not None:
        join_processes(run, units, mode)
    general_block = None
    if suite is not None:
        general_block = {
            "edited": run.last_general,
            "unedited": run.base_general,
            "model": "final" if mode == "sequential" else "after the last edit",
            "seconds": t_general + run.general_seconds,
        }
    result = {
        **header,
        "data": header.get("data", ""),
        "hparams": header.get("hparams"),
        "n_dropped": n_dropped,
        "n_conflicts": n_conflicts,
        "metrics": report.summarize([r["metrics"] for r in run.rows]),
        "baseline": report.summarize([r["baseline"] for r in run.rows]),
        "general": general_block,
        "gen_metrics": {"margin_tokens": GEN_MARGIN, "decoding": "greedy"} if gen_metrics else None,
        "seconds": {
            "per_edit": _spread(run.seconds),
            "total": seq.get("before", 0.0) + time.time() - t_start,
        },
        "cases": run.rows,
    }
    if mode == "sequential":
        result["rounds"] = seq["rounds"]
        result["curve"] = seq["curve"]
        result["seconds"]["per_round"] = seq["round_seconds"]
    log.write_results(result)
    return result


def _check(mode, requests, resume, generation, snippets, every, batch_size) -> None:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not requests:
        raise InputError("no requests to evaluate")
    if resume and mode == "batch":
        raise InputError("--resume works in independent and sequential modes only")
    if batch_size is not None and batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if every is not None and every <= 0:
        raise InputError(f"--every must be positive, got {every}")
    if batch_size is not None and mode == "independent":
        raise InputError("--batch-size needs --mode sequential (rounds) or batch (chunks)")
    if every is not None and mode != "sequential":
        raise InputError("--every needs --mode sequential")
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


def _progress(total: int, enabled: bool, desc: str, unit: str) -> progress_bars.Bar:
    """The run's bar on stderr, with an estimate of the whole run after its first item."""
    return progress_bars.bar(total, desc, unit, enabled=enabled, estimate=True)


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
