"""How much of an unedited fact's key lies in the span of the edited keys, as edits accumulate:
the part of the known-facts loss that no linear update of the MLP can avoid.

Any update that writes new values for the edited keys K_e (kᵀ ΔW = r for each k in K_e) and
is otherwise as small as possible acts on another key k through Π_e k, its projection on
span(K_e): k's output moves by (Π_e k)ᵀ ΔW. So the share ‖Π_e k‖² / ‖k‖² for the keys of facts
nobody edited is the share of them that the edits must touch. Measured two ways: Euclidean
(the minimum-norm update) and whitened by C (MEMIT's and AlphaEdit's minimum-disturbance
update, ΔW ∝ C⁻¹ K ...: the projection in the C⁻¹ inner product). Also for the tokens of the
perplexity text, and the keys' effective dimension (participation ratio (tr S)² / tr(S²)),
which is what N edits are measured against: N / d_eff is the share for random directions.

    uv run python benchmarks/key_overlap.py [--run alphaedit-mpes-wiki-ns1e-2-2000] \\
        [--data ../shared/data/counterfact/counterfact-edit.json --n 2960] \\
        [--out benchmarks/results/many_edits_2000.json]

The edited keys are the run's cases in its order, then the next known cases of the file's first
`--n` records (the same rule as `--known-only`), up to 2,000; the known facts are the 200 that
`jaxedit eval` measures (`run_checkpoints.known_facts`). Keys at the last subject token of the
bare prompt (as the evaluation reads them), unedited model, layers of the alphaedit preset.
Writes the key `key_overlap` into the output file (merged).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import run_checkpoints
from machine import machine

import jaxedit as je
from jaxedit.eval import general, scoring
from jaxedit.methods.common import keys, linalg
from jaxedit.methods.mend.checkpoint import write_json_atomic
from jaxedit.models.transformer import forward

OUT = Path(__file__).parent / "results" / "many_edits_2000.json"
COUNTS = (100, 200, 400, 600, 1000, 1500, 2000)
THRESHOLDS = (2e-2, 1e-2, 5e-3)  # AlphaEdit's null-space thresholds the runs tried
C_RIDGE = 1e-6  # relative to tr(C)/F: C⁻¹ exists on these layers, this only guards rounding


def edit_order(lm, every, ids: list[int], n: int, facts, total: int) -> list:
    """The run's cases (`ids`) in order, then the next known, unused cases of the first n."""
    by_id = {r.case_id: r for r in every}
    order = [by_id[i] for i in ids]
    used, known_prompts = set(ids), {p for p, _ in facts}
    seen = {(r.prompt, r.subject) for r in order}
    rest = [
        r
        for r in every[:n]
        if r.case_id not in used
        and r.rewrite_prompt not in known_prompts
        and r.target_true
        and (r.prompt, r.subject) not in seen
    ]
    true = scoring.score_targets(
        lm, [r.rewrite_prompt for r in rest], [r.target_true for r in rest]
    )
    new = scoring.score_targets(lm, [r.rewrite_prompt for r in rest], [r.target_new for r in rest])
    for r, t, w in zip(rest, true.nll, new.nll, strict=True):
        if len(order) >= total:
            break
        if t < w and (r.prompt, r.subject) not in seen:
            order.append(r)
            seen.add((r.prompt, r.subject))
    return order


def text_keys(lm, layers: tuple[int, ...], ids: list[int], window: int) -> np.ndarray:
    """[L T F]: the keys of every token of `ids`, read in rows of `window` tokens."""
    n = len(ids) // window * window
    tokens = jnp.asarray(np.asarray(ids[:n]).reshape(-1, window))
    out = forward(
        lm.config,
        lm.params,
        tokens,
        jnp.ones_like(tokens, bool),
        capture=("mlp_key",),
        n_layers=max(layers) + 1,
        stop_at="mlp_key",
    )
    k = np.asarray(out.captured["mlp_key"], np.float64)[list(layers)]  # [L B T F]
    return k.reshape(len(layers), n, k.shape[-1])


def span_share(basis: np.ndarray, X: np.ndarray) -> float:
    """Mean over the columns x of X of ‖Π x‖² / ‖x‖², Π the projector on span(basis)."""
    U, s, _ = np.linalg.svd(basis, full_matrices=False)
    Q = U[:, s > s[0] * 1e-8]
    return float(np.mean(np.sum((Q.T @ X) ** 2, axis=0) / np.sum(X * X, axis=0)))


def energy_in(P: np.ndarray, X: np.ndarray) -> float:
    """Σ ‖P x‖² / Σ ‖x‖² over the columns of X (P an orthogonal projector)."""
    return float(np.sum((P @ X) * X) / np.sum(X * X))


def output_change(dW: np.ndarray, X: np.ndarray) -> float:
    """Median over the columns x of X of ‖xᵀ ΔW‖ / ‖x‖: how hard the update hits a key."""
    return float(np.median(np.linalg.norm(X.T @ dW, axis=1) / np.linalg.norm(X, axis=0)))


