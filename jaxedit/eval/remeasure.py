"""Measure a finished lifelong run again: the metrics added since it ran, on its final model.

A sequential run (`jaxedit eval --mode sequential --out DIR`) measures every case on its final
model, and its last checkpoint (`DIR/lifelong/round-N/edit.safetensors`, the accumulated edit)
IS that model. So what a newer version of the evaluation measures (the `*_gen` answer metrics,
reverse probes on real data) can be measured on exactly the model the run ended with, without
editing again:

    jaxedit eval --remeasure runs/many/memit-seq --out runs/compare/memit-seq

The run's cases are read again from its data file by case id (in the run's order), scored
teacher-forced and by greedy generation on the unedited model and on `apply(model, final
edit)`, and written as a new run directory (`results.json`, `results.md`) that `--compare`
reads. The general block is the original run's (it was measured on the same final model);
`remeasured` records where the edit came from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jaxedit.edits import apply, load_edit
from jaxedit.errors import InputError
from jaxedit.eval import datasets, report
from jaxedit.eval.measure import (
    GEN_MARGIN,
    case_metrics,
    gen_case_metrics,
    measure,
    measure_generated,
)
from jaxedit.eval.runner import LIFELONG_DIR
from jaxedit.io.atomic import write_text_atomic
from jaxedit.models.lm import LanguageModel


def final_edit_path(run_dir: Path, result: dict) -> Path:
    """The accumulated edit after the run's last round (refused if the run did not finish)."""
    progress = run_dir / LIFELONG_DIR / "progress.json"
    if result.get("mode") != "sequential" or not progress.is_file():
        raise InputError(
            f"--remeasure: {run_dir} is not a finished sequential run (only those keep their "
            "final model's edit)"
        )
    p = json.loads(progress.read_text())
    if p.get("rounds_done") != result.get("rounds"):
        raise InputError(
            f"--remeasure: {run_dir} saved {p.get('rounds_done')} of {result.get('rounds')} rounds"
        )
    return run_dir / LIFELONG_DIR / p["checkpoint"] / "edit.safetensors"


def remeasure(lm: LanguageModel, run_dir: str | Path, out: str | Path) -> dict:
    """The run in `run_dir` measured again on its final model; results written to `out`.

    `lm` must be the run's (unedited) model. Returns the new results dict.
    """
    run_dir = Path(run_dir)
    f = run_dir / "results.json"
    if not f.is_file():
        raise InputError(f"--remeasure: no results.json in {run_dir}")
    result = json.loads(f.read_text())
    if result.get("model") != lm.name:
        raise InputError(f"--remeasure: {run_dir} ran on {result.get('model')}, not {lm.name}")
    edit_path = final_edit_path(run_dir, result)
    t0 = time.time()
    by_id = {
        str(r.case_id): r for r in datasets.load(result["data"], format=result["format"]).requests
    }
    old_rows = result.get("cases", [])
    missing = [c["case_id"] for c in old_rows if str(c["case_id"]) not in by_id]
    if missing:
        raise InputError(f"--remeasure: cases {missing[:5]} are not in {result['data']}")
    reqs = [by_id[str(c["case_id"])] for c in old_rows]
    edited = apply(lm, load_edit(edit_path))
    pre, post = measure(lm, reqs), measure(edited, reqs)
    gen_pre, gen_post = measure_generated(lm, reqs), measure_generated(edited, reqs)
    rows = []
    for k, (r, old) in enumerate(zip(reqs, old_rows, strict=True)):
        continuations = {"/".join(map(str, key)): s.text for key, s in gen_post[k].items()}
        rows.append(
            old
            | {
                "metrics": case_metrics(r, post[k], pre[k])
                | gen_case_metrics(r, gen_post[k], gen_pre[k]),
                "baseline": case_metrics(r, pre[k], pre[k])
                | gen_case_metrics(r, gen_pre[k], gen_pre[k]),
                "continuations": continuations,
            }
        )
    new = result | {
        "metrics": report.summarize([r["metrics"] for r in rows]),
        "baseline": report.summarize([r["baseline"] for r in rows]),
        "gen_metrics": {"margin_tokens": GEN_MARGIN, "decoding": "greedy"},
        "remeasured": {
            "from": str(run_dir),
            "edit": str(edit_path),
            "seconds": time.time() - t0,
            "what": "every case on the run's final model (its last checkpoint's accumulated "
            "edit), teacher-forced and generated; general block as the run measured it",
        },
        "cases": rows,
    }
    o = Path(out)
    if o.resolve() == run_dir.resolve():
        raise InputError("--remeasure writes a new run directory: give another --out")
    o.mkdir(parents=True, exist_ok=True)
    write_text_atomic(o / "results.json", json.dumps(new, indent=1, default=report.json_default))
    write_text_atomic(o / "results.md", report.render(new) + "\n")
    return new
