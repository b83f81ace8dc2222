"""Known-facts accuracy, as `jaxedit eval` now measures it (200 records of the data file that no
run edits and that the unedited model completes greedily; unedited value 1), on the models that
sequential runs left in their last checkpoint (`runs/many/<name>/lifelong/round-*/`): runs made
before that measure recorded the unfiltered one (~0.08 unedited), this restates them.

    uv run python benchmarks/known_facts_after.py alphaedit-mpes-wiki-ns1e-2-2000 memit-2000 \\
        [--data ../shared/data/counterfact/counterfact-edit.json --n 2960] \\
        [--out benchmarks/results/many_edits_2000.json]

`--n` must be the run's: the candidates exclude the records it read. Writes the key
`known_facts_after_checkpoint` into the output file (merged).
"""

from __future__ import annotations

import json
from pathlib import Path

import run_checkpoints
from machine import machine

import jaxedit as je
from jaxedit.eval import general
from jaxedit.methods.mend.checkpoint import write_json_atomic

OUT = Path(__file__).parent / "results" / "many_edits_2000.json"


def main() -> None:
    args = run_checkpoints.arguments(__doc__.splitlines()[0], OUT).parse_args()
    lm = je.load("smollm2-135m")
    _, facts, scored = run_checkpoints.known_facts(lm, args.data, args.n)
    result = {
        "machine": machine(),
        "facts": f"{args.data}: {len(facts)} {general.KNOWN_FILTER_NOTE} of {scored} scored",
        "unedited": general.known_facts_accuracy(lm, facts),
        "runs": {},
    }
    for name in args.runs:
        edited, ids = run_checkpoints.last_edited(lm, name)
        edits = len(ids)
        acc = general.known_facts_accuracy(edited, facts)
        result["runs"][name] = {"edits": edits, "known_facts_acc": acc}
        print(f"{name}: {edits} edits, known facts {acc:.3f}", flush=True)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out["known_facts_after_checkpoint"] = result
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