def effective_dim(X: np.ndarray) -> float:
    """Participation ratio of the columns' second moment: (tr S)² / tr(S²)."""
    ev = np.linalg.eigvalsh(X @ X.T / X.shape[1])
    return float(ev.sum() ** 2 / np.sum(ev**2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="alphaedit-mpes-wiki-ns1e-2-2000", help="case order")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--n", type=int, default=2960)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    t0 = time.time()
    lm = je.load("smollm2-135m")
    m = je.methods.get("alphaedit")
    hp = m.hparams(
        "smollm2-135m",
        mom2_corpus="../shared/data/wikitext/wiki.valid.raw",
        mom2_n_tokens=131072,
    )
    C = m.prepare(lm, hp).base.C
    every, facts, _ = run_checkpoints.known_facts(lm, args.data, args.n)
    edit, run_ids = run_checkpoints.last_edit(args.run)
    dW = {x: np.zeros((lm.config.d_ff, lm.config.d_model)) for x in hp.layers}
    for d in edit.deltas:  # every round's ΔW of a layer, summed
        dW[d.layer] += np.asarray(d.matrix(), np.float64)
    order = edit_order(lm, every, run_ids, args.n, facts, max(COUNTS))
    by_prompt = {r.prompt.format(r.subject): r for r in every}
    known = [by_prompt[p] for p, _ in facts]
    layers = tuple(hp.layers)
    sites = [(r.prompt, r.subject) for r in order + known]
    (k,) = keys.subject_sites(lm, ("mlp_key",), layers, sites, ("{}",))  # [L N 1 F]
    text_ids = lm.tokenizer.encode_continuation(general.default_text())[: general.PPL_WINDOW * 4]
    text = text_keys(lm, layers, text_ids, general.PPL_WINDOW)  # [L T F]
    counts = [c for c in COUNTS if c <= len(order)]
    result = {
        "machine": machine(),
        "case_order": f"{args.run}, then the next known cases of the first {args.n} records",
        "edits_available": len(order),
        "layers": {},
    }
    for y, layer in enumerate(layers):
        Ke = np.asarray(k[y, : len(order), 0], np.float64).T  # [F N]
        Kk = np.asarray(k[y, len(order) :, 0], np.float64).T  # [F 200]
        Kt = np.asarray(text[y], np.float64).T  # [F T]
        Cl = np.asarray(C[layer], np.float64)
        F = Cl.shape[0]
        ev, V = np.linalg.eigh(Cl + C_RIDGE * np.trace(Cl) / F * np.eye(F))
        W = V @ np.diag(ev**-0.5) @ V.T  # C^{-1/2}: the whitening of MEMIT's metric
        rows, n_run = {}, len(run_ids)
        for c in counts:
            rows[c] = {
                "known_facts": span_share(Ke[:, :c], Kk),
                "known_facts_whitened": span_share(W @ Ke[:, :c], W @ Kk),
                "text": span_share(Ke[:, :c], Kt),
                "text_whitened": span_share(W @ Ke[:, :c], W @ Kt),
            }
        result["layers"][layer] = {
            "d_ff": F,
            "effective_dim": {
                "subject_keys": effective_dim(np.concatenate([Ke, Kk], axis=1)),
                "subject_keys_whitened": effective_dim(W @ np.concatenate([Ke, Kk], axis=1)),
                "text_keys": effective_dim(Kt),
            },
            "span_share": rows,
            # range(P) is where AlphaEdit may write: the share of each kind of key inside it
            "energy_in_range_of_P": {
                str(t): {
                    "edited_keys": energy_in(linalg.null_space_projector(Cl, t), Ke),
                    "known_fact_keys": energy_in(linalg.null_space_projector(Cl, t), Kk),
                    "text_keys": energy_in(linalg.null_space_projector(Cl, t), Kt),
                }
                for t in THRESHOLDS
            },
            # the run's accumulated update, on the keys it edited and on the known facts'
            f"output_change_after_{n_run}_edits": {
                "edited_keys": output_change(dW[layer], Ke[:, :n_run]),
                "known_fact_keys": output_change(dW[layer], Kk),
                "text_keys": output_change(dW[layer], Kt),
            },
        }
        print(
            f"layer {layer}: d_eff subject keys "
            f"{result['layers'][layer]['effective_dim']['subject_keys']:.0f} "
            f"(whitened {result['layers'][layer]['effective_dim']['subject_keys_whitened']:.0f})"
            f", text {result['layers'][layer]['effective_dim']['text_keys']:.0f} of {F}",
            flush=True,
        )
        for c, r in rows.items():
            print(
                f"  {c:5d} edits: known facts {r['known_facts']:.3f} (whitened "
                f"{r['known_facts_whitened']:.3f}), text {r['text']:.3f} (whitened "
                f"{r['text_whitened']:.3f})",
                flush=True,
            )
    result["seconds"] = round(time.time() - t0, 1)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out["key_overlap"] = result
    write_json_atomic(args.out, out)
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
