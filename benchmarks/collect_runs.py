"""Summaries of finished `jaxedit eval` runs in one results file: each run directory's
`results.json` without its per-case rows (header, hparams, metrics, baseline, general block,
curve, seconds), keyed by the directory's name, merged into the output file.

    uv run python benchmarks/collect_runs.py runs/many/alphaedit-2000 \\
        --out benchmarks/results/many_edits_2000.json

The run directories stay local (`runs/` is not committed); this file is what the README's
tables cite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from machine import machine

from jaxedit.methods.mend.checkpoint import write_json_atomic  # temp file, then os.replace


def summary(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.exists():
        raise SystemExit(f"{run_dir}: no results.json (the run has not finished)")
    result = json.loads(path.read_text())
    result.pop("cases", None)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out["collected_on"] = machine()  # where the summaries were gathered, not where they ran
    for run_dir in args.runs:
        out[run_dir.name] = summary(run_dir)
        print(f"{run_dir.name}: {out[run_dir.name]['n']} cases")
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
