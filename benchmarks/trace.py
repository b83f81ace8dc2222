"""Causal-tracing benchmark: the whole grid (hidden, mlp, attn; 10 samples) for one fact.

jaxedit's batched grid (`jaxedit.trace.trace`) against a cell-by-cell loop that mirrors the
original ROME implementation (`trace_loop(clean_row=True, full_logits=True,
pad_to_bucket=False)`: one forward of samples + 1 rows per grid cell, the clean run in row 0,
logits at every position, the prompt at its exact length), same model, prompt and noise.

Every baseline cell costs the same (a full forward of the same shape), so the baseline is timed
on `--baseline-cells` cells spread over the grid (after one warm-up cell that compiles it) and
extrapolated to the 3 * T * L cells of the grid; both numbers are in the JSON. The jaxedit grid
runs once (the CPU here is shared and slow); its compile time is the sum of JAX's own compile
events (tracing, lowering, backend compilation) and the per-fact time is the rest: what a fact
costs when tracing a data set of prompts in an already compiled length bucket. The results are
checked against the baseline cells (max |difference|).

    uv run python benchmarks/trace.py  # -> benchmarks/results/trace.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from jaxedit import trace as tr
from jaxedit.checkpoint import load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    p.add_argument("--subject", default="The Eiffel Tower")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--baseline-cells", type=int, default=15)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    lm = load(args.model)
    L = lm.config.n_layers
    kw = dict(samples=args.samples, kinds=tr.KINDS, noise="3s", window=10, seed=0)

    # Compile time, measured by JAX itself: tracing, lowering and backend compilation events.
    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: (
            compile_events.append(secs) if name.startswith("/jax/core/compile/") else None
        )
    )
    t = time.perf_counter()
    warm = tr.trace(lm, args.prompt, args.subject, **kw)
    cold_s = time.perf_counter() - t
    compile_s = sum(compile_events)
    warm_s = cold_s - compile_s
    n_tokens = len(warm["tokens"])
    n_cells = len(tr.KINDS) * n_tokens * L

    rng = np.random.default_rng(0)
    cells = [
        (kind, int(i), int(layer))
        for kind in tr.KINDS
        for i, layer in zip(
            rng.integers(0, n_tokens, args.baseline_cells // 3),
            rng.integers(0, L, args.baseline_cells // 3),
            strict=True,
        )
    ]
    loop = dict(clean_row=True, full_logits=True, pad_to_bucket=False, **kw)
    t = time.perf_counter()
    tr.trace_loop(lm, args.prompt, args.subject, cells=cells[:1], **loop)  # compile
    baseline_warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = tr.trace_loop(lm, args.prompt, args.subject, cells=cells, **loop)
    baseline_cell_s = (time.perf_counter() - t) / len(cells)
    baseline_fact_s = baseline_cell_s * n_cells
    diff = max(abs(v - warm["kinds"][k]["scores"][i, layer]) for (k, i, layer), v in ref.items())

    result = {
        "benchmark": "causal trace, whole grid (hidden, mlp, attn) for one fact",
        "model": lm.name,
        "prompt": args.prompt,
        "subject": args.subject,
        "tokens": n_tokens,
        "layers": L,
        "samples": args.samples,
        "window": 10,
        "grid_cells": n_cells,
        "jaxedit_first_call_s": cold_s,
        "jaxedit_per_fact_s": warm_s,
        "jaxedit_compile_s": compile_s,
        "baseline": "cell-by-cell loop mirroring kmeng01/rome trace_with_patch: one jitted "
        "forward of samples+1 rows per cell, full logits, exact prompt length",
        "baseline_cells_timed": len(cells),
        "baseline_compile_s": baseline_warmup_s,
        "baseline_per_cell_s": baseline_cell_s,
        "baseline_per_fact_s_extrapolated": baseline_fact_s,
        "speedup_per_fact": baseline_fact_s / warm_s,
        "speedup_including_compile": baseline_fact_s / cold_s,
        "max_abs_diff_vs_baseline_cells": float(diff),
        "answer": warm["answer"],
        "high_score": warm["high_score"],
        "low_score": warm["low_score"],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "platform": platform.platform(),
        "note": "shared 2-core CPU: absolute times depend on the other processes' load; the "
        "ratio is measured in one run",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trace.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "trace_example.json"), "w") as f:
        json.dump(tr.to_json(warm), f)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
