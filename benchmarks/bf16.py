"""bf16 params against fp32 on the embedded model: next-token probabilities, causal-trace grids
and ROME edits, one run.

    uv run python benchmarks/bf16.py [--trace-facts 2] [--rome-facts 3] [--samples 3]

The same SmolLM2-135M loaded twice, `dtype="float32"` and `dtype="bfloat16"` (params rounded to
bf16; norms, softmax, logits, key statistics, the v* optimisation and the solves stay fp32 by
the numerics policy). On the built-in facts (`jaxedit.locate.facts`):

- next token: p(true answer's first token) after each rewrite prompt, top-1 agreement, and the
  total variation ½ Σ |p_bf16 − p_fp32| over the vocabulary;
- trace: the causal-trace grids (hidden / mlp / attn, the same seeded noise) of `--trace-facts`
  facts: max |Δ score| relative to the grid's range (high − low), the Pearson correlation of
  the grids, and whether the MLP indirect effect at the last subject token peaks at the same
  layer (what chooses ROME's layer);
- ROME: the preset's layer and hparams, C from the first `--tokens` tokens of the packaged
  WikiText slice computed on each model, the same context templates (sampled once, on fp32):
  ‖ΔC‖/‖C‖, and per edit the rank-one deltas' relative difference, and the edit's outcome
  (`case_metrics`: efficacy, paraphrase and neighbourhood scores and probabilities) of each.

Writes `benchmarks/results/bf16.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import jaxedit as je
from jaxedit import hparams
from jaxedit.eval.measure import case_metrics, measure
from jaxedit.io.atomic import write_text_atomic
from jaxedit.locate import facts
from jaxedit.locate import trace as tr
from jaxedit.methods import rome
from jaxedit.models.generate import next_token_logprobs
from jaxedit.stats.corpora import load_corpus
from jaxedit.stats.second_moment import second_moments

RESULTS = Path(__file__).parent / "results" / "bf16.json"
WIKITEXT = Path(__file__).parent.parent / "jaxedit" / "data" / "wikitext2_test_slice.txt"
OUTCOME = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude")
OUTCOME += ("neighborhood_score", "neighborhood_magnitude", "reliability", "generalization")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def next_tokens(models: dict) -> dict:
    prompts = [f.rewrite_prompt for f in facts.FACTS]
    p = {
        k: np.exp(np.asarray(next_token_logprobs(lm, prompts), np.float64))
        for k, lm in models.items()
    }  # noqa: E501
    a, b = p["fp32"], p["bf16"]
    tok = models["fp32"].tokenizer
    true_ids = [tok.encode(" " + f.target_true.strip())[0] for f in facts.FACTS]
    rows = np.arange(len(prompts))
    return {
        "prompts": len(prompts),
        "top1_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
        "p_true_fp32": np.round(a[rows, true_ids], 4).tolist(),
        "p_true_bf16": np.round(b[rows, true_ids], 4).tolist(),
        "max_abs_diff_p_true": float(np.abs(a[rows, true_ids] - b[rows, true_ids]).max()),
        "total_variation_max": float((0.5 * np.abs(a - b).sum(-1)).max()),
        "total_variation_mean": float((0.5 * np.abs(a - b).sum(-1)).mean()),
    }


def traces(models: dict, n: int, samples: int) -> dict:
    out = []
    for f in facts.FACTS[:n]:
        t = {
            k: tr.trace(lm, f.rewrite_prompt, f.subject, samples=samples, seed=0)
            for k, lm in models.items()
        }
        a, b = t["fp32"], t["bf16"]
        span = a["high_score"] - a["low_score"]
        row = {"subject": f.subject, "high": [a["high_score"], b["high_score"]]}
        row["low"] = [a["low_score"], b["low_score"]]
        last = a["subject_range"][1] - 1  # the last subject token
        for kind in tr.KINDS:
            ga, gb = np.asarray(a["kinds"][kind]["scores"]), np.asarray(b["kinds"][kind]["scores"])
            ok = ~np.isnan(ga)
            row[kind] = {
                "max_abs_diff_over_range": float(np.abs(ga - gb)[ok].max() / span),
                "correlation": float(np.corrcoef(ga[ok], gb[ok])[0, 1]),
                "peak_layer_last_subject_token": [
                    int(np.nanargmax(ga[last])),
                    int(np.nanargmax(gb[last])),
                ],
            }
        out.append(row)
        print(f"trace {f.subject}: {row}", flush=True)
    return {"facts": out, "samples": samples}


def rome_edits(models: dict, n: int, n_tokens: int) -> dict:
    hp = hparams.load("rome", rome.ROMEHparams, "smollm2-135m")
    docs = load_corpus(models["fp32"], str(WIKITEXT), n_tokens=n_tokens, max_len=256).docs
    C = {k: second_moments(lm, (hp.layer,), docs)[0][hp.layer] for k, lm in models.items()}
    templates = rome.make_state(models["fp32"], hp, C["fp32"]).templates
    states = {k: rome.make_state(lm, hp, C[k], templates) for k, lm in models.items()}
    out = []
    for f in facts.FACTS[:n]:
        row: dict = {"subject": f.subject, "target_new": f.target_new}
        deltas = {}
        for k, lm in models.items():
            t0 = time.perf_counter()
            edit, info = rome.compute(lm, states[k], [f])
            edited = je.apply(lm, edit)
            post = measure(edited, [f])[0]
            m = case_metrics(f, post, measure(lm, [f])[0])
            deltas[k] = np.asarray(edit.deltas[0].matrix(), np.float64)
            row[k] = {
                **{name: round(float(m[name]), 4) for name in OUTCOME if name in m},
                # exp(−mean token NLL) of the new answer after the rewrite prompt
                "p_new": round(float(np.exp(-post[("rw", 0, "new")].nll)), 4),
                "v_star_target_prob": round(float(info["target_prob"]), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        row["delta_rel_diff"] = rel(deltas["bf16"], deltas["fp32"])
        row["delta_cosine"] = float(
            (deltas["bf16"] * deltas["fp32"]).sum()
            / np.linalg.norm(deltas["bf16"])
            / np.linalg.norm(deltas["fp32"])
        )
        row["same_outcome"] = all(
            row["fp32"].get(s) == row["bf16"].get(s) for s in OUTCOME if "magnitude" not in s
        )
        out.append(row)
        print(f"rome {f.subject}: {row}", flush=True)
    return {
        "layer": hp.layer,
        "stats_tokens": sum(map(len, docs)),
        "C_rel_diff": rel(C["bf16"], C["fp32"]),
        "templates": len(templates),
        "facts": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace-facts", type=int, default=2)
    ap.add_argument("--rome-facts", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8192, help="statistics tokens (WikiText slice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.time()
    models = {"fp32": je.load("smollm2-135m"), "bf16": je.load("smollm2-135m", dtype="bfloat16")}
    result = {
        "benchmark": "bf16",
        "model": "smollm2-135m",
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "next_token": next_tokens(models),
    }
    print(f"next token: {result['next_token']}", flush=True)
    result["trace"] = traces(models, args.trace_facts, args.samples)
    result["rome"] = rome_edits(models, args.rome_facts, args.tokens)
    result["seconds"] = round(time.time() - t0, 1)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
