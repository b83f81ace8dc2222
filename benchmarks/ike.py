"""IKE scoring benchmark: queries/s with the prefix KV cache vs recomputing the prefix per query.

Same model, same CounterFact edits, same IKE contexts (retrieved from the training split with
TF-IDF, so no pool embedding is needed here), same queries: every (prompt, target) the
evaluation runner scores for an edit (`jaxedit.eval.runner.queries`: rewrite and paraphrase with
target_new and target_true, the neighbour with its answer and with target_new).

- cached   : `metrics.score_targets(..., prefix=context)`: the context runs once into a KV
             cache, the short query rows attend to it (`jaxedit.eval.prefix_cache`).
- baseline : the same rows with the context prepended and recomputed in every row
             (`metrics.score_ids(lm_scorer(lm), with_prefix(...))`), as before the cache.

Each setting first scores one edit untimed (compiles its buckets), then times the rest. Also
reported: the largest |Δ log p| between the two paths, and between two layouts of the baseline
itself (rows scored all together vs one call per row) — the fp32 noise floor.

    uv run python benchmarks/ike.py  # -> benchmarks/results/ike.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np

from jaxedit.eval import datasets as data
from jaxedit.eval import runner as evaluate
from jaxedit.eval import scoring as metrics
from jaxedit.io.checkpoint import load
from jaxedit.methods import ike

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "counterfact")


def _baseline(lm, prompts, targets, context, max_rows=metrics.ROW_BUCKETS[-1]):
    p_ids, t_ids = metrics.encode_queries(lm.tokenizer, prompts, targets)
    rows = metrics.with_prefix(lm.tokenizer, context, p_ids, prompts)
    return metrics.score_ids(
        metrics.lm_scorer(lm), rows, t_ids, pad_id=lm.tokenizer.pad_id, max_rows=max_rows
    )


def _max_diff(a, b) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a.logprobs, b.logprobs, strict=True)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--edits", default=os.path.join(DATA, "counterfact-edit.json"))
    p.add_argument("--pool", default=os.path.join(DATA, "counterfact-train.json"))
    p.add_argument("--pool-size", type=int, default=2000)
    p.add_argument("--n", type=int, default=5, help="edits per setting (first one is warm-up)")
    p.add_argument("--ks", default="8,32")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ike.json"))
    args = p.parse_args()

    lm = load(args.model)
    edits = data.load(args.edits, n=args.n).requests
    pool = ike.Pool.load(args.pool, args.pool_size)
    retriever = ike.TfidfRetriever(pool.keys())
    settings = []
    for k in (int(x) for x in args.ks.split(",")):
        editor = ike.IKE(pool, retriever, ike.IKEParams(k=k))
        res = {"k": k, "cached_s": 0.0, "baseline_s": 0.0, "queries": 0, "context_tokens": []}
        diff = floor = 0.0
        for i, r in enumerate(edits):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctx = editor(lm, [r]).context
            qs = evaluate.queries(r)
            prompts, targets = [q[1] for q in qs], [q[2] for q in qs]
            t0 = time.perf_counter()
            cached = metrics.score_targets(lm, prompts, targets, prefix=ctx)
            t1 = time.perf_counter()
            full = _baseline(lm, prompts, targets, ctx)
            t2 = time.perf_counter()
            diff = max(diff, _max_diff(cached, full))
            if i == 0:  # warm-up (compiles); also measure the noise floor once
                floor = _max_diff(full, _baseline(lm, prompts, targets, ctx, max_rows=1))
                continue
            res["cached_s"] += t1 - t0
            res["baseline_s"] += t2 - t1
            res["queries"] += len(qs)
            res["context_tokens"].append(len(lm.tokenizer.encode(ctx)))
        res["cached_queries_per_s"] = res["queries"] / res["cached_s"]
        res["baseline_queries_per_s"] = res["queries"] / res["baseline_s"]
        res["speedup"] = res["cached_queries_per_s"] / res["baseline_queries_per_s"]
        res["mean_context_tokens"] = float(np.mean(res.pop("context_tokens")))
        res["max_abs_logprob_diff_cached_vs_baseline"] = diff
        res["noise_floor_baseline_vs_itself"] = floor
        settings.append(res)
        print(json.dumps(res))

    out = {
        "benchmark": "ike prefix KV cache",
        "model": args.model,
        "edits_timed_per_setting": args.n - 1,
        "pool": f"{os.path.basename(args.pool)} (first {args.pool_size}, TF-IDF retrieval)",
        "baseline": "same rows, context recomputed in every row (metrics.with_prefix + lm_scorer)",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), jax CPU",
        "settings": settings,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if os.path.exists(args.out):  # keep the evaluation numbers recorded next to the timings
        with open(args.out) as f:
            out = {**{k: v for k, v in json.load(f).items() if k == "eval"}, **out}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
