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
from pathlib import Path

import jax
import numpy as np
from machine import accelerator, torch_device  # benchmarks/machine.py

from jaxedit import compile_cache
from jaxedit.io.checkpoint import load, save_hf
from jaxedit.locate import trace as tr
from jaxedit.methods.mend.checkpoint import write_json_atomic  # temp file, then os.replace


def torch_loop(lm, ids, subject_range, eps, answer, cells, window) -> dict:
    """The reference procedure in PyTorch: hooks on transformers' Llama modules, one eager
    forward of samples + 1 rows per cell (row 0 clean), full logits."""
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many threads as cores we may use
    device = torch_device()
    with tempfile.TemporaryDirectory() as d:
        save_hf(lm, Path(d) / "m")
        model = AutoModelForCausalLM.from_pretrained(Path(d) / "m", dtype=torch.float32).eval()
    model = model.to(device)
    b, e = subject_range
    S, L = eps.shape[0], lm.config.n_layers
    inp = torch.tensor([ids] * (S + 1), device=device)
    noise = torch.zeros(S + 1, len(ids), lm.config.d_model)
    noise[1:, b:e] = torch.from_numpy(eps[:, b:e])
    noise = noise.to(device)
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
            out[(kind, t, layer)] = float(probs.mean())  # float() waits for the device
            for h in hooks:
                h.remove()
            times.append(time.perf_counter() - t0)
    return out, times


# ----------------------------------------------------------------------------- AtP vs exact


def _exact_cached(lm, fact, path, kw) -> dict:
    """The exact grid of one fact (every row), from `path` when an earlier run wrote it.
    {"skipped": ...} for a fact the model gets wrong. Times exclude compilation."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with compile_cache.CompileClock() as clock:
        r = tr.trace(lm, fact["prompt"], fact["subject"], expect=fact["expect"], **kw)
    out = {"skipped": "wrong clean prediction"} if r is None else tr.to_json(r)
    out["timing"] = clock.as_dict()
    write_json_atomic(Path(path), out)
    return out


TOP_K = (3, 5)  # AtP's top cells of the last subject token's row that `verify_top` would re-run


def _grid_agreement(ex: dict, est: dict, name: str = "atp") -> dict:
    """Per kind: how far grid `est` agrees with the exact grid `ex` (both trace.json objects) on
    the rows from the first subject token on (rows before it are low_score in both, ties that
    say nothing): Spearman over all those cells, over the noised (subject) rows and over the
    rows after them; the argmax layer at the last subject token in both; and whether the exact
    argmax is among `est`'s top K layers of that row (re-running those K cells exactly, as
    `verify_top` does, then finds it)."""
    from scipy.stats import spearmanr

    b, e = ex["subject_range"]
    n_subj = e - b
    out = {}
    for kind in tr.KINDS:
        a = np.asarray(ex["kinds"][kind]["scores"], np.float64)[b:]
        g = np.asarray(est["kinds"][kind]["scores"], np.float64)[b:]
        exact_argmax = int(np.argmax(a[n_subj - 1]))
        out[kind] = {
            "spearman": float(spearmanr(a.ravel(), g.ravel()).statistic),
            "spearman_subject_rows": float(
                spearmanr(a[:n_subj].ravel(), g[:n_subj].ravel()).statistic
            ),
            "spearman_after_subject": float(
                spearmanr(a[n_subj:].ravel(), g[n_subj:].ravel()).statistic
            ),
            "argmax_exact": exact_argmax,
            f"argmax_{name}": int(np.argmax(g[n_subj - 1])),
            **{
                f"exact_argmax_in_top{k}": bool(exact_argmax in np.argsort(-g[n_subj - 1])[:k])
                for k in TOP_K
            },
        }
    return out


def _per_kind_summary(rows: list[dict], name: str = "atp") -> dict:
    """Means over facts of `_grid_agreement`'s per-kind numbers."""
    if not rows:
        return {}

    def mean(kind, f):
        return float(np.mean([f(r[kind]) for r in rows]))

    return {
        kind: {
            "mean_spearman": mean(kind, lambda x: x["spearman"]),
            "median_spearman": float(np.median([r[kind]["spearman"] for r in rows])),
            "mean_spearman_subject_rows": mean(kind, lambda x: x["spearman_subject_rows"]),
            "mean_spearman_after_subject": mean(kind, lambda x: x["spearman_after_subject"]),
            "argmax_agreement_last_subject_token": mean(
                kind, lambda x: x["argmax_exact"] == x[f"argmax_{name}"]
            ),
            "argmax_within_1_layer": mean(
                kind, lambda x: abs(x["argmax_exact"] - x[f"argmax_{name}"]) < 2
            ),
            **{
                f"exact_argmax_in_top{k}": mean(kind, lambda x, k=k: x[f"exact_argmax_in_top{k}"])
                for k in TOP_K
            },
        }
        for kind in tr.KINDS
    }


