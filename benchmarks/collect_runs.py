"""Summaries of finished `jaxedit eval` runs in one results file: each run directory's
`results.json` without its per-case rows (header, hparams, metrics, baseline, general block,
curve, seconds), keyed by the directory's name, merged into the output file.

    uv run python benchmarks/collect_runs.py runs/many/alphaedit-2000 \\
        --out benchmarks/results/many_edits_2000.json

The run directories stay local (`runs/` is not committed, and a new machine starts without
them); this file is what the README's tables cite. `--partial` also takes a sequential run
that has not finished (no `results.json`): its header, the rounds done, their seconds and
per-round infos (per layer only the update norm) and the curve points so far, from
`lifelong/progress.json`, marked `"finished": false`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from machine import machine

from jaxedit.methods.mend.checkpoint import write_json_atomic  # temp file, then os.replace


def round_info(info: dict) -> dict:
    """A round's numbers with its per-layer rows cut down to each layer's update norm (where
    the round wrote: the joint solve and the layer loop spread it differently)."""
    out = {k: v for k, v in info.items() if k != "layers_info"}
    rows = info.get("layers_info") or []
    out["update_norms"] = {str(r["layer"]): r["update_norm"] for r in rows if "update_norm" in r}
    if rows and "pass_residuals" in rows[-1]:
        out["pass_residuals"] = rows[-1]["pass_residuals"]
    return out


def summary(run_dir: Path, partial: bool = False) -> dict:
    path = run_dir / "results.json"
    if path.exists():
        result = json.loads(path.read_text())
        result.pop("cases", None)
        return result
    progress = run_dir / "lifelong" / "progress.json"
    if not (partial and progress.exists()):
        raise SystemExit(
            f"{run_dir}: no results.json (the run has not finished"
            + ("; --partial takes a sequential run's progress)" if not partial else ")")
        )
    p = json.loads(progress.read_text())
    infos = [round_info(i) for i in p["infos"]]
    return {
        **json.loads((run_dir / "run.json").read_text()),
        "finished": False,
        "rounds_done": p["rounds_done"],
        "curve": p["curve"],
        "round_infos": infos,
        "seconds": {"per_round": p["round_seconds"], "total": p["seconds"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--partial", action="store_true", help="also unfinished sequential runs")
    args = ap.parse_args()
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out["collected_on"] = machine()  # where the summaries were gathered, not where they ran
    for run_dir in args.runs:
        out[run_dir.name] = s = summary(run_dir, args.partial)
        done = "" if s.get("finished", True) else f", {s['rounds_done']} rounds done (unfinished)"
        print(f"{run_dir.name}: {s['n']} cases{done}")
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
