"""`jaxedit eval --compare` (jaxedit.eval.compare): the table from hand-written result
directories (cells, n, the unedited rows, a `none` run folded into its unedited row, columns
nobody measured left out), the PNG, the errors, and the command line."""

from __future__ import annotations

import json

import pytest

from jaxedit import cli
from jaxedit.errors import InputError
from jaxedit.eval import compare


def s(mean, n=4):
    return {"mean": mean, "std": 0.0, "n": n}


def result(method, metrics, baseline, *, cases=("1", "2", "3", "4"), data="/d/cf.json", **kw):
    return {
        "method": method,
        "model": "m",
        "mode": kw.pop("mode", "independent"),
        "n": len(cases),
        "data": data,
        "metrics": metrics,
        "baseline": baseline,
        "general": kw.pop("general", None),
        "cases": [{"case_id": c} for c in cases],
        **kw,
    }


BASE = {
    "efficacy_score": s(0.0),
    "reliability": s(0.1),
    "efficacy_gen": s(0.0),
    "reverse": s(0.05, 3),
    "reverse_gen": s(0.0, 3),
    "neighborhood_score": s(0.8),
    "specificity_acc": s(0.2),
    "neighborhood_gen": s(0.75),
}
ROME = {
    "efficacy_score": s(1.0),
    "reliability": s(0.9),
    "efficacy_gen": s(0.75),
    "paraphrase_score": s(0.5),
    "reverse": s(0.2, 3),
    "reverse_gen": s(0.0, 3),
    "neighborhood_score": s(0.75),
    "specificity_acc": s(0.2),
    "neighborhood_gen": s(0.5),
}
GENERAL = {
    "edited": {"wikitext_ppl": 22.0, "fluency": 5.0},
    "unedited": {"wikitext_ppl": 20.0, "fluency": 5.5},
}


def write(tmp_path, name, res):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    old = {k: v for k, v in BASE.items() if not k.endswith("_gen")}  # an older run: no *_gen
    memit_metrics = {k: v for k, v in ROME.items() if not k.endswith("_gen")}
    memit = result("memit", memit_metrics, old, mode="sequential", batch_size=2)
    ke_post = {"portability": s(0.4, 2), "reliability": s(1.0, 2)}
    ke_pre = {"portability": s(0.1, 2), "reliability": s(0.0, 2)}
    ke = result("ft", ke_post, ke_pre, cases=("a", "b"), data="/k/test_cf.json")
    return [
        write(tmp_path, "rome", result("rome", ROME, BASE, general=GENERAL)),
        write(tmp_path, "memit", memit),
        write(tmp_path, "none", result("none", BASE, BASE, general=GENERAL)),
        write(tmp_path, "ke", ke),
    ]


