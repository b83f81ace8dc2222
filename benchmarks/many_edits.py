"""Many edits in one run: MEMIT's one solve and AlphaEdit's rounds vs ROME one edit at a time,
and MEMIT's z optimised for a batch of requests at once vs one request at a time.

Same process, same machine, same embedded model (SmolLM2-135M, fp32), the same N CounterFact
requests (the first N records of `--data`), each method with its smollm2-135m preset:

- memit     : ONE `compute` over all N requests (z's in vmapped lanes, one solve per layer);
- alphaedit : rounds of `--round-size` requests through `step` (lifelong editing), each round
              on the model the earlier rounds edited;
- rome      : the N requests one by one, each `compute` on the model edited so far (ROME's
              sequential editing: N rank-one updates);
- z         : the first `--z-n` requests' z (MEMIT's settings: site "resid", the last of the
              preset's layers, the MEMIT state's templates) by `target_opt.target_values(...,
              lanes=z_lanes)` vs a loop of `target_opt.target_value`; each path runs twice, the
              second (warm, compiled) run is the one compared; the z's of both must agree.

`prepare` (key statistics from the cache, context templates) runs once per method before any
timing and is reported on its own: the statistics are cached (`--cache-dir`, default
`jaxedit.stats.default_cache_dir()`), so only a first run on a machine computes them. Edit times
include applying the edit (`jaxedit.apply`) and every XLA compile the edits need (one run of a
user's edits pays them too; ROME's first edit is reported apart). After each method its edited
model's efficacy on the N rewrites is scored (ES: p(target_new) > p(target_true), CounterFact;
`--no-score` skips it) so that the times are of edits that work.

Reported: seconds, seconds per edit, z steps mean, the ratios (speedups: the reference's seconds
/ ours) MEMIT-batch vs ROME-one-by-one, AlphaEdit vs ROME, batched vs looped z, and the machine
(CPU model, avx2 / avx512f, cores, the CPUs this process may use, load averages). Results are
written after every stage (status says how far it got), and during ROME's edits every 5 % of them
(`"partial": true` until the last), so a run stopped by a time limit keeps what it measured.

    uv run python benchmarks/many_edits.py                       # N = 100, rounds of 10
    uv run python benchmarks/many_edits.py --n 1000 --round-size 100 \\
        --out benchmarks/results/many_edits_n1000.json
    uv run python benchmarks/many_edits.py --n 4 --round-size 2 --z-n 4 \\
        --set v_num_grad_steps=3 --out /tmp/many_edits_smoke.json   # a smoke test

MEMIT's and AlphaEdit's file cache of z's is off here (`cache_z=False`: a z read back from a
file is no z computed, and MEMIT's z's would serve AlphaEdit's first round); `--set
cache_z=true` turns it on. `--set key=value` overrides a field of every method that has it
(`--set rome.layer=5`: one method's); `--only memit,z` runs some stages, always in the order
memit, alphaedit, z, rome (the longest last). Runs of fewer than 100
edits are smoke tests: they need an explicit `--out`, so they never replace
benchmarks/results/many_edits.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine  # benchmarks/machine.py, beside this script

import jaxedit as je
from jaxedit import hparams as hparams_lib
from jaxedit.eval import datasets
from jaxedit.eval.scoring import score_targets
from jaxedit.io.atomic import write_bytes_atomic
from jaxedit.io.checkpoint import load
from jaxedit.methods.common import spread, target_opt

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "many_edits.json"
DATA = HERE.parent.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
MODEL = "smollm2-135m"
METHODS = ("memit", "alphaedit", "rome")
STAGES = (*METHODS, "z")
ORDER = ("memit", "alphaedit", "z", "rome")  # ROME one by one, the longest, last
SMOKE_BELOW = 100  # fewer edits than this is a smoke test, never the committed result


def log(msg: str) -> None:
    print(f"[many_edits {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def method_overrides(assignments: list[str]) -> dict[str, dict]:
    """`--set k=v` (every method with field k) and `--set method.k=v` (that method only),
    typed by each method's hparams fields; a key no method has is refused."""
    out: dict[str, list[str]] = {m: [] for m in METHODS}
    for item in assignments:
        key = item.partition("=")[0].strip()
        scope, dot, field = key.partition(".")
        if dot:
            if scope not in METHODS:
                raise SystemExit(f"--set {item}: {scope!r} is not one of {METHODS}")
            out[scope].append(f"{field}={item.partition('=')[2]}")
            continue
        takers = [m for m in METHODS if key in _fields(m)]
        if not takers:
            raise SystemExit(f"--set {item}: no method among {METHODS} has the field {key!r}")
        for m in takers:
            out[m].append(item)
    return {
        m: hparams_lib.parse_assignments(je.methods.get(m).hparams_cls, items)
        for m, items in out.items()
    }


