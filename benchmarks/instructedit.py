"""InstructEdit against task-specific MEND editors and a multi-task editor without instructions.

Each editor (a `jaxedit mend-train` directory) edits held-out cases of each task it is compared
on, one case at a time from the unedited model (`jaxedit.eval.runner`, independent mode, no
general block), and the per-task scores land in one JSON file:

    counterfact  counterfact-edit.json records 0-239, the cases the model knows (60; the same
                 cases as the MEND sweep in the README)
    zsre         zsre_mend_eval_portability_gpt4.json records 0-59 (MEND's zsRE eval split)
    knowedit     knowedit/test_cf.json records 0-59 (WikiData_counterfact test; held out of
                 every training run: InstructEdit's unseen task)

Two protocols for an instructed editor:
    raw          the instruction only in the edit input; scored on the data's own prompts
                 (`--method instructedit`: the edited model is used without instructions)
    instructed   the reference's test (zjunlp/EasyEdit examples/test_InstructEdit.py): rewrite,
                 paraphrase and portability prompts instructed, neighbourhood prompts not
                 (`instructions.instruct_request`, edited by the same editor as plain MEND)

    taskset -c 1 nice -n 5 uv run python benchmarks/instructedit.py \\
        --editor instructedit=editors/ie-cf-zsre --editor mend-cf=editors/mend-cf:counterfact \\
        ... [--tasks counterfact,zsre,knowedit] [--n 60] [--out FILE.json]

`--n` above 60 reads proportionally more records (`--n 200`: KnowEdit records 0-199, CounterFact
the known cases of records 0-959); give such a run its own `--out` and `--runs`.
`NAME=DIR:TASKS` evaluates that editor on TASKS only (comma-separated; default: `--tasks`);
`NAME=DIR:TASKS@TASK` writes TASK's instruction before every request (e.g. KnowEdit, unseen,
edited through CounterFact's instruction: `ie-as-cf=editors/ie-cf-zsre:knowedit@counterfact`).
An entry already in the output file is skipped (the run is resumable entry by entry).

`--paired A,B` (entries NAME/TASK/PROTOCOL of the output file, evaluated on the same cases) adds
`paired["A vs B"]`: per measure the mean of B − A over the common cases, its standard error and
the cases where B wins / loses, from the per-case rows in `--runs` (`--paired-skip K` leaves
out the first K cases, e.g. those a smaller earlier run already showed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxedit import methods
from jaxedit.eval import datasets, runner
from jaxedit.eval.measure import is_known, measure
from jaxedit.io.checkpoint import load
from jaxedit.methods.mend.checkpoint import read_config, write_json_atomic
from jaxedit.methods.mend.instructions import Instructions, instruct_request

SHARED = Path(__file__).parent.parent.parent / "shared" / "data"
OUT = Path(__file__).parent / "results" / "instructedit.json"
TASKS = {
    # task: (file, records read, known_only)
    "counterfact": ("counterfact/counterfact-edit.json", 240, True),
    "zsre": ("zsre/zsre_mend_eval_portability_gpt4.json", 60, False),
    "knowedit": ("knowedit/test_cf.json", 60, False),
}
KEEP = (
    "efficacy_score",
    "reliability",
    "paraphrase_score",
    "generalization",
    "neighborhood_score",
    "locality",
    "specificity_acc",
    "portability",
)


def summary(result: dict) -> dict:
    pick = lambda block: {k: round(v["mean"], 4) for k, v in block.items() if k in KEEP}
    return {
        "n": result["n"],
        "edited": pick(result["metrics"]),
        "unedited": pick(result["baseline"]),
        "seconds_per_edit": result["seconds"]["per_edit"],
    }


def paired(runs: Path, a: str, b: str, skip: int = 0) -> dict:
    """B − A per case over the cases both runs measured (the run directories `runner.evaluate`
    wrote: `<runs>/<name>-<task>-<protocol>/cases.jsonl`), the first `skip` of A's left out."""

    def rows(entry: str) -> tuple[list, dict]:
        path = runs / entry.replace("/", "-") / "cases.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        cases = [r for r in lines if "case_id" in r]
        return [r["case_id"] for r in cases], {r["case_id"]: r["metrics"] for r in cases}

    order, ma = rows(a)
    _, mb = rows(b)
    ids = [i for i in order[skip:] if i in mb]
    out = {"n": len(ids), "skipped_first": skip}
    for k in KEEP:
        if not all(k in ma[i] and k in mb[i] for i in ids):
            continue
        d = np.asarray([mb[i][k] - ma[i][k] for i in ids], np.float64)
        out[k] = {
            "a": float(np.mean([ma[i][k] for i in ids])),
            "b": float(np.mean([mb[i][k] for i in ids])),
            "diff": float(d.mean()),
            "se": float(d.std(ddof=1) / np.sqrt(d.size)),
            "b_wins": int((d > 0).sum()),
            "b_loses": int((d < 0).sum()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", action="append", default=[], metavar="NAME=DIR[:TASKS]")
    ap.add_argument("--paired", action="append", default=[], metavar="A,B")
    ap.add_argument("--paired-skip", type=int, default=0)
    ap.add_argument("--tasks", default="counterfact,zsre,knowedit")
    ap.add_argument("--n", type=int, default=60, help="cases per task")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--runs", default="runs/instructedit/eval", help="per-run directories")
    args = ap.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if not args.editor and not args.paired:
        ap.error("give --editor (to evaluate) or --paired (to compare evaluated entries)")
    for spec in args.paired:
        a, _, b = spec.partition(",")
        key = f"{a} vs {b}" + (f" (after the first {args.paired_skip})" if args.paired_skip else "")
        results.setdefault("paired", {})[key] = r = paired(Path(args.runs), a, b, args.paired_skip)
        write_json_atomic(out, results)
        print(key, json.dumps(r))
    if not args.editor:
        return
    lm = load()
    cases = {}  # task -> the held-out requests (known ones: chosen on the raw prompts, once)
    for task in args.tasks.split(","):
        file, n_records, known = TASKS[task]
        # records read: TASKS' count per 60 cases (CounterFact: about one in four is known)
        reqs = datasets.load(SHARED / file, n=n_records * -(-args.n // 60)).requests
        if known:
            reqs = [r for r, pre in zip(reqs, measure(lm, reqs), strict=True) if is_known(r, pre)]
        cases[task] = reqs[: args.n]
    for spec in args.editor:
        name, _, directory = spec.partition("=")
        directory, _, only = directory.partition(":")
        only, _, as_task = only.partition("@")
        conf = read_config(Path(directory))
        instr = conf.get("instructions")
        protocols = ("raw", "instructed") if instr else ("raw",)
        for task, reqs in cases.items():
            if only and task not in only.split(","):
                continue
            for protocol in protocols:
                key = f"{name}/{task}/{protocol}"
                if key in results:
                    continue
                if protocol == "raw" and instr:
                    m = methods.get("instructedit")
                    hp = m.hparams(editor=directory, task=as_task or None)
                    rs = reqs
                else:
                    m = methods.get("mend")
                    hp = m.hparams(lm, editor=directory)
                    rs = reqs
                    if instr:
                        ins = Instructions.from_dict(instr)
                        rs = [instruct_request(r, ins, as_task or None) for r in reqs]
                state = m.prepare(lm, hp)
                t0 = time.time()
                res = runner.evaluate(
                    lm,
                    rs,
                    m,
                    state,
                    general=False,
                    out=Path(args.runs) / f"{name}-{task}-{protocol}",
                    resume=True,
                )
                results[key] = {
                    "editor": directory,
                    "editor_step": state.trained.step
                    if hasattr(state, "trained")
                    else state.mend.trained.step,
                    "tasks_trained": list(conf.get("tasks", {})),
                    "instructions": instr is not None,
                    "data": TASKS[task][0],
                    **summary(res),
                    "seconds": round(time.time() - t0, 1),
                }
                write_json_atomic(out, results)
                e = results[key]["edited"]
                print(key, results[key]["n"], e, flush=True)


if __name__ == "__main__":
    main()