def compare_atp(lm, facts, n, cache_dir, kw, log=print, atp_kw=None, cached_only=False) -> dict:
    """Exact grid vs AtP on the first `n` facts the model predicts correctly: Spearman rank
    correlation over the cells from the first subject token on (rows before it are low_score
    in both, ties that say nothing), argmax layer at the last subject token, run seconds
    (compile excluded, `CompileClock`). `atp_kw`: extra `atp_trace` options (e.g. ig_steps);
    `cached_only`: use only the facts whose exact grid is already cached (no new grids)."""
    from jaxedit.locate import atp

    os.makedirs(cache_dir, exist_ok=True)
    rows, checked = [], 0
    for i, fact in enumerate(facts):
        if len(rows) >= n:
            break
        path = os.path.join(cache_dir, f"exact-{i:04d}.json")
        if cached_only and not os.path.exists(path):
            continue
        checked += 1
        ex = _exact_cached(lm, fact, os.path.join(cache_dir, f"exact-{i:04d}.json"), kw)
        if "skipped" in ex:
            continue
        log(f"fact {i}: exact grid ready ({ex['timing']['run_s']:.0f} s run)")
        with compile_cache.CompileClock() as first:
            est = atp.atp_trace(lm, fact["prompt"], fact["subject"], **kw, **(atp_kw or {}))
        with compile_cache.CompileClock() as clock:  # compiled now: the run alone
            est = atp.atp_trace(lm, fact["prompt"], fact["subject"], **kw, **(atp_kw or {}))
        t = ex["timing"]
        row = {
            "index": i,
            "prompt": fact["prompt"],
            "subject": fact["subject"],
            "tokens": len(ex["tokens"]),
            # CPU seconds (all threads) of the run without compilation: on a shared core the
            # work done, whatever else ran; the exact grid's share of its CPU time pro rata.
            "exact_cpu_s": t["cpu_s"] * t["run_s"] / t["wall_s"] if "cpu_s" in t else None,
            "exact_run_s": t["run_s"],
            "exact_compile_s": t["compile_s"] + t["trace_s"],
            "atp_cpu_s": clock.cpu_s,
            "atp_run_s": clock.run_s,
            "atp_compile_s": first.compile_s + first.trace_s,
        }
        row.update(_grid_agreement(ex, est))
        rows.append(row)
        log(
            f"fact {i} ({len(rows)}/{n}) {fact['subject']!r}: "
            + ", ".join(
                f"{k} rho {row[k]['spearman']:.2f} argmax {row[k]['argmax_exact']}/"
                f"{row[k]['argmax_atp']}"
                for k in tr.KINDS
            )
            + f"; CPU s exact {row['exact_cpu_s'] or float('nan'):.1f}, atp {row['atp_cpu_s']:.2f}"
        )
    timed = [r for r in rows if r["exact_cpu_s"] is not None]  # early caches lack CPU time
    exact_s = np.asarray([r["exact_cpu_s"] for r in timed])
    atp_s = np.asarray([r["atp_cpu_s"] for r in timed])
    exact_w = np.asarray([r["exact_run_s"] for r in rows])
    atp_w = np.asarray([r["atp_run_s"] for r in rows])
    out = {
        "n_facts": len(rows),
        "facts_checked": checked,
        "settings": {k: v for k, v in kw.items() if k != "kinds"},
        "atp_options": dict(atp_kw or {}),
        "cells": "rows from the first subject token on, every layer",
        "per_kind": _per_kind_summary(rows),
        "n_facts_timed": len(timed),
        "exact_cpu_s_per_fact_mean": float(exact_s.mean()) if timed else None,
        "atp_cpu_s_per_fact_mean": float(atp_s.mean()) if timed else None,
        "speedup_per_fact_median": float(np.median(exact_s / atp_s)) if timed else None,
        "speedup_total": float(exact_s.sum() / atp_s.sum()) if timed else None,
        "speedup_wall_total": float(exact_w.sum() / atp_w.sum()) if rows else None,
        "timing": "CPU seconds of the process (all threads, pinned to one core), compile "
        "excluded: AtP timed on a second call, the exact grid's CPU time scaled by its share "
        "of wall time outside compilation; wall-clock ratios also given (shared machine)",
        "facts": rows,
    }
    return out


