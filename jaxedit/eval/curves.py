"""Lifelong results read back and drawn: the curves of `jaxedit eval --mode sequential` runs.

    runs = [load_run("runs/many/alphaedit-2000", "AlphaEdit"), from_result(result, "ROME-seq")]
    fig = plot_curves(runs)          # one panel per metric, one line per run, unedited dashed
    print(final_table(runs))         # the last numbers and the seconds of each run
    print(milestone_table(runs))     # the README's rows: points at 400, 800, ... edits

What a run directory holds (`jaxedit.eval.runner`): `run.json` (what runs; written when the
run starts), `results.json` (written when it ends: final `metrics`, `baseline`, `general`
{edited, unedited}, `curve`, `seconds`), and while it goes on `lifelong/progress.json` (rounds
done, their case ids, the curve so far, seconds) and `cases.jsonl` (a `{"curve": point}` line
per point). A run is finished when its results.json is at least as new as its run.json (a run
started again in the same directory rewrites run.json and leaves the old results.json until
it ends). An unfinished run shows its curve so far; its unedited values are not written yet.

A curve point at k edits is the mean over the k cases edited so far, measured on the model
after those k edits (early edits can be overwritten by later ones), and the general block of
that model. Edits on the x axis count requests; "N of M edits" in a status counts cases (the
same for CounterFact, one request per case).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxedit.errors import CheckpointError, InputError

# Panels of `plot_curves`, in order; a name no run measured is left out.
PANELS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "wikitext_ppl",
    "known_facts_acc",
    "fluency",
)
TITLES = {
    "efficacy_score": "efficacy: P(new) > P(true), rewrite prompt",
    "paraphrase_score": "paraphrase: P(new) > P(true), paraphrases",
    "neighborhood_score": "neighbourhood: P(true) > P(new), neighbours",
    "score": "score: harmonic mean of the three",
    "wikitext_ppl": "WikiText-2 perplexity (log scale)",
    "ppl": "perplexity (log scale)",
    "known_facts_acc": "known facts, token accuracy",
    "fluency": "fluency: n-gram entropy of greedy texts",
}
LOG_SCALE = ("wikitext_ppl", "ppl")
UNIT_RANGE = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "score",
    "known_facts_acc",
)
# Columns of `milestone_table`, and the README's words for every name.
MILESTONE_COLUMNS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "wikitext_ppl",
    "known_facts_acc",
)
HEADERS = {
    "efficacy_score": "efficacy",
    "paraphrase_score": "paraphrase",
    "neighborhood_score": "neighbourhood",
    "score": "score",
    "wikitext_ppl": "wikitext ppl",
    "ppl": "perplexity",
    "known_facts_acc": "known facts",
    "fluency": "fluency",
}
TABLE_COLUMNS = (
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "score",
    "wikitext_ppl",
    "known_facts_acc",
    "fluency",
)


@dataclass(frozen=True)
class LifelongRun:
    """One sequential run, finished or going on."""

    label: str
    header: dict  # what ran: run.json (a finished run: the same fields in results.json)
    curve: list[dict]  # the points so far: {"edits", "rounds", "metrics", "general", "seconds"}
    edits_done: int  # cases edited so far
    edits_total: int  # cases the run edits (run.json "n", after its filters)
    seconds: float  # wall time so far (a finished run: its total)
    edit_seconds: float  # the rounds' editing time (method.step and apply), measuring excluded
    result: dict | None = None  # results.json; None while the run goes on
    path: str | None = None
    snapshot: bool = False  # read from a collected summary: no longer known to be going on

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def status(self) -> str:
        if self.finished:
            return f"finished, {self.edits_done} edits"
        going = "unfinished" if self.snapshot else "in progress"
        return f"{going}, {self.edits_done} of {self.edits_total} edits"

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(edits, value) of every curve point that has `name` (a metric's mean or a general
        measure)."""
        pts = [(p["edits"], point_value(p, name)) for p in self.curve]
        pts = [(x, y) for x, y in pts if y is not None]
        return np.array([x for x, _ in pts], dtype=float), np.array([y for _, y in pts], float)

    def final(self, name: str) -> float | None:
        """The run's last value of `name`: its final results, or the last point that has it."""
        if self.result is not None:
            return _value(
                self.result.get("metrics"), (self.result.get("general") or {}).get("edited"), name
            )
        _, ys = self.series(name)
        return float(ys[-1]) if len(ys) else None

    def unedited(self, name: str) -> float | None:
        """The unedited model's value over the run's cases (None until the run is finished)."""
        if self.result is None:
            return None
        return _value(
            self.result.get("baseline"), (self.result.get("general") or {}).get("unedited"), name
        )


def point_value(point: dict, name: str) -> float | None:
    """`name` in a curve point: the mean of a metric, else a measure of its general block."""
    return _value(point.get("metrics"), point.get("general"), name)


def _value(metrics: dict | None, general: dict | None, name: str) -> float | None:
    m = (metrics or {}).get(name)
    v = m.get("mean") if isinstance(m, dict) else (general or {}).get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


# ----------------------------------------------------------------------------- reading


