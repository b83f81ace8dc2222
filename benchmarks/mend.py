"""MEND on the embedded model: edit latency, meta-training throughput, and (with --editor) the
CounterFact scores of a trained editor on known cases.

Baselines measured in the same run:
  - edit latency vs one full-model gradient of the edit loss w.r.t. the same 9 weights (what a
    single fine-tuning step costs; MEND replaces it by a truncated backward + the editor),
  - the edit split in two: the MEND computation alone (factors, editor, η·∇̃W for the 9 weights)
    and the whole edit, which also writes a new parameter tree (the stacked MLP kernels of all
    30 blocks are copied, since the unedited model is kept),
  - CounterFact scores vs the unedited model (or, with --eval-json, those of a finished
    `jaxedit eval --json` run are recorded).

    taskset -c 1 uv run python benchmarks/mend.py [--editor DIR] [--eval-json FILE]

Writes benchmarks/results/mend.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxedit as je
from jaxedit.io.checkpoint import load
from jaxedit.methods import mend
from jaxedit.methods.mend import data as md
from jaxedit.methods.mend import editor as ed
from jaxedit.methods.mend import factors as fa
from jaxedit.methods.mend import inputs, losses, method
from jaxedit.methods.mend import state as mstate
from jaxedit.methods.mend import train as mt
from jaxedit.models.sites import get_weight, set_weight
from jaxedit.models.transformer import forward

DATA = Path(__file__).parent.parent.parent / "shared" / "data" / "counterfact"
OUT = Path(__file__).parent / "results" / "mend.json"


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def edit_latency(lm, hp, requests, n: int) -> dict:
    layout = mend.make_layout(lm.config, hp)
    trained = mend.TrainedEditor(
        ed.init_editor(jax.random.key(0), layout, hp), ed.init_norm(layout), layout, hp, 0, {}
    )
    state = method.make_state(lm, trained)

    def edit(reqs):  # the protocol: low-rank deltas, then a new model
        return je.apply(lm, mend.METHOD.compute(lm, state, reqs)[0]).params

    edit([requests[0]])  # compile (one length bucket)
    mend_ms = _timed(lambda i: edit([requests[i % len(requests)]]), n)

    # baseline: the full-model gradient of the same loss w.r.t. the same weights
    tok = lm.tokenizer
    cfg = lm.config

    @jax.jit
    def full_grad(params, tokens, mask, labels):
        x = inputs.labelled(tokens, mask, labels, 8)
        ws = [get_weight(params, s, layer) for s, layer in layout.weights]

        def loss(ws):
            p = params
            for (s, layer), w in zip(layout.weights, ws, strict=True):
                p = set_weight(p, s, layer, w)
            return losses.nll(forward(cfg, p, x.tokens, x.mask, logit_positions=x.pos).logits, x)

        return jax.grad(loss)(ws)

    def encoded(r):
        ids, lab = inputs.encode_pair(tok, r.rewrite_prompt, r.target_new)
        return inputs.pad_pairs(tok, [(ids, lab)], 16)

    enc = [encoded(r) for r in requests]
    full_grad(lm.params, *enc[0])
    grad_ms = _timed(lambda i: full_grad(lm.params, *enc[i % len(enc)]), n)

    # the MEND computation alone: the 9 updates η·∇̃W, no new parameter tree
    @jax.jit
    def deltas(params, editor, norm, tokens, mask, labels):
        x = inputs.labelled(tokens, mask, labels, 8)
        _, f = fa.edit_factors(cfg, params, layout, x)
        grads, _ = ed.pseudo_gradients(editor, norm, layout, f, hp.norm)
        return [editor["edit_lrs"][i] * g for i, g in enumerate(grads)]

    run_d = lambda i: deltas(lm.params, trained.editor, trained.norm, *enc[i % len(enc)])
    run_d(0)
    delta_ms = _timed(run_d, n)
    return {
        "mend_edit_ms_median": round(statistics.median(mend_ms), 2),
        "mend_edit_ms_p90": round(sorted(mend_ms)[int(0.9 * (len(mend_ms) - 1))], 2),
        "mend_updates_only_ms_median": round(statistics.median(delta_ms), 2),
        "full_gradient_ms_median": round(statistics.median(grad_ms), 2),
        "ratio_mend_over_full_gradient": round(
            statistics.median(mend_ms) / statistics.median(grad_ms), 3
        ),
        "n": n,
    }


def train_throughput(lm, hp, n_steps: int) -> dict:
    layout = mend.make_layout(lm.config, hp)
    cases = md.load_cases(DATA / "counterfact-train.json", limit=200)
    data = md.tokenize_cases(lm.tokenizer, cases, hp.max_len, hp.max_target)
    step, _ = mt.jit_steps(lm.config, layout, hp)
    state = mstate.init_state(layout, hp)
    t0 = time.perf_counter()
    state, m = step(lm.params, state, data.take(md.batch_indices(len(data), 0, hp.batch, 0)))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(1, n_steps + 1):
        state, m = step(lm.params, state, data.take(md.batch_indices(len(data), s, hp.batch, 0)))
        jax.block_until_ready(m)
    secs = (time.perf_counter() - t0) / n_steps
    return {
        "batch": hp.batch,
        "rank": hp.rank,
        "max_len": hp.max_len,
        "seconds_per_step": round(secs, 3),
        "steps_per_s": round(1 / secs, 4),
        "edits_per_s": round(hp.batch / secs, 4),
        "first_step_incl_compile_s": round(compile_s, 1),
    }


def counterfact_scores(lm, editor_dir: str, n_eval: int, offset: int = 0) -> dict:
    """Efficacy / paraphrase / neighbourhood scores on the first `n_eval` known cases."""
    from jaxedit.eval import datasets as data_mod
    from jaxedit.eval import report
    from jaxedit.eval import runner as ev
    from jaxedit.eval.measure import is_known, measure

    m = mend.METHOD
    state = m.prepare(lm, m.hparams(lm.name, editor=editor_dir))
    trained = state.trained
    ds = data_mod.load(DATA / "counterfact-edit.json", n=4 * n_eval, offset=offset)
    pre = measure(lm, ds.requests)
    known = [r for r, p in zip(ds.requests, pre, strict=True) if is_known(r, p)][:n_eval]
    res = ev.evaluate(lm, known, m, state, progress=True)
    print(report.table(res))
    keep = ("metrics", "baseline", "seconds", "known_only")
    return {
        "editor": editor_dir,
        "train_step": trained.step,
        "train_config": trained.config.get("hparams"),
        "n": len(known),
        "table": report.table(res),
        **{k: res[k] for k in keep if k in res},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", help="trained editor directory: also score CounterFact")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--train-dir", help="a `jaxedit mend-train` output: record its run")
    ap.add_argument("--train-seconds", type=float, help="wall time of that training run")
    ap.add_argument(
        "--eval-json", action="append", default=[], help="`jaxedit eval` results.json to record"
    )
    ap.add_argument("--n-latency", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()

    lm = load("smollm2-135m")
    hp = mend.METHOD.hparams(lm.name)
    from jaxedit.eval import datasets as data_mod

    requests = data_mod.load(DATA / "counterfact-edit.json", n=40).requests
    result: dict = {}
    result["machine"] = {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "pinned_to_cpus": sorted(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    aff = sorted(os.sched_getaffinity(0))
    result["status"] = "complete" if not args.skip_timing else "timing skipped"
    result["note"] = (
        f"run pinned to CPU(s) {aff} of a {os.cpu_count()}-CPU machine (what else ran: see "
        "load_average_at_start); edit latency = one MEND edit returning a new model (median of "
        "n_latency, compile excluded); updates_only = factors + editor + η∇̃W without "
        "building the new parameter tree"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: OUT.write_text(json.dumps(result, indent=2, default=float))
    if args.train_dir:
        d = Path(args.train_dir)
        log = [json.loads(ln) for ln in (d / "train_log.jsonl").read_text().splitlines() if ln]
        val = [r for r in log if "loss/total_edit_val" in r]
        result["training_run"] = {
            "dir": str(d),
            "hparams": json.loads((d / "config.json").read_text())["hparams"],
            "steps": max(r["step"] for r in log),
            "wall_seconds": args.train_seconds,
            "best_validation": min(val, key=lambda r: r["loss/total_edit_val"]) if val else None,
            "validations": val,
            "last_train": [r for r in log if "loss/total_edit" in r][-1],
        }
        save()
    for path in args.eval_json:
        ev_res = json.loads(Path(path).read_text())
        runs = result.setdefault("counterfact_eval_cli", [])
        runs.append({"file": path, **{k: v for k, v in ev_res.items() if k != "cases"}})
        save()
    if args.editor:  # first: the slowest and most important part
        result["counterfact"] = counterfact_scores(lm, args.editor, args.n_eval)
        print(json.dumps(result["counterfact"], indent=1, default=float)[:3000])
        save()
    if not args.skip_timing:
        result["edit_latency"] = edit_latency(lm, hp, requests, args.n_latency)
        print("edit latency", result["edit_latency"])
        save()
        result["training"] = train_throughput(lm, hp, args.train_steps)
        print("training", result["training"])
        save()


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
