"""Causal-tracing benchmark: the whole grid (hidden, mlp, attn; 10 samples) for one fact.

jaxedit's batched grid (`jaxedit.locate.trace.trace`) against two cell-by-cell loops that mirror the
original ROME implementation (kmeng01/rome `trace_with_patch`: one forward of samples + 1 rows
per grid cell, the clean run in row 0 whose states are copied into the corrupted rows, logits
at every position, the prompt at its exact length), same model, prompt and noise draws:

- `baseline` (the original itself, when torch is importable): transformers' PyTorch model with
  forward hooks adding the noise at the embeddings and copying row 0's states, eager, as the
  reference code runs;
- `baseline_jax_loop`: the same loop over jaxedit's own jitted forward
  (`trace_loop(clean_row=True, full_logits=True, pad_to_bucket=False)`), so that the gain of the
  grid algorithm alone (skipped layers / positions, batching, last-position logits) is visible
  apart from the framework's.

Every baseline cell costs the same (a full forward of the same shape), so the baseline is timed
on `--baseline-cells` cells spread over the grid (after one warm-up cell that compiles it) and
extrapolated to the 3 * T * L cells of the grid; both numbers are in the JSON. The jaxedit grid
runs twice; its compile time is the sum of JAX's own compile
events (tracing, lowering, backend compilation) during the first call, and the per-fact time is
a second call: what a fact costs when tracing a data set of prompts in an already compiled
length bucket. The results are
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

from jaxedit.io.checkpoint import load, save_hf
from jaxedit.locate import trace as tr


def torch_loop(lm, ids, subject_range, eps, answer, cells, window) -> dict:
    """The reference procedure in PyTorch: hooks on transformers' Llama modules, one eager
    forward of samples + 1 rows per cell (row 0 clean), full logits."""
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many threads as cores we may use
    with tempfile.TemporaryDirectory() as d:
        save_hf(lm, Path(d) / "m")
        model = AutoModelForCausalLM.from_pretrained(Path(d) / "m", dtype=torch.float32).eval()
    b, e = subject_range
    S, L = eps.shape[0], lm.config.n_layers
    inp = torch.tensor([ids] * (S + 1))
    noise = torch.zeros(S + 1, len(ids), lm.config.d_model)
    noise[1:, b:e] = torch.from_numpy(eps[:, b:e])
    blocks = model.model.layers
    module = {
        "hidden": lambda i: blocks[i],
        "mlp": lambda i: blocks[i].mlp,
        "attn": lambda i: blocks[i].self_attn,
    }

    def restore(t):
        def hook(mod, inputs, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, t] = h[0, t]  # the clean row's state into every corrupted row
            return out

        return hook

    out, times = {}, []
    with torch.no_grad():
        for kind, t, layer in cells:
            lo, hi = (layer, layer + 1) if kind == "hidden" else tr.window_layers(layer, window, L)
            t0 = time.perf_counter()
            hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: o + noise)]
            hooks += [module[kind](j).register_forward_hook(restore(t)) for j in range(lo, hi)]
            logits = model(input_ids=inp).logits  # every position, as the original
            probs = torch.softmax(logits[1:, -1], dim=-1)[:, answer]
            out[(kind, t, layer)] = float(probs.mean())
            for h in hooks:
                h.remove()
            times.append(time.perf_counter() - t0)
    return out, times


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
    # Per fact with compilation amortised (data-set mode): the same call again, now compiled.
    t = time.perf_counter()
    tr.trace(lm, args.prompt, args.subject, **kw)
    warm_s = time.perf_counter() - t
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
    jax_loop_cell_s = (time.perf_counter() - t) / len(cells)
    jax_loop_fact_s = jax_loop_cell_s * n_cells

    def max_diff(ref):
        return float(
            max(abs(v - warm["kinds"][k]["scores"][i, layer]) for (k, i, layer), v in ref.items())
        )

    try:
        import torch
    except ImportError:
        torch = None
    torch_result = None
    if torch is not None:
        ids, (b, e) = tr.locate_subject(lm.tokenizer, args.prompt, args.subject)
        nu = tr.noise_level("3s", lm.params, ids[b:e])
        eps = tr.subject_noise(0, args.samples, len(ids), lm.config.d_model, range(b, e), nu)
        got, times = torch_loop(lm, ids, (b, e), eps, warm["answer_id"], cells[:1] + cells, 10)
        torch_cell_s = float(np.mean(times[1:]))  # the first cell warms PyTorch up
        torch_result = {
            "name": "kmeng01/rome trace_with_patch re-enacted: transformers PyTorch model "
            "(eager, fp32), forward hooks adding the noise and copying row 0's states, one "
            "forward of samples+1 rows per cell, full logits, exact prompt length",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cells_timed": len(times) - 1,
            "per_cell_s": torch_cell_s,
            "per_fact_s_extrapolated": torch_cell_s * n_cells,
            "speedup_per_fact": torch_cell_s * n_cells / warm_s,
            "speedup_including_compile": torch_cell_s * n_cells / cold_s,
            "max_abs_diff_vs_jaxedit": max_diff(got),
        }

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
        "baseline": torch_result or "torch not importable: see baseline_jax_loop",
        "baseline_jax_loop": {
            "name": "the same cell-by-cell loop over jaxedit's jitted forward: one forward of "
            "samples+1 rows per cell, full logits, exact prompt length",
            "cells_timed": len(cells),
            "compile_s": baseline_warmup_s,
            "per_cell_s": jax_loop_cell_s,
            "per_fact_s_extrapolated": jax_loop_fact_s,
            "speedup_per_fact": jax_loop_fact_s / warm_s,
            "speedup_including_compile": jax_loop_fact_s / cold_s,
            "max_abs_diff_vs_jaxedit": max_diff(ref),
        },
        "answer": warm["answer"],
        "high_score": warm["high_score"],
        "low_score": warm["low_score"],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "platform": platform.platform(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "note": "absolute times depend on the machine's load; the ratios are measured in one run",
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trace.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "trace_example.json"), "w") as f:
        json.dump(tr.to_json(warm), f)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