def _fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(je.methods.get(name).hparams_cls)}


def efficacy(lm, requests) -> float:
    """CounterFact efficacy score: the share of rewrites with p(target_new) > p(target_true)
    (teacher-forced, exp of the mean token log-prob; `jaxedit.eval.scoring`)."""
    prompts = [r.rewrite_prompt for r in requests]
    s = score_targets(
        lm, prompts + prompts, [r.target_new for r in requests] + [r.target_true for r in requests]
    )
    p = s.prob
    n = len(requests)
    return float(np.mean(p[:n] > p[n:]))


def per_edit(seconds: float, n: int) -> float:
    return round(seconds / n, 4)


def run_memit(m, lm, state, reqs, score: bool) -> dict:
    log(f"memit: one compute over {len(reqs)} requests ...")
    t0 = time.perf_counter()
    edit, info = m.compute(lm, state, reqs)
    edited = je.apply(lm, edit)
    secs = time.perf_counter() - t0
    log(f"memit: {secs:.1f} s (z {info['z_seconds']} s), z steps mean {info['z_steps_mean']:.2f}")
    out = {
        "edits": len(reqs),
        "calls": 1,
        "seconds": round(secs, 3),
        "seconds_per_edit": per_edit(secs, len(reqs)),
        "z_seconds": info["z_seconds"],
        "layers_seconds": round(secs - info["z_seconds"], 3),  # keys, solves, apply
        "z_steps_mean": info["z_steps_mean"],
        "z_target_prob_mean": info["z_target_prob_mean"],
        "update_norm": info["norm"],
    }
    if score:
        out["efficacy"] = efficacy(edited, reqs)
        log(f"memit: efficacy {out['efficacy']:.3f}")
    return out


def run_alphaedit(m, lm, state, reqs, round_size: int, score: bool) -> dict:
    n_rounds = math.ceil(len(reqs) / round_size)
    log(f"alphaedit: {n_rounds} rounds of {round_size} through step ...")
    rounds, steps = [], []
    t0 = time.perf_counter()
    for k in range(n_rounds):
        chunk = reqs[k * round_size : (k + 1) * round_size]
        r0 = time.perf_counter()
        edit, info, state = m.step(lm, state, chunk)
        lm = je.apply(lm, edit)
        rounds.append(round(time.perf_counter() - r0, 3))
        steps += [info["z_steps_mean"]] * len(chunk)
        log(f"alphaedit: round {k + 1}/{n_rounds}: {rounds[-1]:.1f} s")
    secs = time.perf_counter() - t0
    out = {
        "edits": len(reqs),
        "round_size": round_size,
        "rounds": n_rounds,
        "seconds": round(secs, 3),
        "seconds_per_edit": per_edit(secs, len(reqs)),
        "round_seconds": rounds,
        "z_steps_mean": float(np.mean(steps)),
        "state_edits": state.edits,
    }
    if score:
        out["efficacy"] = efficacy(lm, reqs)
        log(f"alphaedit: efficacy {out['efficacy']:.3f}")
    return out


