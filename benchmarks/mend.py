"""MEND on the embedded model: edit latency, meta-training throughput, and (with --editor) the
CounterFact scores of a trained editor on known cases.

Baselines measured in the same run:
  - edit latency vs one full-model gradient of the edit loss w.r.t. the same 9 weights (what a
    single fine-tuning step costs; MEND replaces it by a truncated backward + the editor),
  - training step vs the same step without running only the edited blocks (full 30-block
    forward / backward), when --full-baseline is given (slow on CPU),
  - CounterFact scores vs the unedited model.

    uv run python benchmarks/mend.py [--editor DIR] [--n-eval 100]

Writes benchmarks/results/mend.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxedit import mend
from jaxedit import mend_train as mt
from jaxedit.checkpoint import load
from jaxedit.model import forward
from jaxedit.sites import get_weight

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
    trained = mt.TrainedEditor(
        mend.init_editor(jax.random.key(0), layout, hp), mend.init_norm(layout), layout, hp, 0, {}
    )
    edit = mend.make_editor(lm, trained)
    edit(lm, [requests[0]])  # compile (one length bucket)
    mend_ms = _timed(lambda i: edit(lm, [requests[i % len(requests)]]).model.params, n)

    # baseline: the full-model gradient of the same loss w.r.t. the same weights
    tok = lm.tokenizer
    cfg = lm.config

    @jax.jit
    def full_grad(params, tokens, mask, labels):
        x = mend.labelled(tokens, mask, labels, 8)
        ws = [get_weight(params, s, layer) for s, layer in layout.weights]

        def loss(ws):
            p = params
            for (s, layer), w in zip(layout.weights, ws, strict=True):
                p = mend.set_weight(p, s, layer, w)
            return mend.nll(forward(cfg, p, x.tokens, x.mask, logit_positions=x.pos).logits, x)

        return jax.grad(loss)(ws)

    def encoded(r):
        ids, lab = mend.encode_pair(tok, r.rewrite_prompt, r.target_new)
        return mend.pad_pairs(tok, [(ids, lab)], 16)

    enc = [encoded(r) for r in requests]
    full_grad(lm.params, *enc[0])
    grad_ms = _timed(lambda i: full_grad(lm.params, *enc[i % len(enc)]), n)
    return {
        "mend_edit_ms_median": round(statistics.median(mend_ms), 2),
        "full_gradient_ms_median": round(statistics.median(grad_ms), 2),
        "ratio_mend_over_full_gradient": round(
            statistics.median(mend_ms) / statistics.median(grad_ms), 3
        ),
        "n": n,
    }


def train_throughput(lm, hp, n_steps: int) -> dict:
    layout = mend.make_layout(lm.config, hp)
    cases = mt.load_cases(DATA / "counterfact-train.json", limit=200)
    data = mt.tokenize_cases(lm.tokenizer, cases, hp.max_len, hp.max_target)
    step, _ = mt.jit_steps(lm.config, layout, hp)
    state = mt.init_state(layout, hp)
    t0 = time.perf_counter()
    state, m = step(lm.params, state, data.take(mt.batch_indices(len(data), 0, hp.batch, 0)))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(1, n_steps + 1):
        state, m = step(lm.params, state, data.take(mt.batch_indices(len(data), s, hp.batch, 0)))
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
    from jaxedit import data as data_mod
    from jaxedit import evaluate as ev

    trained = mt.load_editor(editor_dir, lm)
    ds = data_mod.load(DATA / "counterfact-edit.json", n=4 * n_eval, offset=offset)
    pre = ev.measure(lm, ds.requests)
    known = [r for r, p in zip(ds.requests, pre, strict=True) if ev._known(r, p)][:n_eval]
    edit = mend.make_editor(lm, trained)
    res = ev.evaluate(lm, known, edit, method="mend", progress=True)
    print(ev.table(res))
    keep = ("metrics", "baseline", "seconds", "known_only")
    return {
        "editor": editor_dir,
        "train_step": trained.step,
        "train_config": trained.config.get("hparams"),
        "n": len(known),
        "table": ev.table(res),
        **{k: res[k] for k in keep if k in res},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", help="trained editor directory: also score CounterFact")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-latency", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()

    lm = load("smollm2-135m")
    hp = mend.hparams_for(lm.config, lm.name)
    from jaxedit import data as data_mod

    requests = data_mod.load(DATA / "counterfact-edit.json", n=40).requests
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result["machine"] = {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: OUT.write_text(json.dumps(result, indent=2, default=float))
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