def cells(md: str) -> list[dict[str, str]]:
    """The Markdown table's rows as {column: cell} (the run's label without bold)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]
    return [r | {"run": r["run"].strip("*")} for r in rows]


def by_run(rows: list[dict]) -> dict[str, dict]:
    return {f"{r['run']}@{r['data']}": r for r in rows}


def test_table_rows_and_cells(runs):
    res = compare.compare(runs)
    t = by_run(cells(res["markdown"]))
    memit_label = "memit (sequential, 2 per round)@cf.json"
    assert list(t) == [
        "unedited@cf.json",
        "rome@cf.json",
        memit_label,
        "unedited@test_cf.json",
        "ft@test_cf.json",
    ]
    rome, base, memit = t["rome@cf.json"], t["unedited@cf.json"], t[memit_label]
    assert rome["n"] == "4" and rome["reliability ES"] == "1.00"
    assert rome["reliability acc"] == "0.90" and rome["reliability gen"] == "0.75"
    assert rome["reverse acc"] == "0.20 (3)" and rome["reverse gen"] == "0.00 (3)"  # k < n
    assert rome["locality gen"] == "0.50" and rome["paraphrase PS"] == "0.50"
    assert rome["ppl ×"] == "1.10" and rome["fluency"] == "5.00"
    assert base["reliability gen"] == "0.00" and base["ppl ×"] == "1.00"  # the newer baseline's
    assert base["fluency"] == "5.50"
    assert memit["reliability gen"] == "—" and memit["paraphrase PS"] == "0.50"  # not measured
    assert "none" not in " ".join(t)  # the none run is the unedited row
    ke = t["ft@test_cf.json"]
    assert ke["portability acc"] == "0.40" and ke["reliability ES"] == "—"
    assert t["unedited@test_cf.json"]["portability acc"] == "0.10"
    assert "paraphrase acc" not in rome  # nobody measured generalization: no column
    assert "Sources:" in res["markdown"] and runs[2] in res["markdown"]


def test_one_unedited_row_per_case_set(tmp_path):
    a = write(tmp_path, "a", result("rome", ROME, BASE))
    b = write(tmp_path, "b", result("rome", ROME, BASE, cases=("9",)))  # other cases
    c = write(tmp_path, "c", result("memit", ROME, BASE, data="/other/dir/cf.json"))  # same
    t = cells(compare.compare([a, b, c])["markdown"])
    unedited = [r["n"] for r in t if r["run"] == "unedited"]
    assert unedited == ["4", "1"]  # (cf.json, cases 1-4) and (cf.json, case 9)


def test_files_written(runs, tmp_path):
    out = tmp_path / "out"
    res = compare.compare(runs, out)
    assert (out / "compare.md").read_text().startswith("| data | run | n |")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert res["files"] == [str(out / "compare.md"), str(out / "compare.png")]
    assert not list(out.glob(".*"))  # no temporary file left


def test_errors(tmp_path):
    with pytest.raises(InputError, match="no results.json"):
        compare.compare([str(tmp_path)])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        compare.compare([str(bad)])
    (bad / "results.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(InputError, match="not the results of a jaxedit eval run"):
        compare.compare([str(bad)])
    with pytest.raises(InputError, match="at least one"):
        compare.compare([])


def test_cli(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["eval", "--compare", *runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cf.json | rome | 4 |" in printed and str(out / "compare.png") in printed
    assert (out / "compare.md").exists()
    assert cli.main(["eval", "--compare", runs[0], "--data", "x.json"]) == 2
    assert "drop --data" in capsys.readouterr().err


def test_common_cases_resummarise_each_run(tmp_path):
    """--common-cases: every run of a data set summarised over the cases they all measured."""

    def run(method, values):  # {case: (edited reliability, unedited reliability)}
        cases = [
            {"case_id": c, "metrics": {"reliability": a}, "baseline": {"reliability": b}}
            for c, (a, b) in values.items()
        ]
        summary = lambda key: {
            "reliability": s(sum(c[key]["reliability"] for c in cases) / len(cases), len(cases))
        }  # noqa: E501
        return result(method, summary("metrics"), summary("baseline"), cases=()) | {
            "cases": cases,
            "n": len(cases),
        }

    a = write(tmp_path, "a", run("rome", {1: (1.0, 0.0), 2: (0.5, 0.0), 3: (0.0, 1.0)}))
    b = write(tmp_path, "b", run("memit", {1: (0.0, 0.0), 2: (1.0, 0.0)}))
    plain = cells(compare.compare([a, b])["markdown"])
    assert [r["n"] for r in plain] == ["3", "2", "3", "2"]  # two case sets, two unedited rows
    t = cells(compare.compare([a, b], common=True)["markdown"])
    assert [(r["run"], r["n"], r["reliability acc"]) for r in t] == [
        ("unedited", "2", "0.00"),
        ("rome", "2", "0.75"),
        ("memit", "2", "0.50"),
    ]
    c = write(tmp_path, "c", run("ft", {7: (1.0, 0.0)}))
    with pytest.raises(InputError, match="share no case"):
        compare.compare([a, c], common=True)
