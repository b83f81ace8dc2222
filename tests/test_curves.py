"""Lifelong curves read back (`jaxedit.eval.curves`): finished and unfinished run directories,
stale results, bad directories, the plot and the table on synthetic results; the files of a
real sequential run (finished, and stopped after its second round) read back as the runner
wrote them; notebook 06 executed on synthetic run directories (a kernel, no model: ~15 s)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from jaxedit import methods  # noqa: E402
from jaxedit.errors import CheckpointError, InputError  # noqa: E402
from jaxedit.eval import curves, general, runner  # noqa: E402
from jaxedit.eval.general import KNOWN_FILTER_NOTE, GeneralSuite  # noqa: E402
from jaxedit.locate import facts  # noqa: E402
from jaxedit.models.lm import LanguageModel  # noqa: E402
from jaxedit.models.transformer import init_params  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_many_edits.ipynb"


# ----------------------------------------------------------------------------- synthetic runs


def _summary(mean: float, n: int) -> dict:
    return {"mean": mean, "std": 0.1, "n": n}


def _point(edits: int, es: float, ppl: float, seconds: float) -> dict:
    return {
        "edits": edits,
        "rounds": edits // 2,
        "metrics": {
            "efficacy_score": _summary(es, edits),
            "paraphrase_score": _summary(es / 2, edits),
            "neighborhood_score": _summary(0.8, edits),
        },
        "general": {"wikitext_ppl": ppl, "fluency": 5.0},
        "seconds": seconds,
    }


def synthetic(method: str = "rome", *, decay: float = 0.1, base_ppl: float = 40.0) -> dict:
    """The results of a sequential run of 6 one-request cases in rounds of 2, a point every
    round: efficacy 1 - decay·rounds, perplexity growing 10 % a round."""
    curve = [_point(e, 1 - decay * e / 2, base_ppl * 1.1 ** (e / 2), 10.0 * e) for e in (2, 4, 6)]
    final = curve[-1]
    return {
        "method": method,
        "model": "smollm2-135m",
        "mode": "sequential",
        "n": 6,
        "known_only": True,
        "batch_size": 2,
        "every": 1,
        "data": "cf.json",
        "metrics": final["metrics"],
        "baseline": {
            "efficacy_score": _summary(0.0, 6),
            "paraphrase_score": _summary(0.1, 6),
            "neighborhood_score": _summary(0.85, 6),
        },
        "general": {
            "edited": final["general"],
            "unedited": {"wikitext_ppl": base_ppl, "fluency": 5.1},
            "model": "final",
            "seconds": 3.0,
        },
        "seconds": {"per_edit": {}, "total": 70.0, "per_round": [1.0, 2.0, 3.0]},
        "cases": [{"case_id": i, "metrics": {}} for i in range(6)],
        "rounds": 3,
        "curve": curve,
    }


def header_of(result: dict) -> dict:
    keep = ("method", "model", "mode", "n", "known_only", "batch_size", "every", "data")
    return {k: result[k] for k in keep}


def write_finished(d: Path, result: dict) -> Path:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(header_of(result)))
    (d / "results.json").write_text(json.dumps(result))
    return d


def write_in_progress(d: Path, result: dict, rounds: int, logged: int | None = None) -> Path:
    """The files of `result`'s run stopped after `rounds` rounds, with `logged` curve lines in
    cases.jsonl (the checkpoint's curve has `rounds` points) and a line cut by the crash."""
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(header_of(result)))
    (d / "lifelong").mkdir()
    ids = [[2 * k, 2 * k + 1] for k in range(rounds)]
    progress = {
        "format": runner.PROGRESS_FORMAT,
        "version": 1,
        "rounds_done": rounds,
        "checkpoint": f"round-{rounds:06d}",
        "round_case_ids": ids,
        "infos": [{}] * rounds,
        "curve": result["curve"][:rounds],
        "round_seconds": result["seconds"]["per_round"][:rounds],
        "seconds": 10.0 * rounds,
    }
    (d / "lifelong" / "progress.json").write_text(json.dumps(progress))
    lines = [json.dumps({"curve": p}) for p in result["curve"][: logged or rounds]]
    (d / "cases.jsonl").write_text("\n".join(lines) + '\n{"curve": {"edi')
    return d