def run_rome(m, lm, state, reqs, score: bool, on_progress=None) -> dict:
    """`on_progress(partial)` (if given) receives the figures so far every 5 % of the edits, so
    that a run stopped by a time limit still reports how many edits took how long."""
    n = len(reqs)
    log(f"rome: {n} edits one by one, each on the model edited so far ...")
    times, steps = [], []
    every = max(1, n // 20)

    def figures(done: int) -> dict:
        secs = sum(times)
        return {
            "edits": done,
            "calls": done,
            "seconds": round(secs, 3),
            "seconds_per_edit": per_edit(secs, done),
            "first_edit_seconds": round(times[0], 3),
            "median_edit_seconds": round(statistics.median(times), 3),
            "v_steps_mean": float(np.mean(steps)),
        }

    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        e0 = time.perf_counter()
        edit, info = m.compute(lm, state, [r])
        lm = je.apply(lm, edit)
        times.append(time.perf_counter() - e0)
        steps.append(info["steps"])
        if (i + 1) % every == 0 or i + 1 == n:
            done = time.perf_counter() - t0
            log(f"rome: {i + 1}/{n} edits, {done:.0f} s, eta {done / (i + 1) * (n - i - 1):.0f} s")
            if on_progress is not None and i + 1 < n:
                on_progress({**figures(i + 1), "partial": True})
    out = figures(n)
    if score:
        out["efficacy"] = efficacy(lm, reqs)
        log(f"rome: efficacy {out['efficacy']:.3f}")
    return out


def run_z(lm, state, reqs) -> dict:
    """z of the same requests: vmapped lanes vs a loop of single requests, MEMIT's settings."""
    hp = state.hp
    args = (lm, "resid", hp.layers[-1])
    settings, kl = hp.target_settings(), (hp.kl_prompt,)

    def batched():
        tps = state.templates
        return target_opt.target_values(*args, reqs, tps, settings, kl, lanes=hp.z_lanes)

    def looped():
        return [target_opt.target_value(*args, r, state.templates, settings, kl) for r in reqs]

    out: dict = {"requests": len(reqs), "lanes": hp.z_lanes, "layer": hp.layers[-1]}
    res = {}
    for name, fn in (("batched", batched), ("looped", looped)):
        for run in ("first", "warm"):  # first: with the compiles; warm: the one compared
            log(f"z: {name} over {len(reqs)} requests ({run} run) ...")
            t0 = time.perf_counter()
            res[name] = fn()
            out[f"{name}_{run}_seconds"] = round(time.perf_counter() - t0, 3)
            log(f"z: {name} {run}: {out[f'{name}_{run}_seconds']:.1f} s")
    b, lp = res["batched"], res["looped"]
    out["steps_mean_batched"] = float(np.mean([t.steps for t in b]))
    out["steps_mean_looped"] = float(np.mean([t.steps for t in lp]))
    diff = lambda x, y: np.linalg.norm(x.v_star - y.v_star) / np.linalg.norm(y.v_star)
    rel = [diff(x, y) for x, y in zip(b, lp, strict=True)]
    out["max_rel_diff_z"] = float(max(rel))
    out["speedup_batched_vs_looped"] = round(
        out["looped_warm_seconds"] / out["batched_warm_seconds"], 3
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="CounterFact (EasyEdit's form)")
    ap.add_argument("--n", type=int, default=100, help="edits (the first N records)")
    ap.add_argument("--round-size", type=int, default=None, help="AlphaEdit round (default N/10)")
    ap.add_argument("--z-n", type=int, default=16, help="requests of the batched-vs-looped z")
    ap.add_argument("--cache-dir", default=None, help="statistics cache (default: jaxedit's)")
    ap.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE")
    ap.add_argument("--only", default=",".join(STAGES), help=f"stages among {STAGES}")
    ap.add_argument("--no-score", action="store_true", help="skip the efficacy scores")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS})")
    a = ap.parse_args()
    stages = [s.strip() for s in a.only.split(",") if s.strip()]
    if not stages or set(stages) - set(STAGES):
        ap.error(f"--only: choose among {STAGES}")
    stages = [s for s in ORDER if s in stages]  # the order they run in
    if a.n < 1 or a.z_n < 1:
        ap.error("--n and --z-n must be >= 1")
    round_size = a.round_size or max(1, math.ceil(a.n / 10))
    if round_size < 1:
        ap.error("--round-size must be >= 1")
    if a.out is None:
        if a.n < SMOKE_BELOW:
            ap.error(f"--n {a.n} < {SMOKE_BELOW} is a smoke test: give --out (e.g. /tmp/x.json)")
        a.out = RESULTS
    overrides = method_overrides(a.set)

    result: dict = {
        "benchmark": "many edits in one run",
        "model": MODEL,
        "data": str(a.data),
        "n": a.n,
        "status": "started",
        "machine": machine(),
        "settings": {
            "round_size": round_size,
            "z_n": a.z_n,
            "overrides": {m: o for m, o in overrides.items() if o},
            "stages": stages,
        },
        "notes": (
            "seconds = wall clock in this process (ROME's: the sum of its edits' wall times), "
            "prepare (statistics from the cache, templates) excluded and reported under prepare; "
            "edit seconds include jaxedit.apply and XLA compiles; speedups = reference seconds / "
            "ours"
        ),
    }
    out_path = a.out

    def save(status: str) -> None:
        result["status"] = status
        result["machine"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        write_bytes_atomic(out_path, (json.dumps(result, indent=2) + "\n").encode())

    log(f"loading {MODEL} and {a.n} requests from {a.data} ...")
    lm = load(MODEL)
    reqs = datasets.load(a.data, n=a.n).requests
    if len(reqs) < a.n:
        raise SystemExit(f"{a.data}: only {len(reqs)} requests")
    spread.check_requests(reqs)  # refuse conflicting requests before hours of work
    if not a.no_score and any(r.target_true is None for r in reqs):
        raise SystemExit("efficacy needs target_true in every request (or --no-score)")

    # prepare once per method, before any timing (statistics cached beforehand)
    need = {m for m in METHODS if m in stages} | ({"memit"} if "z" in stages else set())
    methods, states = {}, {}
    result["prepare"] = {}
    for name in METHODS:
        if name not in need:
            continue
        m = je.methods.get(name)
        # A z read back from MEMIT's file cache is no z computed: the cache is off unless asked.
        defaults = {"cache_z": False} if "cache_z" in _fields(name) else {}
        hp = m.hparams(MODEL, **{**defaults, **overrides[name]})
        log(f"{name}: prepare ...")
        t0 = time.perf_counter()
        states[name] = m.prepare(lm, hp, cache_dir=a.cache_dir, progress=True)
        secs = time.perf_counter() - t0
        base = getattr(states[name], "base", states[name])  # AlphaEdit wraps MEMIT's state
        result["prepare"][name] = {
            "seconds": round(secs, 3),
            "stats_from_cache": base.stats.get("from_cache"),
            "templates": len(base.templates),
            "hparams": dataclasses.asdict(hp),
        }
        methods[name] = m
        cached = result["prepare"][name]["stats_from_cache"]
        log(f"{name}: prepared in {secs:.1f} s (statistics from the cache: {cached})")
    save("prepared")

    if not a.no_score:
        log("unedited efficacy ...")
        result["unedited_efficacy"] = efficacy(lm, reqs)
    if "memit" in stages:
        result["memit"] = run_memit(methods["memit"], lm, states["memit"], reqs, not a.no_score)
        save("memit done")
    if "alphaedit" in stages:
        m, st = methods["alphaedit"], states["alphaedit"]
        result["alphaedit"] = run_alphaedit(m, lm, st, reqs, round_size, not a.no_score)
        save("alphaedit done")
    if "z" in stages:
        result["z"] = run_z(lm, states["memit"], reqs[: a.z_n])
        save("z done")
    if "rome" in stages:  # last: the longest, and its figures are saved as it goes

        def rome_so_far(partial: dict) -> None:
            result["rome"] = partial
            save(f"rome: {partial['edits']} of {a.n} edits")

        m, st = methods["rome"], states["rome"]
        result["rome"] = run_rome(m, lm, st, reqs, not a.no_score, rome_so_far)
        save("rome done")

    ratios = {}  # reference seconds / ours
    for name in ("memit", "alphaedit"):  # ROME one by one is the reference
        if "rome" in result and name in result:
            key = f"{name}{'_batch' if name == 'memit' else ''}_vs_rome_one_by_one"
            ratios[key] = round(result["rome"]["seconds"] / result[name]["seconds"], 3)
    if "z" in result:
        ratios["batched_z_vs_looped_z"] = result["z"]["speedup_batched_vs_looped"]
    result["speedups"] = ratios
    save("complete")
    print(json.dumps(result, indent=2))
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
