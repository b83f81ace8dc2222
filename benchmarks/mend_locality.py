"""How much locality can an edit of these weights keep at all? An oracle gradient step.

MEND's update is a learned transform of the edit loss's gradient on a few weights. Before
blaming the editor for a low CounterFact neighbourhood score, ask what the *location* allows:
for each known case, take the exact gradient ∇W of the edit loss (NLL of target_new after the
rewrite prompt) on the edited weights and step along it, W − η ∇W / ‖∇W‖, with the smallest
η that makes the edit win on its own prompt (P(new) > P(true), found per case by bisection
on log η: an oracle no editor has). At that step, record the paraphrase and neighbourhood
outcomes (ROME's PS / NS definitions, `jaxedit.eval.scoring`).

Two directions per case:
  raw   the gradient itself (what an identity MEND editor without normalisation applies),
  pre   the gradient preconditioned on the input side by the keys' second moment,
        C⁻¹ ∇W with C = E[u uᵀ] over a corpus (ROME's C⁻¹k*, applied to every token's u).

A direction that still spills onto neighbours at the smallest winning step bounds every
editor that uses it. Default weights: MEND's (gate / up / down of the last three blocks).

    taskset -c 1 uv run python benchmarks/mend_locality.py [--layers 27,28,29]
        [--sites mlp_gate,mlp_up,mlp_out] [--n 40] [--tokens 8192]

Adds one entry per weight set to benchmarks/results/mend_locality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.io.checkpoint import load
from jaxedit.methods import mend
from jaxedit.methods.mend import editor as ed
from jaxedit.methods.mend import factors as fa
from jaxedit.methods.mend import inputs
from jaxedit.models.transformer import forward

SHARED = Path(__file__).parent.parent.parent / "shared" / "data"
OUT = Path(__file__).parent / "results" / "mend_locality.json"
INPUT_SITE = {"mlp_out": "mlp_key", "mlp_up": "mlp_in", "mlp_gate": "mlp_in"}


def key_second_moments(lm, layers, n_tokens: int, doc_len: int = 128) -> dict:
    """C / (tr C / d) + 1e-3 I at `mlp_in` and `mlp_key` of each layer, over wikitext.

    Not `jaxedit.stats`: it streams one layer's `mlp_key` (ROME's C); here one
    forward per document serves both input sites of every analysed layer."""
    fwd = jax.jit(lambda p, t: forward(lm.config, p, t, capture=("mlp_in", "mlp_key")).captured)
    # (params are arguments, never closed over: jit would fold them in as constants)
    lines = (SHARED / "wikitext" / "wiki.valid.raw").read_text().splitlines()
    acc, n = {}, 0
    for line in lines:
        ids = lm.tokenizer.encode(line)[:doc_len]
        if len(ids) < doc_len:
            continue
        cap = fwd(lm.params, jnp.asarray([ids]))
        for site in ("mlp_in", "mlp_key"):
            for layer in layers:
                k = np.asarray(cap[site][layer, 0], np.float64)
                acc[site, layer] = acc.get((site, layer), 0.0) + k.T @ k
        n += doc_len
        if n >= n_tokens:
            break
    out = {}
    for key, a in acc.items():
        c = a / n
        c = c / (np.trace(c) / len(c)) + 1e-3 * np.eye(len(c))  # scale-free, well conditioned
        out[key] = jnp.asarray(np.linalg.inv(c), jnp.float32)
    return out, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="27,28,29")
    ap.add_argument("--sites", default="mlp_gate,mlp_up,mlp_out")
    ap.add_argument("--n", type=int, default=40, help="known cases to analyse")
    ap.add_argument("--tokens", type=int, default=8192, help="corpus tokens for C")
    args = ap.parse_args()

    lm = load()
    cfg, tok = lm.config, lm.tokenizer
    layers = [int(x) for x in args.layers.split(",")]
    sites = args.sites.split(",")
    hp = mend.METHOD.hparams(lm.name).replace(
        weights=tuple((site, layer) for layer in layers for site in sites)
    )
    layout = mend.make_layout(cfg, hp)
    first = fa.first_layer(layout)
    shifted = fa.shift_layout(layout, first)
    cfg_top, top = fa.split_top(cfg, lm.params, first)

    t0 = time.perf_counter()
    c_inv, n_tok = key_second_moments(lm, layers, args.tokens)
    t_stats = time.perf_counter() - t0

    def labelled(pairs, length=32):
        t, m, lab = inputs.pad_pairs(tok, pairs, length)
        return inputs.labelled(jnp.asarray(t), jnp.asarray(m), jnp.asarray(lab), 8)

    @jax.jit
    def gradient(top, x, h0):
        return fa.true_gradients(fa.gradient_factors(cfg_top, top, shifted, x, h0)[1], layout)

    prefix = jax.jit(lambda params, x: fa.prefix_resid(cfg, params, x.tokens, x.mask, first))

    @jax.jit
    def _margins(top, direction, eta, x, h0):
        new = ed.apply_updates(top, shifted, -eta * jnp.ones(len(direction)), direction)
        logits = fa.top_forward(cfg_top, new, x, h0).logits
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), x.target[..., None], -1)[..., 0]
        v = x.valid.astype(jnp.float32)
        nll = (-(lp * v).sum(1) / v.sum(1)).reshape(3, 2)  # prompts × (new, true)
        return nll[:, 1] - nll[:, 0]

    def margins(direction, eta, x, h0):
        """NLL(true) − NLL(new) (> 0: new wins) for (rewrite, paraphrase, neighbour) prompts."""
        return _margins(top, direction, eta, x, h0)

    def smallest_win(direction, x, h0, lo=-3.0, hi=3.0, steps=8):
        """Bisection on log10 η for the first step whose rewrite margin is > 0 (None if none)."""
        won = np.asarray(margins(direction, 10.0**hi, x, h0))
        if won[0] <= 0:
            return None
        for _ in range(steps):
            mid = (lo + hi) / 2
            m = np.asarray(margins(direction, 10.0**mid, x, h0))
            if m[0] > 0:
                hi, won = mid, m
            else:
                lo = mid
        return 10.0**hi, won

    records = json.loads((SHARED / "counterfact" / "counterfact-edit.json").read_text())
    cases = []
    t1 = time.perf_counter()
    for r in records:
        prompts = (r["prompt"], r["rephrase_prompt"], r["locality_prompt"])
        pairs = [
            inputs.encode_pair(tok, p, a)
            for p in prompts
            for a in (r["target_new"], r["ground_truth"])
        ]
        if max(len(p[0]) for p in pairs) > 32:
            continue
        x = labelled(pairs)
        h0 = prefix(lm.params, x)
        # the rewrite row of x (prompt + target_new) is the edit input: reuse its residual
        grad = gradient(top, type(x)(*(a[:1] for a in x)), h0[:1])
        base = np.asarray(margins(grad, 0.0, x, h0))
        if base[0] > 0:  # not known: the unedited model already prefers target_new
            continue
        pre = [
            c_inv[INPUT_SITE[s], layer] @ g
            for (s, layer), g in zip(layout.weights, grad, strict=True)
        ]
        case = {"case_id": r["case_id"], "unedited_ns": float(base[2] < 0)}
        for name, d in (("raw", grad), ("pre", pre)):
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in d))
            hit = smallest_win([g / norm for g in d], x, h0)
            case[name] = (
                None
                if hit is None
                else {"eta": hit[0], "ps": float(hit[1][1] > 0), "ns": float(hit[1][2] < 0)}
            )
        cases.append(case)
        print(json.dumps(case), flush=True)
        if len(cases) >= args.n:
            break

    summary = {}
    for name in ("raw", "pre"):
        ok = [c for c in cases if c[name] is not None]
        summary[name] = {
            "n_success": len(ok),
            "paraphrase_score_at_win": float(np.mean([c[name]["ps"] for c in ok])) if ok else None,
            "neighborhood_score_at_win": float(np.mean([c[name]["ns"] for c in ok]))
            if ok
            else None,
            "unedited_neighborhood_score_same_cases": float(np.mean([c["unedited_ns"] for c in ok]))
            if ok
            else None,
        }
    entry = {
        "weights": [f"{s}.{layer}" for s, layer in layout.weights],
        "n_cases": len(cases),
        "unedited_neighborhood_score": float(np.mean([c["unedited_ns"] for c in cases])),
        "corpus_tokens_for_C": n_tok,
        "seconds": {"stats": round(t_stats, 1), "cases": round(time.perf_counter() - t1, 1)},
        "directions": summary,
        "cases": cases,
    }
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    results["what"] = __doc__.split("\n\n")[0]
    results["data"] = (
        "counterfact-edit.json, first known cases (rewrite prompt); C over wikitext valid"
    )
    results["runs"][",".join(entry["weights"])] = entry
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(OUT)
    print(json.dumps({k: v for k, v in entry.items() if k != "cases"}, indent=2))


if __name__ == "__main__":
    main()