# ----------------------------------------------------------------------------- reading


def test_finished_result_series_finals_and_unedited():
    res = synthetic()
    run = curves.from_result(res, "ROME-seq")
    assert run.finished and run.status == "finished, 6 edits"
    xs, ys = run.series("efficacy_score")
    np.testing.assert_allclose(xs, [2, 4, 6])
    np.testing.assert_allclose(ys, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(run.series("wikitext_ppl")[1], 40 * 1.1 ** np.arange(1, 4))
    assert run.final("efficacy_score") == pytest.approx(0.7)
    assert run.final("wikitext_ppl") == pytest.approx(40 * 1.1**3)
    assert run.unedited("neighborhood_score") == 0.85 and run.unedited("wikitext_ppl") == 40.0
    assert run.final("known_facts_acc") is None and len(run.series("known_facts_acc")[0]) == 0
    assert (run.seconds, run.edit_seconds, run.edits_total) == (70.0, 6.0, 6)
    assert "cases" not in run.header and run.header["batch_size"] == 2


def test_result_without_curve_is_one_final_point():
    res = synthetic()
    res["curve"], res["every"] = [], None
    run = curves.from_result(res)
    assert run.label == "rome"
    assert [p["edits"] for p in run.curve] == [6]
    assert run.series("efficacy_score")[1].tolist() == [pytest.approx(0.7)]
    assert run.series("wikitext_ppl")[1].tolist() == [pytest.approx(40 * 1.1**3)]


def test_load_finished_run_equals_its_result(tmp_path):
    res = synthetic()
    d = write_finished(tmp_path / "rome-seq", res)
    run = curves.load_run(d)
    assert run.label == "rome-seq" and run.path == str(d) and run.finished
    want = curves.from_result(res, "rome-seq", str(d))
    assert run == want


def test_load_run_in_progress(tmp_path):
    res = synthetic()
    run = curves.load_run(write_in_progress(tmp_path / "a", res, rounds=2), "AlphaEdit")
    assert not run.finished and run.status == "in progress, 4 of 6 edits"
    assert run.series("efficacy_score")[0].tolist() == [2, 4]
    assert run.final("efficacy_score") == pytest.approx(0.8)  # the last point so far
    assert run.unedited("efficacy_score") is None  # not written before the run ends
    assert (run.seconds, run.edit_seconds) == (20.0, 3.0)
    # a point logged before its round's checkpoint: cases.jsonl is one ahead
    ahead = curves.load_run(write_in_progress(tmp_path / "b", res, rounds=2, logged=3))
    assert ahead.series("efficacy_score")[0].tolist() == [2, 4, 6] and ahead.edits_done == 4


def test_load_run_before_its_first_round(tmp_path):
    d = tmp_path / "new"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(header_of(synthetic())))
    run = curves.load_run(d)
    assert run.status == "in progress, 0 of 6 edits" and run.curve == []
    assert run.final("efficacy_score") is None


def test_old_results_of_a_restarted_run_are_not_read(tmp_path):
    """A run started again in the same directory: run.json is newer than results.json."""
    d = write_in_progress(tmp_path / "r", synthetic(), rounds=1)
    (d / "results.json").write_text(json.dumps(synthetic(decay=0.3)))
    t = (d / "run.json").stat().st_mtime_ns
    os.utime(d / "results.json", ns=(t - 10**9, t - 10**9))
    run = curves.load_run(d)
    assert not run.finished and run.status == "in progress, 2 of 6 edits"
    os.utime(d / "results.json", ns=(t + 10**9, t + 10**9))  # then it finished
    assert curves.load_run(d).final("efficacy_score") == pytest.approx(0.1)


