"""Why AlphaEdit's `joint` solve writes less of z than it plans: on a sequential run's first
round, the residual at the z layer that the joint solve's linear model predicts it leaves,
against the residual the edited model actually has, and the per-layer loop's beside it.

The joint solve chooses every layer's ΔW_l at once from keys read on the unedited model and
assumes a write reaches z unchanged (Σ_l K_lᵀ ΔW_l); MEMIT's loop edits one layer at a time
and re-reads the keys and the residual on the model edited so far. Both here make one pass
(`joint_passes=1`) from the same z's (the z cache of the run, else optimised again).

    uv run python benchmarks/joint_linearity.py alphaedit-mpes-wiki-joint-2000 \\
        alphaedit-mpes-wiki-joint-l2-9-2000 [--out benchmarks/results/many_edits_2000.json]

The run's hparams (layers and all) come from its `run.json`. Writes the key `joint_linearity`
into the output file (merged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import run_checkpoints
from machine import machine

import jaxedit as je
from jaxedit.eval import datasets
from jaxedit.methods import alphaedit, memit
from jaxedit.methods.common import spread
from jaxedit.methods.mend.checkpoint import write_json_atomic  # temp file, then os.replace

OUT = Path(__file__).parent / "results" / "many_edits_2000.json"


def mean_norm(R: np.ndarray) -> float:
    """The mean over requests of a [D N] residual's column norms."""
    return float(np.linalg.norm(R, axis=0).mean())


def one_pass(lm, hp, reqs) -> dict:
    """One round's update of the unedited model: the residual before, planned and left."""
    state = je.methods.get("alphaedit").prepare(lm, hp)
    base, z_layer = state.base, hp.layers[-1]
    zs, _ = memit.target_zs(lm, base, reqs)
    R = zs - spread.bare_outputs(lm, z_layer, reqs)  # [D N]
    row = {"residual_before": mean_norm(R)}
    if hp.joint:
        deltas, _, edited = alphaedit.joint_spread(lm, state, reqs, zs)
        planned = sum(
            spread.request_keys(lm, d.layer, reqs, base.templates, base.groups).T @ d.matrix()
            for d in deltas
        )  # [N D]: what the solve's linear model says reaches z
        row["residual_predicted"] = mean_norm(R - planned.T)
    else:
        solver = alphaedit.alphaedit_solver(state)
        deltas, _, edited = spread.spread(
            lm, hp.layers, reqs, zs, base.templates, base.groups, solver
        )
    row["residual_actual"] = mean_norm(zs - spread.bare_outputs(edited, z_layer, reqs))
    row["update_norms"] = {str(d.layer): round(d.norm(), 2) for d in deltas}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="joint runs under runs/many/")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lm = je.load("smollm2-135m")
    by_id = {r.case_id: r for r in datasets.load(args.data, skip_bad=True).requests}
    m = je.methods.get("alphaedit")
    result = {"machine": machine(), "runs": {}}
    for name in args.runs:
        run = json.loads((run_checkpoints.RUNS / name / "run.json").read_text())
        lifelong = run_checkpoints.RUNS / name / "lifelong"
        progress = json.loads((lifelong / "progress.json").read_text())
        reqs = [by_id[i] for i in progress["round_case_ids"][0]]
        hp = m.hparams("smollm2-135m", **{**run["hparams"], "joint": True, "joint_passes": 1})
        rows = {"joint": one_pass(lm, hp, reqs)}
        rows["per_layer"] = one_pass(lm, dataclasses.replace(hp, joint=False), reqs)
        result["runs"][name] = {"layers": list(hp.layers), "requests": len(reqs), **rows}
        print(name, json.dumps(rows), flush=True)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out["joint_linearity"] = result
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
