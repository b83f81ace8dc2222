"""Attribution patching (AtP): the causal-tracing grid from one gradient per noise sample
(Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components", §2; Nanda 2022).

Causal tracing (`jaxedit.locate.trace`) restores one clean activation at a time and re-runs the
corrupted forward: one run per grid cell. AtP replaces each of those runs by the first-order
Taylor expansion of p(answer) around the corrupted run. For noise sample s (the same draws
eps_s as the exact trace) and a site a ("resid" / "mlp_out" / "attn_out") at layer l, token t:

    clean run:      a_clean[l, t]                       (one forward, activations captured)
    corrupted run:  a_s[l, t],  p_s = p_s(answer),  g_s[l, t] = ∂p_s / ∂a[l, t]
                    (one forward + one backward give g_s at every layer x token x site)
    estimate:       Î_s(l, t) = (a_clean[l, t] - a_s[l, t]) · g_s[l, t]
    scores:         hidden[t, l] = mean_s (p_s + Î_s(l, t))                        (site resid)
                    mlp[t, l]    = mean_s (p_s + Σ_{j ∈ window(l)} Î_s(j, t))       (site mlp_out)
                    attn[t, l]   = mean_s (p_s + Σ_{j ∈ window(l)} Î_s(j, t))       (site attn_out)

i.e. the estimated restored probability p_corrupt + Î, in the units of the exact grid
(`trace.json` schema, same plots), window(l) = [l - w//2, l + ceil(w/2)) clipped to [0, L) as
in the exact trace. Rows before the subject are low_score exactly (clean = corrupted there).
The whole grid costs one clean forward and one batched (S rows) forward + backward, against
one resumed forward per cell for the exact grid.

Integrated gradients (`ig_steps=k`, as EAP-IG: Hanna et al. 2024, "Have faith in
faithfulness", §3): the corruption (3 sigma at the subject embeddings) is far from
infinitesimal, and p is nearly saturated at the corrupted point, so ∂p/∂a there says little about
a restoration. The gradient is averaged over k inputs on the straight line from the corrupted
embeddings towards the clean ones (left Riemann sum, so that k = 1 is plain AtP):

    x_s(α) = x_clean + (1 - α) eps_s,   α_j = j / k,   j = 0 .. k-1
    Î_s^IG(l, t) = (a_clean[l, t] - a_s[l, t]) · (1/k) Σ_j ∂p(x_s(α_j)) / ∂a[l, t]

with a_s the corrupted run's activation (α = 0) as before. The k·S rows go through one batched
forward + backward (k times plain AtP's work). On 50 of SmolLM2-135M's known facts the mean
Spearman correlation with the exact grid (hidden / mlp / attn) is 0.75 / 0.60 / 0.63 at k = 1,
0.76 / 0.60 / 0.69 at k = 2 and 0.71 / 0.56 / 0.69 at k = 4 (README,
benchmarks/results/trace.json): a small gain for k times the cost, so k = 1 stays the default.

AtP* corrections (§3 of the paper):
- GradDrop (`graddrop=True`, §3.2): cancellation between a node's direct and indirect paths
  hides real effects. For each layer ℓ the backward pass is repeated with the gradient through
  block ℓ's contribution to the residual stream (its `attn_out` and `mlp_out`) set to zero,
  giving Î_s^ℓ(l, t), and

      Î_s^GD(l, t) = 1 / (L - 1) · Σ_ℓ |Î_s^ℓ(l, t)|

  replaces Î_s (windows sum the per-layer Î^GD). As in the paper this is an unsigned
  magnitude, meant for ranking cells (e.g. with `verify_top`), not a signed probability
  estimate; it costs L backward passes instead of one.
- QK fix (§3.1: recompute the attention softmax exactly when a *query or key* node is patched,
  since a saturated softmax has a near-zero gradient): not applicable here. Causal tracing's
  sites are the residual stream and the attention / MLP module outputs, none of which is a
  query or a key; a restored residual state does reach later keys and queries, but only
  through the downstream computation, which AtP linearises as a whole.

`verify_top=K` re-runs the exact patch (`trace.exact_cells`, the same kernel and noise draws as
the exact grid) on the K highest-scoring cells of each kind.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.locate import trace as tr
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import forward

SITES = ("resid", "mlp_out", "attn_out")
_BLOCK_OUTPUTS = ("attn_out", "mlp_out")  # what GradDrop stops at layer ℓ


@functools.partial(jax.jit, static_argnums=0, static_argnames=("graddrop", "ig_steps"))
def _atp_effects(
    cfg,
    params,
    tokens: Int[Array, "1 T"],
    mask: Bool[Array, "1 T"],
    subj: Bool[Array, " T"],
    eps: Float[Array, "S T D"],
    *,
    graddrop: bool = False,
    ig_steps: int = 1,
):
    """(answer, high_score, low_score, {site: mean_s Î_s [L T]}) for one prompt.

    Î_s as in the module docstring (Î_s^GD with `graddrop`; ∂p/∂a averaged over the `ig_steps`
    interpolated inputs x_s(α_j), α_j = j / k, when k = `ig_steps` > 1)."""
    S, T = eps.shape[0], tokens.shape[1]
    L, D = cfg.n_layers, cfg.d_model
    k = ig_steps
    R = k * S  # rows: sample s at step j is row j * S + s
    clean = forward(
        cfg,
        params,
        tokens,
        mask,
        capture=SITES,
        logit_positions=jnp.full((1, 1), T - 1),
    )
    p_clean = jax.nn.softmax(clean.logits[0, 0])
    answer = jnp.argmax(p_clean)
    tok_r, mask_r = jnp.broadcast_to(tokens, (R, T)), jnp.broadcast_to(mask, (R, T))
    # x_s(α_j) = clean embeddings + (1 - α_j) eps_s: α_0 = 0 is the corrupted run itself.
    scale = 1.0 - jnp.arange(k, dtype=jnp.float32) / k
    eps_r = (scale[:, None, None, None] * eps[None]).reshape(R, T, D)
    noise = SitePatch(jnp.broadcast_to(subj[None], (R, T)), eps_r, jnp.asarray(True))
    every = jnp.ones((L, 1, T), bool)
    last = jnp.full((R, 1), T - 1)

    def p_answer(zeros, frozen=None, drop=None):
        """sum_r p_r(answer) with a zero added at every site (its gradient is ∂p/∂a); with
        `drop` ([L] bool), the block outputs at the dropped layer are replaced by the
        constants `frozen` (same values) so that no gradient passes through them."""
        patch = {"embed": noise}
        for site in SITES:
            value, add = zeros[site], jnp.ones((L,), bool)
            if drop is not None and site in _BLOCK_OUTPUTS:
                held = jnp.where(drop[:, None, None, None], frozen[site], 0.0)
                value, add = value + jax.lax.stop_gradient(held), ~drop
            patch[site] = SitePatch(every, value, add)
        out = forward(cfg, params, tok_r, mask_r, patch=patch, capture=SITES, logit_positions=last)
        p = jax.nn.softmax(out.logits[:, 0])[:, answer]
        return jnp.sum(p), (p, out.captured)

    zeros = {site: jnp.zeros((L, R, T, D), jnp.float32) for site in SITES}
    grads, (p, captured) = jax.grad(p_answer, has_aux=True)(zeros)
    # Δa_s = a_clean - a_s at α = 0 (the corrupted run: rows 0..S-1), the same for every step.
    delta = {site: clean.captured[site] - captured[site][:, :S] for site in SITES}  # [L S T D]

    def estimate(g):  # Î_s(l, t) for every sample, layer and token: [L S T]
        mean_g = {site: g[site].reshape(L, k, S, T, D).mean(1) for site in SITES}
        return {site: jnp.einsum("lstd,lstd->lst", delta[site], mean_g[site]) for site in SITES}

    if not graddrop:
        effects = estimate(grads)
    else:

        def dropped(layer):
            drop = jnp.arange(L) == layer
            g = jax.grad(lambda z: p_answer(z, captured, drop)[0])(zeros)
            return {site: jnp.abs(v) for site, v in estimate(g).items()}

        # One backward per dropped layer, one after another (vmapped, the L saved forwards
        # would not fit in memory for a real model).
        total = jax.lax.map(dropped, jnp.arange(L))
        effects = {site: jnp.sum(v, 0) / (L - 1) for site, v in total.items()}
    return answer, p_clean[answer], p[:S], effects


def window_matrix(n_layers: int, window: int) -> np.ndarray:
    """W [L L] with W[c, j] = 1 when layer j is in the window centred on c (`window_layers`):
    window scores are W @ per-layer estimates."""
    W = np.zeros((n_layers, n_layers), np.float32)
    for c in range(n_layers):
        lo, hi = tr.window_layers(c, window, n_layers)
        W[c, lo:hi] = 1
    return W


def atp_trace(
    lm,
    prompt: str,
    subject: str,
    *,
    kinds: Sequence[str] = tr.KINDS,
    samples: int = 10,
    noise: str | float = "3s",
    window: int = 10,
    seed: int = 0,
    expect: str | None = None,
    graddrop: bool = False,
    verify_top: int = 0,
    ig_steps: int = 1,
) -> dict[str, Any] | None:
    """Attribution-patching trace of one fact: the structure of `trace.trace` (estimated
    restored p(answer) per cell), plus "method": "atp", "graddrop", "ig_steps" and, with
    `verify_top=K`,
    "verified": {kind: [{"token", "layer", "estimate", "exact"}, ...]} for the K
    highest-scoring cells of each kind.

    Arguments are those of `trace.trace`; every row is estimated (no `rows` needed: the whole
    grid costs the same), plus `graddrop` and `verify_top` (AtP*, module docstring) and
    `ig_steps` (k >= 1: the integrated-gradients estimate; 1 is plain AtP). Returns None when
    `expect` is given and the clean top-1 token is not its first token.
    """
    t0 = time.perf_counter()
    kinds = tr.check_options(samples, window, kinds)
    encoded = tr.encode_fact(lm, prompt, subject)
    ids, (b, e) = encoded[0], encoded[1]
    nu = tr.noise_level(noise, lm.params, ids[b:e])
    return trace_encoded(
        lm, prompt, subject, encoded, nu, kinds=kinds, samples=samples, window=window, seed=seed,
        expect=expect, graddrop=graddrop, verify_top=verify_top, ig_steps=ig_steps, t0=t0,
    )  # fmt: skip


def trace_encoded(
    lm,
    prompt: str,
    subject: str,
    encoded,
    nu: float,
    *,
    kinds: Sequence[str] = tr.KINDS,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    expect: str | None = None,
    graddrop: bool = False,
    verify_top: int = 0,
    ig_steps: int = 1,
    t0: float | None = None,
) -> dict[str, Any] | None:
    """`atp_trace` on a prompt already encoded by `trace.encode_fact`, with the noise level
    `nu` given (data-set mode). `rows` is accepted for symmetry with the exact trace and
    ignored: AtP estimates every row at once."""
    del rows
    t0 = time.perf_counter() if t0 is None else t0
    kinds = tr.check_options(samples, window, kinds)
    if verify_top < 0:
        raise InputError(f"verify_top must be >= 0, got {verify_top}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise InputError(f"ig_steps must be an int >= 1, got {ig_steps!r}")
    cfg, params = lm.config, lm.params
    ids, (b, e), T, pad, batch = encoded
    L = cfg.n_layers
    subj, eps = tr.corruption(cfg, T, pad, (b, e), nu, samples, seed)
    answer, high, low, effects = _atp_effects(
        cfg,
        params,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.mask),
        jnp.asarray(subj),
        jnp.asarray(eps),
        graddrop=graddrop,
        ig_steps=ig_steps,
    )
    answer_id = int(answer)
    if expect is not None and not tr.answer_matches(lm.tokenizer, answer_id, expect):
        return None
    p_s = np.asarray(low, np.float64)  # [S]
    low = float(p_s.mean())
    W = window_matrix(L, window)
    scores = {}
    for kind in kinds:
        per_layer = np.asarray(effects[tr.SITE[kind]], np.float64)[:, :, pad:]  # Î_s [L S n]
        est = per_layer.mean(1).T  # mean over samples: [n L]
        if kind != "hidden":
            est = est @ W.T  # a window is the sum of its layers' estimates
        grid = (low + est).astype(np.float32)
        grid[:b] = low  # clean == corrupted before the subject: no effect, exactly
        scores[kind] = grid
    result = {
        "model": lm.name,
        "method": "atp",
        "prompt": prompt,
        "subject": subject,
        "tokens": lm.tokenizer.token_strings(ids),
        "subject_range": [b, e],
        "answer": lm.tokenizer.decode([answer_id]),
        "answer_id": answer_id,
        "high_score": float(high),
        "low_score": low,
        "noise": nu,
        "samples": samples,
        "window": window,
        "graddrop": graddrop,
        "ig_steps": ig_steps,
        "kinds": {k: {"scores": scores[k]} for k in kinds},
    }
    if verify_top:
        result["verified"] = verify(lm, result, verify_top, seed=seed)
    result["seconds"] = time.perf_counter() - t0
    return result


def top_cells(scores: np.ndarray, k: int, first_row: int = 0) -> list[tuple[int, int]]:
    """The k (token, layer) cells with the highest scores at rows >= `first_row`, best first
    (NaN cells never chosen)."""
    grid = np.asarray(scores, np.float64)[first_row:]
    flat = np.where(np.isfinite(grid), grid, -np.inf).ravel()
    k = min(k, int(np.isfinite(grid).sum()))
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i // grid.shape[1]) + first_row, int(i % grid.shape[1])) for i in order]


def verify(lm, result: dict[str, Any], k: int, *, seed: int = 0) -> dict[str, list[dict]]:
    """Exact restored p(answer) (the exact trace's kernel, same noise draws) of the k
    highest-scoring cells of each kind of an AtP `result`."""
    b = result["subject_range"][0]
    cells = [
        (kind, t, layer)
        for kind, v in result["kinds"].items()
        for t, layer in top_cells(v["scores"], k, first_row=b)
    ]
    exact = tr.exact_cells(
        lm, result["prompt"], result["subject"], cells, samples=result["samples"],
        noise=result["noise"], window=result["window"], seed=seed,
    )  # fmt: skip
    out: dict[str, list[dict]] = {kind: [] for kind in result["kinds"]}
    for (kind, t, layer), p in zip(cells, exact, strict=True):
        est = float(result["kinds"][kind]["scores"][t, layer])
        out[kind].append({"token": t, "layer": layer, "estimate": est, "exact": float(p)})
    return out


tr.TRACERS["atp"] = trace_encoded
