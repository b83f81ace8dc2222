"""What the benchmarks that re-measure sequential runs share (`known_facts_after.py`,
`collateral.py`): their arguments, the known facts `jaxedit eval` picked for the runs, and the
model a run left in its last checkpoint (`runs/many/<name>/lifelong/round-*/`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxedit.edits import WeightEdit, apply, load_edit
from jaxedit.eval import datasets, general
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

RUNS = Path("runs/many")


def arguments(description: str, out: Path) -> argparse.ArgumentParser:
    """Run names, the runs' data file and `--n` (the candidates exclude the records a run
    read, so it must be the run's), and the results file."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", nargs="+", help="run names under runs/many/")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--n", type=int, default=2960)
    ap.add_argument("--out", type=Path, default=out)
    return ap


def known_facts(
    lm: LanguageModel, data: str, n: int
) -> tuple[list[EditRequest], list[general.Fact], int]:
    """(every record of `data`, the known facts a run reading its first `n` is measured on,
    how many candidates were scored to find them)."""
    every = datasets.load(data, skip_bad=True).requests
    read = datasets.load(data, n=n).requests
    facts, scored = general.cached_known_to(lm, general.facts_from_requests(every, read, n=None))
    return every, facts, scored


def last_edit(name: str) -> tuple[WeightEdit, list[int]]:
    """(run `name`'s edit after its last finished round, the case ids it edited, in order)."""
    d = RUNS / name / "lifelong"
    p = json.loads((d / "progress.json").read_text())
    edit = load_edit(d / p["checkpoint"] / "edit.safetensors")
    return edit, [i for r in p["round_case_ids"] for i in r]


def last_edited(lm: LanguageModel, name: str) -> tuple[LanguageModel, list[int]]:
    """(the model after run `name`'s last finished round, the case ids it edited, in order)."""
    edit, ids = last_edit(name)
    return apply(lm, edit), ids
