"""Sites and patches: the named points every family exposes, and how to change them.

Sites (identical names and meanings for every family):
    embed     token (+ learned position) embeddings            [B T D]
    attn_out  attention output of layer l (before the residual add)   [L B T D]
    mlp_key   input of the MLP output projection (ROME's key k)      [L B T F]
    mlp_out   MLP output (ROME's value v = W_out k)                   [L B T D]
    resid     block output (the residual stream after layer l)       [L B T D]
    mlp_in    input of the MLP (the normed residual; MEND's u for up/gate)  [L B T D]

A `SitePatch` is only arrays, so a batch of patches goes through `jax.vmap` and `jax.grad`
flows through an added value:

    patched = where(mask, value + add * original, original)

i.e. `add=False` replaces the activation where `mask` holds, `add=True` adds `value` there.
`mask` / `value` may have a batch axis of 1 to broadcast over the batch.

Weights edited by ROME / MEMIT / MEND are addressed by site too (`weight_path`): the
`mlp_out` weight of layer l is the kernel of the MLP output projection, laid out [F, D]
(in, out), so that `mlp_out = mlp_key @ W[l]` (+ bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

BLOCK_SITES = ("attn_out", "mlp_key", "mlp_out", "resid", "mlp_in")
SITES = ("embed", *BLOCK_SITES)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SitePatch:
    """Where (`mask`), what (`value`) and how (`add`) to patch one site.

    Shapes: [L B T] / [L B T X] for a block site (a leading layer axis, scanned over by the
    forward), [B T] / [B T X] for `embed` or for one layer's slice; a batch axis of 1 in either
    broadcasts; `add` is a scalar or one flag per layer. A batch of patches (for `jax.vmap`)
    stacks all three along new leading axes, hence the variadic `*layers` and the free `add`.
    """

    mask: Bool[Array, "*layers #B T"]
    value: Float[Array, "*layers #B T X"]
    add: Bool[Array, "*flags"]


Patch = dict[str, SitePatch]


def apply_patch(p: SitePatch | None, x: Float[Array, "B T X"]) -> Float[Array, "B T X"]:
    if p is None:
        return x
    value = p.value.astype(x.dtype)
    return jnp.where(p.mask[..., None], value + p.add.astype(x.dtype) * x, x)


def _width(cfg, site: str) -> int:
    return cfg.d_ff if site == "mlp_key" else cfg.d_model


def make_patch(
    cfg,
    site: str,
    shape_bt: tuple[int, int],
    layers: Any,
    positions: Any,
    value: Float[Array, "... X"] | float = 0.0,
    *,
    add: bool = False,
) -> SitePatch:
    """A patch at `site` for the given layers and token positions (indices or masks).

    `value` broadcasts to [L, B, T, X] (e.g. a full captured activation, or one vector).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites are {SITES}")
    B, T = shape_bt
    pos_mask = _index_mask(positions, T)  # [T] or [B T]
    pos_mask = jnp.broadcast_to(pos_mask, (B, T))
    X = _width(cfg, site)
    if site == "embed":
        mask = pos_mask
        full = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (B, T, X))
    else:
        layer_mask = _index_mask(layers, cfg.n_layers)
        mask = layer_mask[:, None, None] & pos_mask[None]
        full = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (cfg.n_layers, B, T, X))
    return SitePatch(mask=mask, value=full, add=jnp.asarray(add))


def _index_mask(index: Any, n: int) -> Bool[Array, "... N"]:
    index = jnp.asarray(index)
    if index.dtype == jnp.bool_:
        return index
    return jnp.zeros((n,), bool).at[index].set(True)


# ----------------------------------------------------------------------------- weights by site

# site -> path of the weight that produces it, inside params["blocks"] (leading axis L).
_WEIGHT_PATHS = {
    "mlp_out": ("mlp", "down", "kernel"),  # [L F D]: mlp_out = mlp_key @ W
    "mlp_up": ("mlp", "up", "kernel"),  # [L D F]
    "mlp_gate": ("mlp", "gate", "kernel"),  # [L D F] (gated MLPs only)
    "attn_out": ("attn", "o", "kernel"),  # [L HK D]
}


