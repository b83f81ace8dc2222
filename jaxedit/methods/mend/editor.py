"""MEND's editor network: pseudo-gradients from gradient factors (Mitchell et al., ICLR 2022).

A small editor network g (one per distinct weight shape, shared by the layers of that shape,
told apart by a learned per-layer scale and shift, "mode") maps each normalised factor pair
(`jaxedit.methods.mend.factors`) to a pseudo-factor pair, and the edit is

    (ũ_t, δ̃_t) = g_l( concat(û_t, δ̂_t) ),   û = (u - μ_u) / (σ_u + 1e-7),  δ̂ likewise   (combine)
    ∇̃_W = Σ_t ũ_t δ̃_tᵀ                                                      (pseudo-gradient)
    W̃ = W + η_l · ∇̃_W                                                        (η_l learned per layer)

g is the paper's IDMLP: n_hidden + 1 residual low-rank layers, each
`h ← h + clamp((U (V h) + b) · s_l + c_l, min=0)` with U = 0 at initialisation, so g starts as the
identity and ∇̃_W = ∇_W when normalisation is off. μ, σ are running statistics of u and δ over
every training token (Welford / Chan's parallel update), kept as explicit state.

The editor and the normaliser are plain pytrees:
    editor = {"edit_lrs": η [W], "nets": {group: [{"u", "v", "bias", "mode_scale", "mode_shift"}]}}
    norm   = {group: {"k", "u_mean", "u_m2", "d_mean", "d_m2"}}

Reference read: eric-mitchell/mend `algs/mend.py` (`GradientTransform`, `MEND.edit`,
`update_counter`) and `nn.py` (`IDMLP`, `LRLinear`); its golden is `tests/test_mend_parity.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxedit.methods.mend.factors import Factors
from jaxedit.methods.mend.hparams import Layout, MENDHparams
from jaxedit.models.sites import add_to_weights

Editor = dict  # {"edit_lrs": [W], "nets": {group: [layer params]}}
Norm = dict  # {group: {"k", "u_mean", "u_m2", "d_mean", "d_m2"}}


def init_editor(key: Array, layout: Layout, hp: MENDHparams) -> Editor:
    """IDMLP per group: U = 0 (identity start), V ~ N(0, 1), bias 0, mode scale 1 / shift 0."""
    nets = {}
    for name, n_in, n_out, members in layout.groups:
        width = n_in + n_out
        r = min(hp.rank, width)
        layers = []
        for _ in range(hp.n_hidden + 1):
            key, sub = jax.random.split(key)
            layers.append(
                {
                    "u": jnp.zeros((width, r), jnp.float32),
                    "v": jax.random.normal(sub, (r, width), jnp.float32),
                    "bias": jnp.zeros((width,), jnp.float32),
                    "mode_scale": jnp.ones((len(members), width), jnp.float32),
                    "mode_shift": jnp.zeros((len(members), width), jnp.float32),
                }
            )
        nets[name] = layers
    n = len(layout.weights)
    return {"edit_lrs": jnp.full((n,), hp.edit_lr, jnp.float32), "nets": nets}


def init_norm(layout: Layout) -> Norm:
    """Empty running statistics (count 0)."""
    z = lambda d: jnp.zeros((d,), jnp.float32)
    return {
        name: {
            "k": jnp.zeros((), jnp.float32),
            "u_mean": z(n_in),
            "u_m2": z(n_in),
            "d_mean": z(n_out),
            "d_m2": z(n_out),
        }
        for name, n_in, n_out, _ in layout.groups
    }


def lr_linear(p: dict, h: Float[Array, "N W"], mode: Int[Array, ""]) -> Float[Array, "N W"]:
    """One residual low-rank layer: h + clamp((U V h + b) · s_mode + c_mode, min=0)."""
    pre = (h @ p["v"].T) @ p["u"].T + p["bias"][None]
    pre = pre * p["mode_scale"][mode][None] + p["mode_shift"][mode][None]
    # torch's clamp(min=0) passes gradient 1 at exactly 0 (relu would pass 0): with U = 0 at
    # initialisation every pre-activation is 0, and U could otherwise never start learning.
    return h + jnp.where(pre >= 0, pre, 0.0)


def norm_std(m2: Array, k: Array) -> Array:
    """σ = sqrt(M2 / (k - 1)) (the reference's unbiased std; 1 before two tokens were seen)."""
    return jnp.where(k > 1, jnp.sqrt(m2 / jnp.maximum(k - 1, 1.0)), 1.0)


def transform(
    layers: list[dict],
    norm: dict,
    u: Float[Array, "N I"],
    d: Float[Array, "N O"],
    mode: Int[Array, ""],
    use_norm: bool,
) -> tuple[Float[Array, "N I"], Float[Array, "N O"]]:
    """(u, δ) -> (ũ, δ̃) for the tokens of one weight: normalise, concat, IDMLP, split."""
    if use_norm:
        u = (u - norm["u_mean"][None]) / (norm_std(norm["u_m2"], norm["k"])[None] + 1e-7)
        d = (d - norm["d_mean"][None]) / (norm_std(norm["d_m2"], norm["k"])[None] + 1e-7)
    h = jnp.concatenate([u, d], -1)
    for p in layers:
        h = lr_linear(p, h, mode)
    return h[:, : u.shape[-1]], h[:, u.shape[-1] :]


def update_norm(norm: dict, u: Float[Array, "N I"], d: Float[Array, "N O"], m: Bool[Array, " N"]):
    """Fold the masked tokens into the running mean / M2 (Chan et al.'s parallel Welford)."""
    m = m.astype(jnp.float32)[:, None]
    n_b = jnp.sum(m)
    k = norm["k"] + n_b
    out = {"k": k}
    for x, name in ((u, "u"), (d, "d")):
        mean_b = jnp.sum(m * x, 0) / jnp.maximum(n_b, 1.0)
        m2_b = jnp.sum(m * jnp.square(x - mean_b[None]), 0)
        delta = mean_b - norm[f"{name}_mean"]
        out[f"{name}_mean"] = norm[f"{name}_mean"] + delta * n_b / jnp.maximum(k, 1.0)
        out[f"{name}_m2"] = (
            norm[f"{name}_m2"] + m2_b + jnp.square(delta) * norm["k"] * n_b / jnp.maximum(k, 1.0)
        )
    return out


def transformed_factors(
    editor: Editor, norm: Norm, layout: Layout, factors: Factors, use_norm: bool
) -> dict[str, tuple[Array, Array]]:
    """{group: (ũ [M N I] with masked tokens zeroed, δ̃ [M N O])}; the editor is vmapped over
    each group's layers (mode = position in the group)."""
    tilde = {}
    for name, _, _, members in layout.groups:
        modes = jnp.arange(len(members))
        run = lambda u, d, mode, _n=name: transform(
            editor["nets"][_n], norm[_n], u, d, mode, use_norm
        )
        ut, dt = jax.vmap(run)(factors.u[name], factors.d[name], modes)
        tilde[name] = (ut * factors.m[name][..., None], dt)  # masked tokens contribute nothing
    return tilde


def pseudo_gradients(
    editor: Editor, norm: Norm, layout: Layout, factors: Factors, use_norm: bool
) -> tuple[list[Array], dict]:
    """∇̃_W = Σ_t ũ_t δ̃_tᵀ for every edited weight.

    Returns (gradients in `layout.weights` order, {group: (ũ [M N I], δ̃ [M N O])}).
    """
    out: list = [None] * len(layout.weights)
    tilde = transformed_factors(editor, norm, layout, factors, use_norm)
    for name, _, _, members in layout.groups:
        g = jnp.einsum("mti,mto->mio", *tilde[name])
        for j, i in enumerate(members):
            out[i] = g[j]
    return out, tilde


def pseudo_gradients_loop(editor, norm, layout, factors, use_norm) -> list[Array]:
    """The same as `pseudo_gradients`, one layer at a time (the reference's loop; for tests)."""
    out: list = [None] * len(layout.weights)
    for name, _, _, members in layout.groups:
        for j, i in enumerate(members):
            ut, dt = transform(
                editor["nets"][name],
                norm[name],
                factors.u[name][j],
                factors.d[name][j],
                jnp.asarray(j),
                use_norm,
            )
            out[i] = (ut * factors.m[name][j][:, None]).T @ dt
    return out


def apply_updates(params: dict, layout: Layout, edit_lrs: Array, grads: list[Array]) -> dict:
    """W̃_l = W_l + η_l ∇̃W_l (computed in fp32, stored in the param dtype), one update of each
    stacked weight array for all its edited layers."""
    by_site: dict[str, list[int]] = {}
    for i, (site, _) in enumerate(layout.weights):
        by_site.setdefault(site, []).append(i)
    for site, idx in by_site.items():
        layers = tuple(layout.weights[i][1] for i in idx)
        deltas = jnp.stack([edit_lrs[i] * grads[i].astype(jnp.float32) for i in idx])
        params = add_to_weights(params, site, layers, deltas)
    return params
