"""Evaluation throughput: batched teacher-forced scoring vs one query at a time.

Both sides run the same jitted scoring function (`jaxedit.eval.kernels.lm_scores`: forward with
logits only at the scored positions, then log-softmax and gather) on the same queries (the
rewrite / paraphrase / neighbourhood queries of CounterFact cases, `--method none`):

  - baseline: a straightforward loop, one (prompt, target) row per call (rows padded only to
    the same T / P shape buckets, so it compiles as rarely as the batched side);
  - batched: `scoring.score_ids`, rows grouped by length bucket, chunks of 8/32/128 rows, and
    the one-token targets of a prompt read off one row of that prompt (`share_rows`: the
    logits at the prompt's last token do not depend on what follows it); also timed with one
    row per query (`share=False`) to show what batching alone gives.

Compilation is excluded (both warmed up on the same shapes first). Also checks that both give
the same log-probabilities.

    uv run python benchmarks/eval.py [--cases 50]

Writes benchmarks/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from jaxedit.eval import datasets as data
from jaxedit.eval import scoring
from jaxedit.eval.measure import queries
from jaxedit.io.checkpoint import load

DATA = Path(__file__).parent.parent.parent / "shared" / "data" / "counterfact"
OUT = Path(__file__).parent / "results" / "eval.json"


def one_at_a_time(lm, p_ids, t_ids):
    score = scoring.lm_scorer(lm)
    out = []
    for p, t in zip(p_ids, t_ids, strict=True):
        pk = scoring.pack([p], [t], pad_id=lm.tokenizer.pad_id, rows=1)
        lp, _ = score(pk.tokens, pk.mask, pk.positions, pk.targets)
        out.append(np.asarray(lp)[0, : len(t)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--data", default=str(DATA / "counterfact-edit.json"))
    args = ap.parse_args()

    lm = load("smollm2-135m")
    reqs = data.load(args.data, n=args.cases).requests
    pairs = sorted({(p, t) for r in reqs for _, p, t in queries(r)})
    p_ids, t_ids = scoring.encode_queries(
        lm.tokenizer, [p for p, _ in pairs], [t for _, t in pairs]
    )
    print(f"{len(reqs)} cases -> {len(pairs)} unique (prompt, target) queries", flush=True)

    # Warm-up: compile every shape either side will use (one query per shape bucket for the
    # loop; the batched call once).
    seen, warm = set(), []
    for p, t in zip(p_ids, t_ids, strict=True):
        pk = scoring.pack([p], [t], rows=1)
        if pk.tokens.shape + pk.targets.shape not in seen:
            seen.add(pk.tokens.shape + pk.targets.shape)
            warm.append((p, t))
    one_at_a_time(lm, [p for p, _ in warm], [t for _, t in warm])
    scoring.score_ids(scoring.lm_scorer(lm), p_ids, t_ids, pad_id=lm.tokenizer.pad_id)

    t0 = time.perf_counter()
    loop = one_at_a_time(lm, p_ids, t_ids)
    t_loop = time.perf_counter() - t0
    scoring.score_ids(scoring.lm_scorer(lm), p_ids, t_ids, pad_id=lm.tokenizer.pad_id, share=False)
    t0 = time.perf_counter()
    unshared = scoring.score_ids(
        scoring.lm_scorer(lm), p_ids, t_ids, pad_id=lm.tokenizer.pad_id, share=False
    )
    t_unshared = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = scoring.score_ids(scoring.lm_scorer(lm), p_ids, t_ids, pad_id=lm.tokenizer.pad_id)
    t_batch = time.perf_counter() - t0
    n_rows = len(scoring.share_rows(p_ids, t_ids))

    diff = max(
        float(np.abs(a - b).max())
        for other in (batched.logprobs, unshared.logprobs)
        for a, b in zip(loop, other, strict=True)
    )
    n = len(pairs)
    result = {
        "benchmark": "teacher-forced scoring, batched vs one query per call",
        "model": lm.name,
        "data": os.path.basename(args.data),
        "cases": len(reqs),
        "queries": n,
        "baseline": {
            "name": "one (prompt, target) per call, same jitted scorer",
            "seconds": t_loop,
            "queries_per_s": n / t_loop,
            "cases_per_s": len(reqs) / t_loop,
        },
        "batched_one_row_per_query": {
            "name": "scoring.score_ids(share=False): batches of one length bucket, 8/32/128 rows",
            "seconds": t_unshared,
            "queries_per_s": n / t_unshared,
            "cases_per_s": len(reqs) / t_unshared,
            "speedup": t_loop / t_unshared,
        },
        "batched": {
            "name": "scoring.score_ids (the default): the same batches, and the one-token "
            "targets of a prompt read off one row of that prompt (share_rows)",
            "rows": n_rows,
            "seconds": t_batch,
            "queries_per_s": n / t_batch,
            "cases_per_s": len(reqs) / t_batch,
        },
        "speedup": t_loop / t_batch,
        "max_abs_logprob_diff": diff,
        "platform": f"{platform.machine()} {platform.system()}, cpus={os.cpu_count()}",
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "note": "both sides in one run, same process and cores; ratios are what matter",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