def _mean_grid(a: dict, b: dict) -> dict:
    """The grid of two runs' samples together: the mean of two equal-sized runs' scores."""
    return {
        **a,
        "kinds": {
            k: {"scores": (np.asarray(a["kinds"][k]["scores"]) + b["kinds"][k]["scores"]) / 2}
            for k in a["kinds"]
        },
    }


def compare_seeds(lm, facts, n, cache_dir, kw, seed, log=print) -> dict:
    """The exact grid against itself under other noise draws (`seed`), on the first `n` facts
    whose seed-0 grid is cached in `cache_dir`: the same agreement numbers as `compare_atp`.
    It measures how far the grid's cell ranks and its argmax at the last subject token are
    fixed by the fact rather than by the noise sample: the agreement an estimator of one
    seed's grid could show with a re-run under another. Beside it, on the same facts: AtP
    against the exact grid with one seed's samples and with both seeds' (twice the samples),
    which shows whether more samples bring the two closer."""
    from jaxedit.locate import atp

    rows = []
    for i, fact in enumerate(facts):
        if len(rows) >= n:
            break
        path = os.path.join(cache_dir, f"exact-{i:04d}.json")
        if not os.path.exists(path):
            continue
        ex = _exact_cached(lm, fact, path, kw)
        if "skipped" in ex:
            continue
        kw_s = {**kw, "seed": seed}
        other = _exact_cached(
            lm, fact, os.path.join(cache_dir, f"exact-seed{seed}-{i:04d}.json"), kw_s
        )
        est = atp.atp_trace(lm, fact["prompt"], fact["subject"], **kw)
        est_s = atp.atp_trace(lm, fact["prompt"], fact["subject"], **kw_s)
        row = {
            "index": i,
            "subject": fact["subject"],
            "exact_vs_reseeded": _grid_agreement(ex, other, "reseeded"),
            "atp_vs_exact": _grid_agreement(ex, est),
            "atp_vs_exact_both_seeds": _grid_agreement(
                _mean_grid(ex, other), _mean_grid(est, est_s)
            ),
        }
        rows.append(row)
        log(
            f"fact {i} ({len(rows)}/{n}) seed 0 vs {seed}: "
            + ", ".join(
                f"{k} rho {row['exact_vs_reseeded'][k]['spearman']:.2f} (AtP "
                f"{row['atp_vs_exact'][k]['spearman']:.2f}, both seeds "
                f"{row['atp_vs_exact_both_seeds'][k]['spearman']:.2f})"
                for k in tr.KINDS
            )
        )

    def summary(key, name="atp"):
        return _per_kind_summary([r[key] for r in rows], name)

    return {
        "n_facts": len(rows),
        "seeds": [0, seed],
        "settings": {k: v for k, v in kw.items() if k not in ("kinds", "seed")},
        "cells": "rows from the first subject token on, every layer",
        "per_kind": summary("exact_vs_reseeded", "reseeded"),
        "atp_vs_exact_same_facts": summary("atp_vs_exact"),
        "atp_vs_exact_both_seeds": summary("atp_vs_exact_both_seeds"),
        "facts": rows,
    }