def from_result(result: dict, label: str | None = None, path: str | None = None) -> LifelongRun:
    """A finished run from its results dict (what `evaluate` returns or results.json holds)."""
    if result.get("mode") != "sequential":
        raise InputError(
            f"{path or 'result'}: a {result.get('mode')!r} run; curves come from --mode sequential"
        )
    cases = result.get("cases") or []
    curve = list(result.get("curve") or [])
    sec = result.get("seconds") or {}
    total = float(sec.get("total") or 0.0)
    if not curve:  # a run without --every: its final numbers are its only point
        general = (result.get("general") or {}).get("edited")
        n_req = len(cases)
        rounds = result.get("rounds", 0)
        curve = [
            {
                "edits": n_req,
                "rounds": rounds,
                "metrics": result.get("metrics") or {},
                "general": general,
                "seconds": total,
            }
        ]
    return LifelongRun(
        label=label or str(result.get("method", "run")),
        header={k: v for k, v in result.items() if k not in ("cases", "curve")},
        curve=curve,
        edits_done=len({str(c["case_id"]) for c in cases}),
        edits_total=int(result.get("n", 0)),
        seconds=total,
        edit_seconds=float(sum(sec.get("per_round") or [])),
        result=result,
        path=path,
    )


def comparable_known_facts(summary: dict) -> dict:
    """`summary` (a results.json or collected summary) as is when its known-facts accuracy is
    over facts the unedited model knows (`--known-only` facts, 1.0 unedited), else a copy
    without its known-facts values: measured on unfiltered records (runs before that filter),
    they are token accuracies on another scale and would sit beside the others as if comparable."""
    # Imported here: the rest of this module reads files and draws, without jax.
    from jaxedit.eval.general import KNOWN_FILTER_NOTE

    if KNOWN_FILTER_NOTE in ((summary.get("general_setup") or {}).get("known_facts") or ""):
        return summary
    s = copy.deepcopy(summary)
    for point in s.get("curve") or []:
        (point.get("general") or {}).pop("known_facts_acc", None)
    for side in ("edited", "unedited"):
        ((s.get("general") or {}).get(side) or {}).pop("known_facts_acc", None)
    return s


def from_summary(summary: dict, label: str | None = None) -> LifelongRun:
    """A run from its summary in a collected results file (`benchmarks/collect_runs.py`): a
    finished run's results.json without its per-case rows, or an unfinished one's header with
    `"finished": false`, `rounds_done`, its curve so far and `seconds` {per_round, total}."""
    if summary.get("finished", True):
        n = int(summary.get("n", 0))  # the per-case rows are gone: every case was edited
        return dataclasses.replace(from_result(summary, label), edits_done=n)
    if summary.get("mode") != "sequential":
        raise InputError(f"{label or 'summary'}: a {summary.get('mode')!r} run, not sequential")
    sec = summary.get("seconds") or {}
    n, size = int(summary.get("n", 0)), int(summary.get("batch_size") or 1)
    return LifelongRun(
        label=label or str(summary.get("method", "run")),
        header={k: v for k, v in summary.items() if k not in ("curve", "round_infos")},
        curve=list(summary.get("curve") or []),
        edits_done=min(n, int(summary.get("rounds_done", 0)) * size),  # rounds of `size` requests
        edits_total=n,
        seconds=float(sec.get("total") or 0.0),
        edit_seconds=float(sum(sec.get("per_round") or [])),
        snapshot=True,
    )


