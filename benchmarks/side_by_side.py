"""The README's side-by-side table of the 2,000-edit runs ("Many edits"), printed from the
collected summaries: each run's curve points at 400 / 800 / 1,200 / 1,600 / 2,000 edits and
its last one, known facts left out where a run measured them on unfiltered records.

    uv run python benchmarks/side_by_side.py [benchmarks/results/many_edits_2000.json]

`tests/test_docs.py` checks that the README holds exactly this table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxedit.eval import curves

RESULTS = Path(__file__).resolve().parent / "results" / "many_edits_2000.json"
# Row label: the run's key in the results file (`benchmarks/many_edits_2000.sh <name>`).
SIDE_BY_SIDE = {
    "AlphaEdit (preset)": "alphaedit-2000",
    "AlphaEdit + MPES + WikiText C": "alphaedit-mpes-wiki-2000",
    "MEMIT-seq": "memit-2000",
    "ROME-seq": "rome-2000",
    "FT-L": "ft-l-2000",
}


def side_by_side(path: Path = RESULTS) -> str:
    collected = json.loads(path.read_text(encoding="utf-8"))
    runs = [
        curves.from_summary(curves.comparable_known_facts(collected[key]), label)
        for label, key in SIDE_BY_SIDE.items()
        if key in collected
    ]
    return curves.milestone_table(runs)


if __name__ == "__main__":
    print(side_by_side(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