def test_collected_summaries_read_back_as_the_runs(tmp_path, monkeypatch):
    """`benchmarks/collect_runs.py`'s summaries (results.json without its cases; an unfinished
    run's header, rounds and curve) read back as the run directories they were made from."""
    monkeypatch.syspath_prepend(str(NOTEBOOK.parents[1] / "benchmarks"))
    import collect_runs as collect

    res = synthetic()
    done = write_finished(tmp_path / "done", res)
    cut = write_in_progress(tmp_path / "cut", res, rounds=2)
    for d, partial in ((done, False), (cut, True)):
        summary = json.loads(json.dumps(collect.summary(d, partial=partial)))
        run, want = curves.from_summary(summary, "x"), curves.load_run(d, "x")
        assert (run.curve, run.seconds, run.edit_seconds) == (
            want.curve, want.seconds, want.edit_seconds)  # fmt: skip
        # a summary is a snapshot: its run is unfinished, not known to be going on
        assert run.status == want.status.replace("in progress", "unfinished")
        for name in ("efficacy_score", "wikitext_ppl"):
            assert run.final(name) == want.final(name)
            assert run.unedited(name) == want.unedited(name)
    assert curves.from_summary(collect.summary(done)).unedited("wikitext_ppl") == 40.0
    assert curves.from_summary(collect.summary(cut, partial=True)).status == (
        "unfinished, 4 of 6 edits")  # fmt: skip
    with pytest.raises(InputError, match="'batch' run, not sequential"):
        curves.from_summary({**collect.summary(cut, partial=True), "mode": "batch"})


def test_bad_directories(tmp_path):
    with pytest.raises(InputError, match="no run.json"):
        curves.load_run(tmp_path / "missing")
    res = synthetic()
    res["mode"] = "independent"
    d = write_finished(tmp_path / "ind", res)
    with pytest.raises(InputError, match="'independent' run; curves come from --mode sequential"):
        curves.load_run(d)
    with pytest.raises(InputError, match="--mode sequential"):
        curves.from_result(res)
    d = write_in_progress(tmp_path / "cut", synthetic(), rounds=1)
    (d / "lifelong" / "progress.json").write_text('{"rounds_')
    with pytest.raises(CheckpointError, match="progress.json: unreadable"):
        curves.load_run(d)


# ----------------------------------------------------------------------------- output


def _visible(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_plot_panels_lines_and_shared_unedited(tmp_path):
    a = curves.from_result(synthetic("rome", decay=0.1), "ROME-seq")
    b = curves.load_run(write_in_progress(tmp_path / "b", synthetic("alphaedit"), 2), "AlphaEdit")
    fig = curves.plot_curves([a, b])
    axes = _visible(fig)
    # known_facts_acc: measured by no run, left out
    assert [ax.get_title() for ax in axes] == [
        curves.TITLES[n] for n in curves.PANELS if n != "known_facts_acc"
    ]
    es, ppl = axes[0], axes[3]
    lines = {ln.get_label(): ln for ln in es.get_lines()}
    assert set(lines) == {"ROME-seq", "AlphaEdit (in progress, 4 of 6 edits)", "unedited"}
    np.testing.assert_allclose(lines["ROME-seq"].get_ydata(), [0.9, 0.8, 0.7])
    np.testing.assert_allclose(lines["AlphaEdit (in progress, 4 of 6 edits)"].get_xdata(), [2, 4])
    assert lines["unedited"].get_ydata()[0] == 0.0 and lines["unedited"].get_linestyle() == "--"
    assert ppl.get_yscale() == "log" and es.get_ylim() == (-0.03, 1.03)
    legend_labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_labels == ["ROME-seq", "AlphaEdit (in progress, 4 of 6 edits)", "unedited"]


def test_plot_unedited_per_run_when_runs_disagree():
    a = curves.from_result(synthetic("rome"), "A")
    b = curves.from_result(synthetic("memit", base_ppl=50.0), "B")
    fig = curves.plot_curves([a, b], names=("wikitext_ppl", "efficacy_score"))
    ppl, es = _visible(fig)
    ppl_lines = {ln.get_label(): ln.get_ydata()[0] for ln in ppl.get_lines()}
    assert ppl_lines["unedited (A)"] == 40.0 and ppl_lines["unedited (B)"] == 50.0
    assert "unedited" in {ln.get_label() for ln in es.get_lines()}  # they agree there


def test_plot_refuses_runs_with_nothing_to_draw(tmp_path):
    d = tmp_path / "new"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(header_of(synthetic())))
    with pytest.raises(InputError, match="no run has a curve point"):
        curves.plot_curves([curves.load_run(d)])


