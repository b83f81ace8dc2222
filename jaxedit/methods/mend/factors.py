"""MEND's gradient factors: for an edited weight W [I, O] (`out = in @ W`),

    ∇_W L = Σ_t u_t δ_tᵀ,     u_t = layer input at t,   δ_t = ∂L / ∂(layer output at t),

taken without hooks: u is a captured site (`mlp_key` for the output projection, `mlp_in` for up
/ gate) and δ is one `jax.grad` with respect to zeros *added* at `mlp_key` / `mlp_out`. For up /
gate the output gradient follows from δ at `mlp_key` by the chain rule through the MLP's
elementwise activation (SwiGLU: key = act(x W_g) ⊙ (x W_u)), so the model needs no further
patch point.

Blocks below the lowest edited layer see the same input before and after an edit, so their
output (the residual entering block `first`) is computed once, without gradient, and the edited
forward runs only blocks first..L-1: a sub-model fed that residual through a replace patch at
`embed` (`split_top`, `prefix_resid`, `top_forward`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxedit.methods.mend.hparams import Layout
from jaxedit.methods.mend.inputs import Labelled
from jaxedit.methods.mend.losses import nll
from jaxedit.models.config import ModelConfig
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import activation, forward


class Factors(NamedTuple):
    """Per group: u [M N I], δ [M N O], token mask [M N] (M = weights in the group)."""

    u: dict[str, Array]
    d: dict[str, Array]
    m: dict[str, Array]


# ------------------------------------------------------------- running only the edited blocks


def first_layer(layout: Layout) -> int:
    return min(layer for _, layer in layout.weights)


def shift_layout(layout: Layout, first: int) -> Layout:
    """The layout of the sub-model made of blocks first..L-1 (layers renumbered from 0)."""
    return Layout(tuple((s, layer - first) for s, layer in layout.weights), layout.groups)


def split_top(cfg: ModelConfig, params: dict, first: int) -> tuple[ModelConfig, dict]:
    """(config, params) of the sub-model made of blocks first..L-1 (+ final norm, head)."""
    if first == 0:
        return cfg, params
    top = {**params, "blocks": jax.tree.map(lambda a: a[first:], params["blocks"])}
    return cfg.replace(n_layers=cfg.n_layers - first), top


def prefix_resid(cfg, params, tokens, mask, first: int) -> Float[Array, "B T D"] | None:
    """The residual entering block `first` (None when first = 0): constant under the edit."""
    if first == 0:
        return None
    # The whole stack with one scored position, not `n_layers=first`: that path slices the
    # stacked block weights (a copy of `first` layers per call), which on a CPU core cost more
    # than the blocks above `first` (27-block prefix 569 ms vs 30-block forward 316 ms).
    one = jnp.zeros((tokens.shape[0], 1), jnp.int32)
    out = forward(cfg, params, tokens, mask, capture=("resid",), logit_positions=one)
    return jax.lax.stop_gradient(out.captured["resid"][first - 1])


def top_forward(cfg_top, params_top, x: Labelled, h0, *, patch=None, capture=()):
    """Logits at the scored positions of the sub-model started from residual h0."""
    patch = dict(patch or {})
    if h0 is not None:
        patch["embed"] = SitePatch(jnp.ones(x.mask.shape, bool), h0, jnp.asarray(False))
    return forward(
        cfg_top, params_top, x.tokens, x.mask, patch=patch, capture=capture, logit_positions=x.pos
    )


# ------------------------------------------------------------- factors


def gradient_factors(
    cfg: ModelConfig, params: dict, layout: Layout, x: Labelled, h0=None
) -> tuple[Float[Array, ""], Factors]:
    """The edit loss and, for every edited weight, u_t and δ_t over the B·T tokens.

    `cfg, params, layout` describe the model that is run (the full model with h0 = None, or the
    sub-model from `split_top` with a shifted layout and its input residual h0). One forward and
    one backward: δ at `mlp_key` / `mlp_out` is the gradient w.r.t. zeros added there. Tokens
    with u = 0 or δ = 0 (padding, tokens after the last label) are masked out, as the reference
    drops them before the editor (`GradientTransform.forward`'s nz_mask).
    """
    L, (B, T) = cfg.n_layers, x.tokens.shape
    layers = sorted({layer for _, layer in layout.weights})
    layer_mask = jnp.zeros((L,), bool).at[jnp.asarray(layers)].set(True)
    pmask = jnp.broadcast_to(layer_mask[:, None, None], (L, B, T))

    def loss_fn(zero_key, zero_out):
        patch = {
            "mlp_key": SitePatch(pmask, zero_key, jnp.asarray(True)),
            "mlp_out": SitePatch(pmask, zero_out, jnp.asarray(True)),
        }
        out = top_forward(cfg, params, x, h0, patch=patch, capture=("mlp_in", "mlp_key"))
        return nll(out.logits, x), out.captured

    zk = jnp.zeros((L, B, T, cfg.d_ff), jnp.float32)
    zo = jnp.zeros((L, B, T, cfg.d_model), jnp.float32)
    (loss, cap), (d_key, d_out) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(zk, zo)
    us, ds = [], []
    for site, layer in layout.weights:
        if site == "mlp_out":
            u, d = cap["mlp_key"][layer], d_out[layer]
        else:
            u = cap["mlp_in"][layer]
            d = _input_proj_delta(cfg, params["blocks"]["mlp"], site, layer, u, d_key[layer])
        us.append(u.reshape(B * T, -1).astype(jnp.float32))
        ds.append(d.reshape(B * T, -1).astype(jnp.float32))
    valid = x.mask.reshape(B * T)
    fu, fd, fm = {}, {}, {}
    for name, _, _, members in layout.groups:
        fu[name] = jnp.stack([us[i] for i in members])
        fd[name] = jnp.stack([ds[i] for i in members])
        nz = jnp.any(fu[name] != 0, -1) & jnp.any(fd[name] != 0, -1)
        fm[name] = nz & valid[None]
    return loss, Factors(fu, fd, fm)


def edit_factors(
    cfg: ModelConfig, params: dict, layout: Layout, x: Labelled
) -> tuple[Float[Array, ""], Factors]:
    """`gradient_factors` of the full model's edit input x, running only the edited blocks (from
    the prefix residual); the factors are constants (the reference detaches them)."""
    first = first_layer(layout)
    cfg_top, top = split_top(cfg, params, first)
    h0 = prefix_resid(cfg, params, x.tokens, x.mask, first)
    loss, factors = gradient_factors(cfg_top, top, shift_layout(layout, first), x, h0)
    return loss, jax.tree.map(jax.lax.stop_gradient, factors)


def _input_proj_delta(cfg: ModelConfig, mlp: dict, site: str, layer: int, x, d_key):
    """δ at the output of the up / gate projection from δ at the key, by the chain rule."""
    act = activation(cfg.activation)

    def proj(name, h):  # the model's Linear: param-dtype inputs, fp32 accumulation
        kernel = mlp[name]["kernel"][layer]
        y = jnp.dot(h.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        bias = mlp[name].get("bias")
        if bias is None:
            return y
        return y + bias[layer].astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))

    def dact(h):  # elementwise act'(h)
        return jax.jvp(act, (h,), (jnp.ones_like(h),))[1]

    up = proj("up", x)
    if not cfg.gated_mlp:  # key = act(x W_up)
        return d_key * dact(up)
    gate = proj("gate", x)  # key = act(x W_gate) ⊙ (x W_up)
    return d_key * act(gate) if site == "mlp_up" else d_key * up * dact(gate)


def true_gradients(factors: Factors, layout: Layout) -> list[Float[Array, "I O"]]:
    """Σ_t u_t δ_tᵀ per weight (equals ∇_W of the edit loss)."""
    out: list = [None] * len(layout.weights)
    for name, _, _, members in layout.groups:
        g = jnp.einsum("mti,mto->mio", factors.u[name], factors.d[name])
        for j, i in enumerate(members):
            out[i] = g[j]
    return out