def load_run(path: str | Path, label: str | None = None) -> LifelongRun:
    """The run in directory `path` (label: the directory's name unless given), finished or not."""
    d = Path(path)
    run_json, results = d / "run.json", d / "results.json"
    if not run_json.is_file():
        raise InputError(f"{d}: not an evaluation run directory (no run.json)")
    header = _read_json(run_json)
    if header.get("mode") != "sequential":
        raise InputError(f"{d}: a {header.get('mode')!r} run; curves come from --mode sequential")
    label = label or d.name
    if results.is_file() and results.stat().st_mtime_ns >= run_json.stat().st_mtime_ns:
        return from_result(_read_json(results), label, str(d))
    progress = d / "lifelong" / "progress.json"
    p = _read_json(progress) if progress.is_file() else {}
    curve = p.get("curve") or []
    # cases.jsonl gets a point before the round's checkpoint is written: it may be one ahead.
    logged = [row["curve"] for row in _read_rows(d / "cases.jsonl") if "curve" in row]
    if len(logged) > len(curve):
        curve = logged
    done = {str(i) for ids in p.get("round_case_ids") or [] for i in ids}
    return LifelongRun(
        label=label,
        header=header,
        curve=curve,
        edits_done=len(done),
        edits_total=int(header.get("n", 0)),
        seconds=float(p.get("seconds") or 0.0),
        edit_seconds=float(sum(p.get("round_seconds") or [])),
        path=str(d),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def _read_rows(path: Path) -> list[dict]:
    """The intact JSON lines of a file (a line cut by a running writer ends the list)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


# ----------------------------------------------------------------------------- unedited


def unedited_values(runs: Sequence[LifelongRun], name: str) -> dict[str, float]:
    """{label: unedited value} of the finished runs that have one."""
    out = {r.label: r.unedited(name) for r in runs}
    return {k: v for k, v in out.items() if v is not None}


def common_unedited(runs: Sequence[LifelongRun], name: str) -> float | None:
    """The unedited value when every finished run that has one agrees (same cases, same
    general suite), else None. Agreeing means to 1e-6: the same measure run on two CPUs
    differs in the last digits of a float32 sum (38.403073 and 38.403074)."""
    vals = list(unedited_values(runs, name).values())
    if vals and np.allclose(vals, vals[0], rtol=1e-6, atol=1e-12):
        return vals[0]
    return None


# ----------------------------------------------------------------------------- output


def measured(runs: Sequence[LifelongRun], names: Sequence[str] = PANELS) -> list[str]:
    """The names some run has a value of (on its curve or in its results)."""
    return [n for n in names if any(r.final(n) is not None or len(r.series(n)[0]) for r in runs)]


def plot_curves(runs: Sequence[LifelongRun], names: Sequence[str] = PANELS, *, ncols: int = 3):
    """One panel per measured name against edits, one line per run, the unedited value dashed
    (grey when the runs agree on it, else in each run's colour). Returns the figure."""
    import matplotlib.pyplot as plt

    names = measured(runs, names)
    if not names:
        raise InputError("no run has a curve point or a result to plot")
    ncols = min(ncols, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, layout="constrained"
    )
    colours = {r.label: f"C{i}" for i, r in enumerate(runs)}
    for ax, name in zip(axes.flat, names, strict=False):
        for r in runs:
            xs, ys = r.series(name)
            label = r.label if r.finished else f"{r.label} ({r.status})"
            ax.plot(xs, ys, "o-", ms=3, color=colours[r.label], label=label)
        same = common_unedited(runs, name)
        if same is not None:
            ax.axhline(same, ls="--", lw=1, color="0.4", label="unedited")
        else:
            for lab, v in unedited_values(runs, name).items():
                ax.axhline(v, ls="--", lw=1, color=colours[lab], label=f"unedited ({lab})")
        if name in LOG_SCALE:
            ax.set_yscale("log")
        if name in UNIT_RANGE:  # fractions: the same scale in every panel and notebook
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("edits")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend(
        [handles[k] for k in labels], labels, loc="outside lower center", ncol=min(4, len(labels))
    )
    return fig


def final_table(runs: Sequence[LifelongRun], names: Sequence[str] = TABLE_COLUMNS) -> str:
    """Markdown: the last value of each name per run (an unfinished run: its last curve
    point), the unedited row(s), the edits, the editing and total seconds."""
    names = measured(runs, names)
    rows = [["run", "status", *names, "edit s", "total s"]]
    for r in runs:
        finals = [_num(r.final(n)) for n in names]
        rows.append([r.label, r.status, *finals, f"{r.edit_seconds:.0f}", f"{r.seconds:.0f}"])
    finished = [r for r in runs if r.finished]
    if all(common_unedited(runs, n) is not None for n in names if unedited_values(runs, n)):
        if finished:  # one row: the runs agree on every unedited value
            rows.append(["unedited", "", *[_num(common_unedited(runs, n)) for n in names], "", ""])
    else:
        for r in finished:
            base = [_num(r.unedited(n)) for n in names]
            rows.append([f"unedited ({r.label})", "", *base, "", ""])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|---" * len(rows[0]) + "|", *lines[1:]])


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def milestone_table(
    runs: Sequence[LifelongRun],
    at: Sequence[int] = (400, 800, 1200, 1600, 2000),
    names: Sequence[str] = MILESTONE_COLUMNS,
) -> str:
    """Markdown, the README's side-by-side table: a row per run and curve point at `at` edits,
    plus the run's last point when it is none of them (an unfinished run). Scores to two
    places, "—" where a point lacks a value; perplexity with its multiple of the unedited value
    (the run's own, else the one the finished runs agree on)."""
    shared_ppl = common_unedited(runs, "wikitext_ppl")
    base_ppl = {r.label: r.unedited("wikitext_ppl") or shared_ppl for r in runs}
    rows = [["method", "edits", *[HEADERS.get(n, n) for n in names]]]
    for r in runs:
        points = [p for p in r.curve if p["edits"] in at]
        if r.curve and r.curve[-1]["edits"] not in at:
            points.append(r.curve[-1])
        for p in points:
            cells = [_milestone_cell(point_value(p, n), n, base_ppl[r.label]) for n in names]
            rows.append([r.label, f"{p['edits']:,}", *cells])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|---" * len(rows[0]) + "|", *lines[1:]])


def _milestone_cell(x: float | None, name: str, base_ppl: float | None) -> str:
    if x is None:
        return "—"
    if name not in LOG_SCALE:
        return f"{x:.2f}"
    value = f"{x:.1f}" if x < 100 else f"{round(x):,}"
    if not base_ppl:
        return value
    ratio = x / base_ppl
    return f"{value} ({ratio:.2f}×)" if ratio < 10 else f"{value} ({round(ratio):,}×)"
