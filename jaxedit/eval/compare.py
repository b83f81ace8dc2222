"""One results table for many evaluation runs: `jaxedit eval --compare runs/a runs/b ...`.

Each argument is the output directory of a `jaxedit eval` run (its `results.json`). The table
has a row per run and an **unedited** row per distinct set of cases (the runs' baselines: the
same cases measured on the unedited model; a run of the `none` method is that row, not
another). Columns, each teacher-forced beside its generated form (`jaxedit.eval.metrics`):

- reliability: `ES` (efficacy_score, P(new) > P(true)), `acc` (reliability, token accuracy of
  target_new), `gen` (efficacy_gen: the greedy continuation begins with target_new);
- generalisation: paraphrase (`PS`, `acc` = generalization, `gen`), reverse (`acc` = reverse,
  `gen` = reverse_gen), portability (`acc`, `gen`: KnowEdit's kinds and MQuAKE's multi-hop
  questions together);
- locality: `NS` (neighborhood_score), `acc` (specificity_acc, the neighbour's own answer),
  `gen` (neighborhood_gen: the neighbour keeps generating its true object; specificity_gen
  where the data has no CounterFact neighbours), `kept` (locality: the neighbour's teacher-
  forced argmaxes unchanged by the edit) and `kept gen` (locality_gen: its greedy continuation
  unchanged);
- general ability: perplexity edited / unedited and greedy fluency (`jaxedit.eval.general`).

A cell shows the mean over the cases that have the metric; "(k)" follows it when k, the cases
with that metric (e.g. a reverse probe), is fewer than the row's n; "—" where the run did not
measure it (older runs have no `*_gen`). `compare(dirs, out)` writes `compare.md` and
`compare.png` (bars: teacher-forced token accuracy beside generated success, per run).

`common=True` (`--common-cases`) puts runs of different sizes on the same footing: per data
set, every run is summarised again (`report.summarize` of its per-case rows) over the cases all
its runs measured, so that one unedited row serves them all. The general block (measured on
the model after a run's last edit) is left as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from jaxedit.errors import InputError
from jaxedit.eval import report
from jaxedit.io.atomic import write_text_atomic

# (group, column, metric name(s): the first one present is shown)
COLUMNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reliability", "ES", ("efficacy_score",)),
    ("reliability", "acc", ("reliability",)),
    ("reliability", "gen", ("efficacy_gen",)),
    ("paraphrase", "PS", ("paraphrase_score",)),
    ("paraphrase", "acc", ("generalization",)),
    ("paraphrase", "gen", ("paraphrase_gen",)),
    ("reverse", "acc", ("reverse",)),
    ("reverse", "gen", ("reverse_gen",)),
    ("portability", "acc", ("portability",)),
    ("portability", "gen", ("portability_gen",)),
    ("locality", "NS", ("neighborhood_score",)),
    ("locality", "acc", ("specificity_acc",)),
    ("locality", "gen", ("neighborhood_gen", "specificity_gen")),
    ("locality", "kept", ("locality",)),
    ("locality", "kept gen", ("locality_gen",)),
)
# The bars of the plot: (label, teacher-forced token accuracy, generated success).
BARS = (
    ("reliability", "reliability", "efficacy_gen"),
    ("paraphrase", "generalization", "paraphrase_gen"),
    ("reverse", "reverse", "reverse_gen"),
    ("portability", "portability", "portability_gen"),
    ("neighbours", "specificity_acc", "neighborhood_gen"),
    ("neighbours unchanged", "locality", "locality_gen"),
)


@dataclass(frozen=True)
class Row:
    """One line of the table: a run's metrics (or a case set's unedited baseline)."""

    label: str
    data: str  # the data file's name
    n: int  # cases
    metrics: dict  # {name: {mean, std, n}}
    ppl_ratio: float | None
    fluency: float | None
    source: str  # the result directory (or the runs whose baseline it is)


def load_result(path: str | Path) -> dict:
    """The results.json of a run directory (or the file itself)."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"--compare: no results.json in {p} (an unfinished or foreign run?)")
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--compare: {f} is not readable JSON ({e})") from None
    if not isinstance(res, dict) or "metrics" not in res or "method" not in res:
        raise InputError(f"--compare: {f} is not the results of a jaxedit eval run")
    return res


def _label(res: dict) -> str:
    mode = res.get("mode", "independent")
    if mode == "independent":
        return res["method"]
    b = res.get("batch_size")
    per = f", {b} per {'round' if mode == 'sequential' else 'call'}" if b else ""
    return f"{res['method']} ({mode}{per})"


def _general(res: dict, side: str) -> tuple[float | None, float | None]:
    g = res.get("general") or {}
    block, base = g.get(side) or {}, g.get("unedited") or {}
    ppl = next((k for k in ("wikitext_ppl", "ppl") if k in block), None)
    ratio = block[ppl] / base[ppl] if ppl and base.get(ppl) else None
    return ratio, block.get("fluency")


def _case_set(res: dict) -> tuple:
    cases = tuple(sorted(str(c.get("case_id")) for c in res.get("cases", [])))
    return (Path(res.get("data", "")).name, cases)


def _ids(res: dict) -> set[str]:
    return {str(c.get("case_id")) for c in res.get("cases", []) if "metrics" in c}