def weight_path(site: str) -> tuple[str, ...]:
    if site not in _WEIGHT_PATHS:
        raise ValueError(f"no editable weight for site {site!r}; known: {sorted(_WEIGHT_PATHS)}")
    return ("blocks", *_WEIGHT_PATHS[site])


def get_weight(params: dict, site: str, layer: int) -> Float[Array, "I O"]:
    """The [in, out] weight of `site` at `layer`."""
    node = params
    for key in weight_path(site):
        node = node[key]
    return node[layer]


def set_weight(params: dict, site: str, layer: int, new: Float[Array, "I O"]) -> dict:
    """New params with the weight of `site` at `layer` replaced; `params` is not mutated."""
    return _replace_leaf(params, weight_path(site), lambda w: w.at[layer].set(new.astype(w.dtype)))


def add_to_weights(
    params: dict,
    site: str,
    layers: tuple[int, ...],
    deltas: Float[Array, "N I O"],
    *,
    donate: bool = False,
) -> dict:
    """New params with `deltas[i]` added (in fp32) to the weight of `site` at `layers[i]`.

    One update of the stacked [L I O] array for all the layers, not one per layer: every update
    of a stacked array outside a donated buffer is a copy of all L layers, which dominates a
    MEND edit on a CPU (on SmolLM2, three 106 MB copies for its nine edited weights, not nine).
    Consecutive layers (MEND's last three blocks) are one `dynamic_update_slice`.

    `donate=True` hands the old stacked array's buffer to XLA, which writes the edited layers
    into it in place (only they are touched): the old array is deleted, so `params` (and every
    model holding that array) must not be used again. For sequential editing, where the model
    before an edit is dropped anyway; the default keeps `params` intact. Called eagerly only:
    under `jit` the donation is ignored; under an eager `grad` / `vmap` it would delete arrays
    the transform still reads. Where XLA cannot reuse the buffer (an array a numpy view holds
    on to) it writes a new one and deletes nothing.
    """
    if len(layers) != deltas.shape[0] or len(set(layers)) != len(layers):
        raise ValueError(f"need one delta per distinct layer, got {layers} for {deltas.shape}")
    layers = tuple(int(x) for x in layers)  # hashable: a static argument of `_added_in_place`
    add = _added_in_place if donate else _added
    return _replace_leaf(params, weight_path(site), lambda w: add(w, deltas, layers))


def _added(w: Float[Array, "L I O"], deltas: Float[Array, "N I O"], layers: tuple[int, ...]):
    """`w` with deltas[i] added to layer layers[i] (fp32 sums, stored in w's dtype)."""
    if not all(0 <= layer < w.shape[0] for layer in layers):
        raise ValueError(f"layers {layers} out of range 0..{w.shape[0] - 1}")
    lo = min(layers)
    if sorted(layers) == list(range(lo, lo + len(layers))):
        order = [layers.index(layer) for layer in range(lo, lo + len(layers))]
        block = jax.lax.dynamic_slice_in_dim(w, lo, len(layers), 0).astype(jnp.float32)
        block = block + deltas[jnp.asarray(order)].astype(jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(w, block.astype(w.dtype), lo, 0)
    idx = jnp.asarray(layers)
    return w.at[idx].set((w[idx].astype(jnp.float32) + deltas).astype(w.dtype))


# The same update compiled with w's buffer donated: XLA updates the slice in place (on a CPU,
# ~1 ms for a 106 MB stack where a new array takes ~50-100 ms to write, page faults included).
_added_in_place = jax.jit(_added, static_argnums=2, donate_argnums=0)


def _replace_leaf(params: dict, path: tuple[str, ...], fn) -> dict:
    """A copy of the nested dict `params` with the leaf at `path` replaced by fn(leaf)."""
    key = path[0]
    if len(path) == 1:
        return {**params, key: fn(params[key])}
    return {**params, key: _replace_leaf(params[key], path[1:], fn)}