def _merge_json(path: str, key: str, value) -> None:
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    write_json_atomic(Path(path), data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    p.add_argument("--subject", default="The Eiffel Tower")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--baseline-cells", type=int, default=15)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument(
        "--atp-facts",
        type=int,
        default=0,
        help="instead of the one-fact benchmark: AtP vs the exact grid on the first N known "
        "facts the model gets right (exact grids cached in --atp-cache, resumable); the result "
        "goes into trace.json under 'atp_vs_exact'",
    )
    p.add_argument("--atp-data", default="/work/shared/data/counterfact/known_1000.json")
    p.add_argument("--atp-cache", default="runs/trace_atp")
    p.add_argument("--atp-log", help="append the per-fact lines to this file too")
    p.add_argument("--atp-ig-steps", type=int, default=1, help="AtP's ig_steps (1: plain AtP)")
    p.add_argument(
        "--atp-key",
        default="atp_vs_exact",
        help="the key of trace.json the comparison is written under",
    )
    p.add_argument(
        "--reseed",
        type=int,
        default=0,
        help="with --atp-facts N: the exact grid under noise seed RESEED against the cached "
        "seed-0 grids of the first N facts, and AtP against both seeds' grids (key "
        "'exact_vs_exact_reseeded')",
    )
    p.add_argument(
        "--atp-cached-only",
        action="store_true",
        help="compare on the facts whose exact grid is already in --atp-cache only",
    )
    args = p.parse_args()
    compile_cache.enable()

    if args.atp_facts:
        lm = load(args.model)
        kw = dict(samples=args.samples, kinds=tr.KINDS, noise="3s", window=10, seed=0)
        facts = tr.load_facts(args.atp_data)
        log_file = open(args.atp_log, "a", buffering=1) if args.atp_log else None

        def log(line):
            print(line, flush=True)
            if log_file:
                log_file.write(line + "\n")

        if args.reseed:
            result = compare_seeds(
                lm, facts, args.atp_facts, args.atp_cache, kw, args.reseed, log=log
            )
            result.update(model=lm.name, data=os.path.basename(args.atp_data))
            os.makedirs(args.out, exist_ok=True)
            _merge_json(os.path.join(args.out, "trace.json"), "exact_vs_exact_reseeded", result)
            print(json.dumps({k: v for k, v in result.items() if k != "facts"}, indent=1))
            return
        atp_kw = {"ig_steps": args.atp_ig_steps}
        result = compare_atp(
            lm, facts, args.atp_facts, args.atp_cache, kw, log=log, atp_kw=atp_kw,
            cached_only=args.atp_cached_only,
        )  # fmt: skip
        result.update(
            model=lm.name,
            data=os.path.basename(args.atp_data),
            cpu_affinity=sorted(os.sched_getaffinity(0)),
            load_avg_1min_at_end=os.getloadavg()[0],
        )
        os.makedirs(args.out, exist_ok=True)
        _merge_json(os.path.join(args.out, "trace.json"), args.atp_key, result)
        print(json.dumps({k: v for k, v in result.items() if k != "facts"}, indent=1))
        return

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
    # Compile: one cell of each kind (each kind patches another site: its own program).
    first_of_kind = [next(c for c in cells if c[0] == kind) for kind in tr.KINDS]
    t = time.perf_counter()
    tr.trace_loop(lm, args.prompt, args.subject, cells=first_of_kind, **loop)
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
            "device": str(torch_device()),
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
        **accelerator(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "platform": platform.platform(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "note": "absolute times depend on the machine's load; the ratios are measured in one run",
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "trace.json")
    if os.path.exists(path):  # keep the AtP comparison (a separate, longer run)
        with open(path) as f:
            previous = json.load(f)
        for key, value in previous.items():
            if key.startswith(("atp_vs_exact", "exact_vs_exact")):
                result[key] = value
    write_json_atomic(Path(path), result)
    with open(os.path.join(args.out, "trace_example.json"), "w") as f:
        json.dump(tr.to_json(warm), f)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