def test_final_table_of_a_run_without_points(tmp_path):
    d = tmp_path / "new"
    d.mkdir()
    (d / "run.json").write_text(json.dumps(header_of(synthetic())))
    lines = curves.final_table([curves.load_run(d, "A")]).splitlines()
    assert lines == [
        "| run | status | edit s | total s |",
        "|---|---|---|---|",
        "| A | in progress, 0 of 6 edits | 0 | 0 |",
    ]


def test_final_table(tmp_path):
    a = curves.from_result(synthetic("rome", decay=0.1), "ROME-seq")
    b = curves.load_run(write_in_progress(tmp_path / "b", synthetic("alphaedit"), 2), "AlphaEdit")
    lines = curves.final_table([a, b]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == [
        "run",
        "status",
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
        "wikitext_ppl",
        "fluency",
        "edit s",
        "total s",
    ]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in lines[2:]]
    rows = {r[0]: r for r in cells}
    ppl = f"{40 * 1.1**3:.3f}"
    want = ["finished, 6 edits", "0.700", "0.350", "0.800", ppl, "5.000", "6", "70"]
    assert rows["ROME-seq"][1:] == want
    assert rows["AlphaEdit"][1:4] == ["in progress, 4 of 6 edits", "0.800", "0.400"]
    assert rows["unedited"][2:7] == ["0.000", "0.100", "0.850", "40.000", "5.100"]
    c = curves.from_result(synthetic("memit", base_ppl=50.0), "MEMIT-seq")
    rows = [r.split("|")[1].strip() for r in curves.final_table([a, c]).splitlines()[2:]]
    assert rows == ["ROME-seq", "MEMIT-seq", "unedited (ROME-seq)", "unedited (MEMIT-seq)"]


def add_known_facts(result: dict, accs: list[float], source: str) -> dict:
    """`result` with a known-facts accuracy on each curve point, measured on `source`."""
    for point, acc in zip(result["curve"], accs, strict=True):
        point["general"]["known_facts_acc"] = acc
    result["general_setup"] = {"known_facts": source}
    return result


def test_comparable_known_facts_drops_only_unfiltered_accuracies():
    known = add_known_facts(synthetic(), [0.9, 0.5, 0.25], f"cf.json: 3 {KNOWN_FILTER_NOTE} of 9")
    assert curves.comparable_known_facts(known) is known
    old = add_known_facts(synthetic(), [0.07, 0.06, 0.05], "cf.json (records not edited)")
    kept = curves.comparable_known_facts(old)
    assert [p["general"].get("known_facts_acc") for p in kept["curve"]] == [None] * 3
    assert "known_facts_acc" not in kept["general"]["edited"]
    assert old["curve"][0]["general"]["known_facts_acc"] == 0.07  # a copy: the input is intact