def restrict(results: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Each result summarised again over the cases every run of its data set measured."""
    shared: dict[str, set[str]] = {}
    for _, res in results:
        name = Path(res.get("data", "")).name
        shared[name] = shared[name] & _ids(res) if name in shared else _ids(res)
    out = []
    for src, res in results:
        keep = shared[Path(res.get("data", "")).name]
        if not keep:
            raise InputError(f"--common-cases: the runs on {res.get('data')} share no case")
        cases = [c for c in res.get("cases", []) if str(c.get("case_id")) in keep]
        summary = {
            "metrics": report.summarize([c["metrics"] for c in cases]),
            "baseline": report.summarize([c.get("baseline", {}) for c in cases]),
        }
        out.append((src, res | summary | {"cases": cases, "n": len(cases)}))
    return out


def rows(results: list[tuple[str, dict]]) -> list[Row]:
    """Unedited rows (one per distinct case set, first) then one row per run, by data set."""
    base: dict[tuple, Row] = {}
    runs: list[Row] = []
    for src, res in results:
        data, n = Path(res.get("data", "?")).name, int(res.get("n", len(res.get("cases", []))))
        key = _case_set(res)
        if key not in base:
            _, fluency = _general(res, "unedited")
            ratio = 1.0 if (res.get("general") or {}).get("unedited") else None
            base[key] = Row("unedited", data, n, res.get("baseline", {}), ratio, fluency, src)
        else:
            # the same cases on the same unedited model: the baselines agree where both have a
            # metric; a newer run adds the ones an older did not measure (*_gen)
            b = base[key]
            merged = {**res.get("baseline", {}), **b.metrics}
            base[key] = replace(b, metrics=merged, source=f"{b.source}, {src}")
        if res["method"] == "none":
            continue  # the unedited row itself
        ratio, fluency = _general(res, "edited")
        runs.append(Row(_label(res), data, n, res["metrics"], ratio, fluency, src))
    out = []
    for data in dict.fromkeys(r.data for r in [*base.values(), *runs]):
        out += [r for r in base.values() if r.data == data]
        out += [r for r in runs if r.data == data]
    return out


def _cell(row: Row, names: tuple[str, ...]) -> str:
    s = next((row.metrics[n] for n in names if n in row.metrics), None)
    if s is None or s.get("mean") is None:
        return "—"
    k = s.get("n")
    return f"{s['mean']:.2f}" + (f" ({k})" if k is not None and k < row.n else "")


def table(table_rows: list[Row]) -> str:
    """The Markdown table (columns nobody measured are left out)."""
    cols = [c for c in COLUMNS if any(_cell(r, c[2]) != "—" for r in table_rows)]
    head = ["data", "run", "n"] + [f"{g} {c}" for g, c, _ in cols] + ["ppl ×", "fluency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows:
        cells = [r.data, f"**{r.label}**" if r.label == "unedited" else r.label, str(r.n)]
        cells += [_cell(r, names) for _, _, names in cols]
        cells += [_num(r.ppl_ratio), _num(r.fluency)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def render(table_rows: list[Row]) -> str:
    """The compare.md text: the table, the key, the sources."""
    key = (
        "ES / PS / NS: ROME's teacher-forced comparisons P(new) > P(true) (neighbours: "
        "P(true) > P(new)); acc: teacher-forced token accuracy of the expected answer; gen: the "
        "greedy continuation begins with it (normalised; aliases). (k): cases with that metric "
        "when fewer than n. kept: the neighbours' teacher-forced argmaxes (kept gen: greedy "
        "continuations) unchanged by the edit. ppl ×: perplexity edited / unedited; fluency: "
        "n-gram entropy (bits) of greedy texts (the general block)."
    )
    src = [f"- {r.label} ({r.data}): {r.source}" for r in table_rows]
    return "\n".join([table(table_rows), "", key, "", "Sources:", *src])


def plot(table_rows: list[Row], path: str | Path) -> None:
    """Bars per run and measure: teacher-forced token accuracy (light) beside generated
    success (dark), one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datas = list(dict.fromkeys(r.data for r in table_rows))
    fig, axes = plt.subplots(len(datas), 1, figsize=(13, 3.8 * len(datas)), squeeze=False)
    for ax, data in zip(axes[:, 0], datas, strict=True):
        rs = [r for r in table_rows if r.data == data]
        bars = [b for b in BARS if any(b[1] in r.metrics or b[2] in r.metrics for r in rs)]
        width = 0.8 / max(1, len(rs))
        x = np.arange(len(bars))
        colors = plt.cm.tab10(np.arange(len(rs)) % 10)
        for i, (r, color) in enumerate(zip(rs, colors, strict=True)):
            tf = [(r.metrics.get(b[1]) or {}).get("mean", np.nan) for b in bars]
            gen = [(r.metrics.get(b[2]) or {}).get("mean", np.nan) for b in bars]
            at = x - 0.4 + width * (i + 0.5)
            ax.bar(at - width / 4, tf, width / 2, color=color, alpha=0.35)
            ax.bar(at + width / 4, gen, width / 2, color=color, label=f"{r.label} (n={r.n})")
        ax.set_xticks(x, [b[0] for b in bars])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{data}: teacher-forced token accuracy (light) vs generated (dark)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def compare(dirs: list[str], out: str | Path | None = None, *, common: bool = False) -> dict:
    """Load the runs in `dirs`, build the rows (`common`: over the cases shared per data set);
    with `out`, write compare.md and compare.png there. Returns {"markdown", "rows", "files"}."""
    if not dirs:
        raise InputError("--compare needs at least one result directory")
    results = [(str(d), load_result(d)) for d in dirs]
    table_rows = rows(restrict(results) if common else results)
    md = render(table_rows)
    files = []
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        write_text_atomic(o / "compare.md", md + "\n")
        plot(table_rows, o / "compare.png")
        files = [str(o / "compare.md"), str(o / "compare.png")]
    return {"markdown": md, "rows": [r.__dict__ for r in table_rows], "files": files}
