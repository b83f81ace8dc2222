"""IKE benchmarks: the prefix KV cache's speed, and the own-copy demonstration's effect.

`speed`: queries/s with the prefix KV cache vs recomputing the context in every query row.
Same model, same CounterFact edits, same IKE contexts (retrieved from the training split with
TF-IDF, so no pool embedding is needed), same queries: every (prompt, target) the evaluation
scores for an edit (`jaxedit.eval.measure.queries`).

- cached   : `prefix_cache.score_continuations(...)`: the context runs once into a KV cache,
             the short query rows attend to it.
- baseline : the same rows with the context prepended and recomputed in every row
             (`use_cache=False`), as before the cache.

Each setting first scores one edit untimed (compiles its buckets), then times the rest. Also
reported: the largest |Δ log p| between the two paths.

`copy-demo`: `jaxedit.eval.runner.evaluate` of IKE (the smollm2-135m preset: k = 8, hidden-state
retrieval over the whole training split) on the known cases among the first N CounterFact edit
records, with and without the edited fact's own copy demonstration (`copy_own_fact`), on the
same cases. Resumable (each setting's cases.jsonl); results go under "copy_own_fact".

    uv run python benchmarks/ike.py speed      # -> benchmarks/results/ike.json
    taskset -c 1 uv run python benchmarks/ike.py copy-demo --n 80 --out-dir runs/ike-copy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import jaxedit as je
from jaxedit.eval import datasets as data
from jaxedit.eval import prefix_cache, report
from jaxedit.eval.measure import queries
from jaxedit.io.checkpoint import load

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "counterfact")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "ike.json")
SUMMARY = report.TABLE_ORDER[:7]  # the CounterFact scores and magnitudes


def _rows(lm, context: str, qs):
    tok = lm.tokenizer
    head, bodies = prefix_cache.split_context(tok, context, [p.rstrip() for _, p, _ in qs])
    targets = [tok.encode_continuation(" " + t.strip()) for _, _, t in qs]
    return head, bodies, targets


def speed(args, lm) -> dict:
    edits = data.load(args.edits, n=args.n).requests
    m = je.methods.get("ike")
    settings = []
    for k in (int(x) for x in args.ks.split(",")):
        hp = m.hparams(
            "smollm2-135m", demos=args.pool, pool_size=args.pool_size, k=k, embedder="tfidf"
        )
        state = m.prepare(lm, hp)
        res = {"k": k, "cached_s": 0.0, "baseline_s": 0.0, "queries": 0, "context_tokens": []}
        diff = 0.0
        for i, r in enumerate(edits):
            edit, info = m.compute(lm, state, [r])
            context = je.apply(lm, edit).context_text()
            head, bodies, targets = _rows(lm, context, queries(r))
            t0 = time.perf_counter()
            cached, _ = prefix_cache.score_continuations(lm, head, bodies, targets)
            t1 = time.perf_counter()
            full, _ = prefix_cache.score_continuations(lm, head, bodies, targets, use_cache=False)
            t2 = time.perf_counter()
            diff = max(
                diff, max(float(np.abs(a - b).max()) for a, b in zip(cached, full, strict=True))
            )
            if i == 0:  # warm-up (compiles)
                continue
            res["cached_s"] += t1 - t0
            res["baseline_s"] += t2 - t1
            res["queries"] += len(targets)
            res["context_tokens"].append(info["context_tokens"])
        res["cached_queries_per_s"] = res["queries"] / res["cached_s"]
        res["baseline_queries_per_s"] = res["queries"] / res["baseline_s"]
        res["speedup"] = res["cached_queries_per_s"] / res["baseline_queries_per_s"]
        res["mean_context_tokens"] = float(np.mean(res.pop("context_tokens")))
        res["max_abs_logprob_diff_cached_vs_baseline"] = diff
        settings.append(res)
        print(json.dumps(res), flush=True)
    return {
        "benchmark": "ike prefix KV cache",
        "model": args.model,
        "edits_timed_per_setting": args.n - 1,
        "pool": f"{os.path.basename(args.pool)} (first {args.pool_size}, TF-IDF retrieval)",
        "baseline": "same rows, context recomputed in every row (score_continuations, no cache)",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), jax CPU",
        "settings": settings,
    }


def copy_demo(args, lm) -> dict:
    from jaxedit.eval.runner import evaluate

    requests = data.load(args.edits, n=args.n).requests
    m = je.methods.get("ike")
    out: dict = {
        "command": (
            f"benchmarks/ike.py copy-demo --n {args.n}: evaluate(known_only=True) of IKE, preset "
            f"smollm2-135m (k=8, hidden-state retrieval), pool {os.path.basename(args.pool)}"
        ),
        "settings": {},
    }
    for own in (True, False):
        hp = m.hparams("smollm2-135m", demos=args.pool, copy_own_fact=own)
        state = m.prepare(lm, hp, cache_dir=args.cache_dir, progress=True)
        name = f"copy_own_fact_{str(own).lower()}"
        result = evaluate(
            lm,
            requests,
            m,
            state,
            known_only=True,
            out=os.path.join(args.out_dir, name),
            resume=True,
            progress=True,
            info={"data": os.path.basename(args.edits), "copy_own_fact": own},
        )
        means = {k: result["metrics"][k]["mean"] for k in SUMMARY if k in result["metrics"]}
        out["settings"][name] = {
            "metrics": means,
            "n_cases": result["n"],
            "n_dropped": result["n_dropped"],
            "case_ids": [row["case_id"] for row in result["cases"]],
            # per edit as measured (resumed cases keep their times); machine shared, CPU
            "seconds_per_edit_median": result["seconds"]["per_edit"]["median"],
        }
        out["baseline"] = {
            k: result["baseline"][k]["mean"] for k in SUMMARY if k in result["baseline"]
        }
        print(name, json.dumps(out["settings"][name]["metrics"]), flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["speed", "copy-demo"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--edits", default=os.path.join(DATA, "counterfact-edit.json"))
    p.add_argument("--pool", default=os.path.join(DATA, "counterfact-train.json"))
    p.add_argument("--pool-size", type=int, default=2000, help="speed: first N pool records")
    p.add_argument("--n", type=int, default=5, help="edit records (speed: first is warm-up)")
    p.add_argument("--ks", default="8,32", help="speed: k values")
    p.add_argument("--out-dir", default="runs/ike-copy-demo", help="copy-demo: run directories")
    p.add_argument("--cache-dir", default=None, help="copy-demo: pool embedding cache")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()

    lm = load(args.model)
    prev = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
    if args.what == "speed":
        out = {**speed(args, lm), **{k: prev[k] for k in ("eval", "copy_own_fact") if k in prev}}
    else:
        out = {**prev, "copy_own_fact": copy_demo(args, lm)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