def test_milestone_table(tmp_path):
    res = add_known_facts(synthetic("rome"), [0.9, 0.5, 0.25], f"cf: 3 {KNOWN_FILTER_NOTE} of 9")
    res["curve"][-1]["general"]["wikitext_ppl"] = 12_345.6  # the last point has collapsed
    a = curves.from_result(curves.comparable_known_facts(res), "ROME-seq")
    old = add_known_facts(synthetic("memit"), [0.07, 0.06, 0.05], "cf.json (not edited)")
    b_dir = write_in_progress(tmp_path / "b", curves.comparable_known_facts(old), 2)
    b = curves.load_run(b_dir, "MEMIT-seq")
    # At 2 and 6 edits, and the unfinished run's last point (4); its perplexity as a multiple
    # of the finished run's unedited 40.
    assert curves.milestone_table([a, b], at=(2, 6)).splitlines() == [
        "| method | edits | efficacy | paraphrase | neighbourhood | wikitext ppl | known facts |",
        "|---|---|---|---|---|---|---|",
        "| ROME-seq | 2 | 0.90 | 0.45 | 0.80 | 44.0 (1.10×) | 0.90 |",
        "| ROME-seq | 6 | 0.70 | 0.35 | 0.80 | 12,346 (309×) | 0.25 |",
        "| MEMIT-seq | 2 | 0.90 | 0.45 | 0.80 | 44.0 (1.10×) | — |",
        "| MEMIT-seq | 4 | 0.80 | 0.40 | 0.80 | 48.4 (1.21×) | — |",
    ]
    alone = curves.milestone_table([b], at=(2,)).splitlines()  # nothing unedited to divide by
    assert alone[-1] == "| MEMIT-seq | 4 | 0.80 | 0.40 | 0.80 | 48.4 | — |"


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


SMALL = GeneralSuite.default(
    [("The Eiffel Tower is located in the city of", "Paris")],
    "test",
    max_tokens=64,
    window=32,
    prompts=general.FLUENCY_PROMPTS[:1],
    fluency_length=8,
)


class Stop(Exception):
    pass


def test_real_run_files_finished_and_stopped(tiny, tmp_path):
    """The runner's own files: a finished run reads back as its result; a run stopped in its
    third round reads back as in progress with the two points it had."""
    none = methods.get("none")
    reqs = list(facts.FACTS[:6])
    kw = dict(mode="sequential", batch_size=2, every=1, general=SMALL)
    res = runner.evaluate(tiny, reqs, none, None, out=tmp_path / "done", **kw)
    run = curves.load_run(tmp_path / "done")
    assert run.finished and run.status == "finished, 6 edits"
    assert run == curves.from_result(json.loads((tmp_path / "done" / "results.json").read_text()),
                                     "done", str(tmp_path / "done"))  # fmt: skip
    assert run.series("efficacy_score")[0].tolist() == [2, 4, 6]
    assert run.final("efficacy_score") == pytest.approx(res["metrics"]["efficacy_score"]["mean"])
    assert run.unedited("wikitext_ppl") == pytest.approx(res["general"]["unedited"]["wikitext_ppl"])

    calls = []

    def step(lm, state, rs):
        calls.append(rs)
        if len(calls) == 3:
            raise Stop
        return none.compute_fn(lm, state, rs) + (state,)

    with pytest.raises(Stop):
        runner.evaluate(
            tiny, reqs, dataclasses.replace(none, step_fn=step), None, out=tmp_path / "cut", **kw
        )
    cut = curves.load_run(tmp_path / "cut", "none")
    assert cut.status == "in progress, 4 of 6 edits"
    assert cut.series("efficacy_score")[0].tolist() == [2, 4]
    want = [p["metrics"]["efficacy_score"]["mean"] for p in res["curve"][:2]]
    np.testing.assert_allclose(cut.series("efficacy_score")[1], want)


# ----------------------------------------------------------------------------- notebook 06


def test_notebook_executes_on_run_directories(tmp_path):
    """Notebook 06 on a finished and an unfinished synthetic run (NB_RUNS): no model loaded,
    the figure and the table drawn."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    a = write_finished(tmp_path / "rome", synthetic("rome"))
    b = write_in_progress(tmp_path / "alpha", synthetic("alphaedit"), 2)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"NB_RUNS": f"ROME-seq={a},AlphaEdit={b},FT-L={tmp_path / 'missing'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        done = nbclient.NotebookClient(
            copy.deepcopy(nb), timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        ).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for c in done.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| AlphaEdit | in progress, 4 of 6 edits |" in text and "| ROME-seq | finished" in text
    assert "jaxedit eval --method" in text  # the commands of the runs that are not there
    assert any("image/png" in o.get("data", {}) for o in outputs)
