"""One Flax (nnx) decoder-only transformer for GPT-2, GPT-J, GPT-NeoX and the Llama family.

The block, written once, branches only on config fields:

    sequential (GPT-2, Llama):   h = x + attn(ln1 x);  resid = h + mlp(ln2 h)
    parallel   (GPT-J, NeoX):    resid = x + attn(ln1 x) + mlp(ln2 x)    (GPT-J: ln2 = ln1)
    mlp:  mlp_key = act(up x)            (GPT-2 / J / NeoX)
          mlp_key = act(gate x) * up x   (Llama: SwiGLU)
          mlp_out = down(mlp_key)

The L blocks are created stacked along a leading axis (`nnx.vmap`) and run by `jax.lax.scan`
over their split state, so compile time does not grow with depth. Per-layer patches and KV-cache
slices ride along as scan inputs; captured sites come out as scan outputs.

Params live outside the modules as a plain nested dict of arrays (see `init_params`); `forward`
merges them into the module graph inside the trace, so `jit`, `vmap`, `grad` and `tree_map`
see an ordinary pytree. Precision: matmul inputs are in the param dtype (fp32 or bf16), their
accumulation, the residual stream, norms, softmax and logits are fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxedit.models.config import ModelConfig
from jaxedit.models.sharding import BATCH_LENGTH, constrain
from jaxedit.models.sites import BLOCK_SITES, Patch, SitePatch, apply_patch

Params = dict[str, Any]
# The sites of a block in the order it computes them (`forward(stop_at=...)`).
BLOCK_ORDER = ("attn_out", "mlp_in", "mlp_key", "mlp_out", "resid")
_NEG = -1e30  # additive mask: finite, so fully-masked (padding) query rows stay NaN-free


# ----------------------------------------------------------------------------- layers


def _dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def _along_last(v: Float[Array, " X"], like: Array) -> Float[Array, "*ones X"]:
    """A vector reshaped to broadcast over the last axis of `like` (explicit, so the code runs
    under `jax_numpy_rank_promotion="raise"`), in fp32."""
    return v.astype(jnp.float32).reshape((1,) * (like.ndim - 1) + v.shape)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel laid out [in, out]."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
        kernel = self.kernel[...]
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + _along_last(self.bias[...], y)
        return y


class Norm(nnx.Module):
    """LayerNorm (scale, bias) or RMSNorm (scale), always computed in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), _dtype(cfg)))
        self.bias = None if self.rms else nnx.Param(jnp.zeros((cfg.d_model,), _dtype(cfg)))

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        x = x.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
            return y * _along_last(self.scale[...], y)
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * _along_last(self.scale[...], y) + _along_last(self.bias[...], y)


def activation(name: str) -> Callable[[Array], Array]:
    """The elementwise MLP activation a config names (`ModelConfig.activation`), as the model
    applies it (public for methods that differentiate through the MLP by hand, e.g. MEND)."""
    return {
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
    }[name]


def rotary_inv_freq(cfg: ModelConfig) -> Float[Array, " R2"]:
    """Inverse frequencies θ^(-2i/R) for the R rotated dims, with the family's scaling."""
    R = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
    scaling = dict(cfg.rope_scaling or ())
    if scaling.get("rope_type") == "linear":
        inv = inv / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > old_len / lo, inv / factor, inv)
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = jnp.where(is_mid, mid, inv)
    return inv


def apply_rotary(
    cfg: ModelConfig, x: Float[Array, "B T N K"], positions: Int[Array, "B T"]
) -> Float[Array, "B T N K"]:
    """Rotate the first `rotary_dim` dims of each head by angle position · inv_freq."""
    R = cfg.rotary_dim
    angle = positions[..., None].astype(jnp.float32) * rotary_inv_freq(cfg)[None, None]  # B T R/2
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    rot, rest = x[..., :R], x[..., R:]
    if cfg.rotary_style == "half":  # NeoX / Llama: pairs (i, i + R/2)
        x1, x2 = rot[..., : R // 2], rot[..., R // 2 :]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    else:  # GPT-J: pairs (2i, 2i + 1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(rot.shape)
    return jnp.concatenate([rotated, rest], -1)


class KVCache(NamedTuple):
    """Keys/values of a prefix, for every layer: attend to them instead of recomputing them.

    `mask` marks the valid prefix slots (left-padded prefixes and unfilled buffer slots are 0).
    """

    k: Float[Array, "L B S G K"]
    v: Float[Array, "L B S G K"]
    mask: Bool[Array, "B S"]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, G, K, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, _dtype(cfg)
        self.q = Linear(D, H * K, cfg.qkv_bias, dt, rngs)
        self.k = Linear(D, G * K, cfg.qkv_bias, dt, rngs)
        self.v = Linear(D, G * K, cfg.qkv_bias, dt, rngs)
        self.o = Linear(H * K, D, cfg.attn_out_bias, dt, rngs)

    def __call__(self, x, positions, bias, prefix_kv):
        """x [B T D]; bias [B 1 1 T S+T] additive mask; prefix_kv (k, v) [B S G K] or None.

        Returns (attn_out [B T D], (k, v) of these T tokens).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = self.q(x).reshape(B, T, H, K)
        k = self.k(x).reshape(B, T, G, K)
        v = self.v(x).reshape(B, T, G, K)
        if cfg.positional == "rotary":
            q, k = apply_rotary(cfg, q, positions), apply_rotary(cfg, k, positions)
        new_kv = (k, v)
        if prefix_kv is not None:
            k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
        q = q.reshape(B, T, G, H // G, K)
        scores = jnp.einsum("btgrk,bsgk->bgrts", q, k) / math.sqrt(K)
        probs = jax.nn.softmax(scores + bias, axis=-1)
        ctx = jnp.einsum("bgrts,bsgk->btgrk", probs, v).reshape(B, T, H * K)
        return self.o(ctx), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, dt = cfg.d_model, cfg.d_ff, _dtype(cfg)
        self.act = activation(cfg.activation)
        self.gate = Linear(D, F, cfg.mlp_bias, dt, rngs) if cfg.gated_mlp else None
        self.up = Linear(D, F, cfg.mlp_bias, dt, rngs)
        self.down = Linear(F, D, cfg.mlp_bias, dt, rngs)

    def key(self, x: Float[Array, "B T D"]) -> Float[Array, "B T F"]:
        """ROME's key: the input of the output projection."""
        if self.gate is not None:
            return self.act(self.gate(x)) * self.up(x)
        return self.act(self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln1 = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = None if cfg.shared_parallel_norm else Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, bias, patches, prefix_kv, stop_at=None):
        """One block with patch points. Returns (resid, {site: activation}, new (k, v)); with
        `stop_at` (a site name) it stops right after that site and returns resid None."""
        sites: dict[str, Array] = {}

        def site(name, value):
            value = apply_patch(patches.get(name), value)
            sites[name] = value
            return value

        attn_out, new_kv = self.attn(self.ln1(x), positions, bias, prefix_kv)
        attn_out = site("attn_out", attn_out)
        if stop_at == "attn_out":
            return None, sites, new_kv
        if self.cfg.parallel_residual:
            mlp_in = self.ln1(x) if self.ln2 is None else self.ln2(x)
        else:
            x = x + attn_out
            mlp_in = self.ln2(x)
        mlp_in = site("mlp_in", mlp_in)
        if stop_at == "mlp_in":
            return None, sites, new_kv
        key = site("mlp_key", self.mlp.key(mlp_in))
        if stop_at == "mlp_key":
            return None, sites, new_kv
        mlp_out = site("mlp_out", self.mlp.down(key))
        if stop_at == "mlp_out":
            return None, sites, new_kv
        resid = x + attn_out + mlp_out if self.cfg.parallel_residual else x + mlp_out
        resid = site("resid", resid)
        return resid, sites, new_kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = jax.nn.initializers.normal(0.02)
        dt = _dtype(cfg)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), dt))
        self.pos_embed = (
            nnx.Param(init(rngs.params(), (cfg.max_positions, cfg.d_model), dt))
            if cfg.positional == "learned"
            else None
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, cfg.lm_head_bias, dt, rngs)
        )


# ----------------------------------------------------------------------------- state <-> dict


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig):
    """(graphdef, abstract state) of the model: shapes only, nothing allocated."""
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return nnx.split(abstract_model)


def param_shapes(cfg: ModelConfig) -> Params:
    """The params layout as a nested dict of `jax.ShapeDtypeStruct` (what loaders fill)."""
    _, state = _abstract(cfg)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Random params (normal(0.02) weights, unit norms), as a plain nested dict."""
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(seed))))


def _merge(cfg: ModelConfig, params: Params) -> Transformer:
    graphdef, abstract_state = _abstract(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- forward


class Output(NamedTuple):
    """logits: [B T V] or [B P V] at `logit_positions` (None when stopped early);
    captured: {site: [L B T X]} ("embed": [B T D]); kv: the (k, v) of these tokens per layer."""

    logits: Float[Array, "B P V"] | None
    captured: dict[str, Array]
    kv: tuple[Array, Array] | None


def positions_from_mask(mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """Token positions counting only real tokens, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(
    mask: Bool[Array, "B T"], segments: Int[Array, "B T"]
) -> Int[Array, "B T"]:
    """Token positions counting only real tokens, restarting where the segment id changes:
    each document packed into a row sees the positions it would have alone."""
    T = mask.shape[1]
    count = jnp.cumsum(mask.astype(jnp.int32), axis=-1)
    idx = jnp.broadcast_to(jnp.arange(T)[None], mask.shape)
    first = jnp.concatenate(
        [jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], 1
    )
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)  # where this token's segment began
    before = jnp.take_along_axis(count, start, 1) - jnp.take_along_axis(
        mask.astype(jnp.int32), start, 1
    )
    return jnp.maximum(count - before - 1, 0)


def _attention_bias(cfg, mask, positions, cache_mask, cache_positions, segments=None):
    """Additive [B 1 1 T S+T] bias: causal, padding-aware, optional sliding window; with
    `segments` a token attends only to its own segment (block-diagonal, no cache)."""
    q_pos = positions[:, :, None]
    if cache_mask is None:
        k_mask, k_pos = mask, positions
        T = mask.shape[1]
        order_ok = jnp.tril(jnp.ones((T, T), bool))[None]
    else:
        k_mask = jnp.concatenate([cache_mask, mask], 1)
        k_pos = jnp.concatenate([cache_positions, positions], 1)
        S, T = cache_mask.shape[1], mask.shape[1]
        order_ok = jnp.concatenate([jnp.ones((T, S), bool), jnp.tril(jnp.ones((T, T), bool))], 1)[
            None
        ]
    allowed = order_ok & k_mask[:, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    if cfg.sliding_window is not None:
        allowed = allowed & (q_pos - k_pos[:, None, :] < cfg.sliding_window)
    return jnp.where(allowed, 0.0, _NEG)[:, None, None, :, :]


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"] | None = None,
    *,
    patch: Patch | None = None,
    capture: tuple[str, ...] = (),
    logit_positions: Int[Array, "B P"] | None = None,
    n_layers: int | None = None,
    cache: KVCache | None = None,
    return_kv: bool = False,
    segments: Int[Array, "B T"] | None = None,
    stop_at: str | None = None,
) -> Output:
    """The pure forward pass.

    Arguments:
        tokens, mask: token ids and validity (1 = real token); left or right padding.
        patch: {site: SitePatch}: replace or add values at sites (see `jaxedit.models.sites`).
        capture: site names whose activations to return (per layer, before any later patch).
        logit_positions: compute logits only at these positions (e.g. the last real token).
        n_layers: run only the first n blocks and return no logits (e.g. ROME statistics).
        cache: keys/values of a prefix to attend to (this call's tokens follow it).
        return_kv: also return this call's keys/values, to extend a cache.
        segments: several documents packed into each row: the id of each token's document
            (a contiguous run per document); a token attends only to earlier tokens of its own
            document and positions restart at each, so every document's activations are those
            it has alone. Not with `cache`.
        stop_at: a block site: stop the last block run right after it (the sites after it and
            the logits are not computed; e.g. "mlp_key" for key statistics). Only sites at or
            before it may be captured.
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    mask = mask.astype(bool)
    patch = patch or {}
    unknown = set(capture) - set(BLOCK_SITES) - {"embed"}
    if unknown:
        raise ValueError(f"unknown capture sites {sorted(unknown)}")
    if stop_at is not None:
        if stop_at not in BLOCK_ORDER:
            raise ValueError(f"stop_at={stop_at!r} is not a block site {BLOCK_ORDER}")
        later = set(BLOCK_ORDER[BLOCK_ORDER.index(stop_at) + 1 :]) & set(capture)
        if later:
            raise ValueError(f"cannot capture {sorted(later)} after stop_at={stop_at!r}")
    if segments is not None and cache is not None:
        raise ValueError("segments (packed documents) cannot follow a cache")
    model = _merge(cfg, params)
    if cache is not None:
        cache_positions = positions_from_mask(cache.mask)
        offset = jnp.sum(cache.mask, axis=-1)
        positions = positions_from_mask(mask) + offset[:, None]
    elif segments is not None:
        cache_positions, positions = None, positions_from_segments(mask, segments)
    else:
        cache_positions, positions = None, positions_from_mask(mask)
    bias = _attention_bias(
        cfg, mask, positions, None if cache is None else cache.mask, cache_positions, segments
    )

    # Padded positions look up id 0, whatever the pad id: an id outside the vocabulary (a
    # config's pad/eos id beyond V) would embed as NaN, and 0 x NaN in attention would poison
    # every real position too. Real positions keep their ids (an invalid one stays NaN: loud).
    tokens = jnp.where(mask, tokens, 0)
    # Rows are looked up in tables gathered along D (the vocabulary still split): from a
    # D-split table XLA cannot move the rows onto batch shards without a full copy.
    table = constrain(model.embed[...], ("vocab", None), params["embed"], force=True)
    x = jnp.take(table, tokens, axis=0).astype(jnp.float32)
    if model.pos_embed is not None:
        table = constrain(model.pos_embed[...], ("positions", None), params["embed"], force=True)
        x = x + jnp.take(table, positions, axis=0).astype(jnp.float32)
    x = apply_patch(patch.get("embed"), x)
    x = constrain(x, BATCH_LENGTH, params["embed"])  # FSDP: rows split, weights gathered
    embedded = x

    block_graph, block_state = nnx.split(model.blocks)
    n_run = cfg.n_layers if n_layers is None else n_layers
    if not 0 < n_run <= cfg.n_layers:
        raise ValueError(f"n_layers={n_run} out of range 1..{cfg.n_layers}")
    layer_slice = lambda a: a[:n_run]
    block_state = jax.tree.map(layer_slice, block_state)
    # mask/value are scanned over layers; the scalar `add` is broadcast to ride along with them.
    layer_patches = {
        s: SitePatch(layer_slice(p.mask), layer_slice(p.value), jnp.broadcast_to(p.add, (n_run,)))
        for s, p in patch.items()
        if s != "embed"
    }
    layer_cache = None if cache is None else (cache.k[:n_run], cache.v[:n_run])
    want = tuple(s for s in capture if s != "embed")

    def body(h, xs, stop_at=None):
        state, patches, prefix_kv = xs
        block = nnx.merge(block_graph, state)
        h, sites, kv = block(h, positions, bias, patches, prefix_kv, stop_at)
        if h is not None:
            h = constrain(h, BATCH_LENGTH, params["embed"])
        return h, ({s: sites[s] for s in want}, kv if return_kv else None)

    # Under `grad` save only matmul outputs for the backward pass, as in `run_layers` (a MEND
    # training step on a CPU core: 1.5-1.7 s instead of 1.8 s).
    scan_body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable)
    xs = (block_state, layer_patches, layer_cache)
    if stop_at is None:
        h, (captured, kv) = jax.lax.scan(scan_body, x, xs)
    else:
        # The first n-1 blocks whole, the last one only up to `stop_at` (for statistics at
        # layer l: no down projection and residual of block l, ~5 % of the work at l = 4).
        below = jax.tree.map(lambda a: a[:-1], xs)
        last = jax.tree.map(lambda a: a[-1], xs)
        h, outs = jax.lax.scan(scan_body, x, below) if n_run > 1 else (x, None)
        last_body = jax.checkpoint(
            functools.partial(body, stop_at=stop_at), policy=jax.checkpoint_policies.dots_saveable
        )
        _, out = last_body(h, last)
        out = jax.tree.map(lambda a: a[None], out)
        if outs is not None:
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, out)
        captured, kv = out
    if "embed" in capture:
        captured = {**captured, "embed": embedded}
    if n_layers is not None or stop_at is not None:
        return Output(None, captured, kv)
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[..., None], axis=1)
    h = model.final_norm(h)
    if model.lm_head is None:
        logits = jnp.dot(
            h.astype(model.embed.dtype), model.embed[...].T, preferred_element_type=jnp.float32
        )
    else:
        logits = model.lm_head(h)
    return Output(logits, captured, kv)


forward_jit = jax.jit(
    forward, static_argnums=0, static_argnames=("capture", "n_layers", "return_kv", "stop_at")
)


def final_norm(cfg: ModelConfig, params: Params, h: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """The final norm applied to residual states (what HF reports as the last hidden state)."""
    return _merge(cfg, params).final_norm(h)


def last_positions(mask: Bool[Array, "B T"]) -> Int[Array, "B 1"]:
    """Index of the last real token of each row (works for left and right padding)."""
    T = mask.shape[1]
    idx = jnp.arange(T)[None, :]
    return jnp.max(jnp.where(mask, idx, -1), axis=1, keepdims=True)


def run_layers(
    cfg: ModelConfig,
    params: Params,
    h: Float[Array, "B T D"],
    mask: Bool[Array, "B T"],
    start: Int[Array, ""] | int,
    *,
    patch: Patch | None = None,
    logit_positions: Int[Array, "B P"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    cache: KVCache | None = None,
) -> Float[Array, "B P V"]:
    """Resume a forward pass: run blocks `start..L-1` from the residual state `h`, then logits.

    `h` is the input of block `start` (the `resid` of block start-1, or the embeddings when
    start = 0; start = L runs no block). `start` may be a traced scalar: the blocks run in a
    `fori_loop` with a dynamic trip count, so one compiled program serves every start layer and
    the layers below `start` are never recomputed (causal tracing restores a state at layer l
    and reuses the corrupted run below it). `patch` is as in `forward` (mask/value [L B T X]).
    `cache` holds the keys/values of a prefix these tokens follow (all L layers), and
    `positions` their absolute positions (default: counted from `mask`, after the prefix).
    """
    mask = mask.astype(bool)
    patch = {s: p for s, p in (patch or {}).items() if s != "embed"}
    model = _merge(cfg, params)
    if cache is None:
        cache_positions = None
        positions = positions_from_mask(mask) if positions is None else positions
    else:
        cache_positions = positions_from_mask(cache.mask)
        if positions is None:
            positions = positions_from_mask(mask) + jnp.sum(cache.mask, axis=-1)[:, None]
    bias = _attention_bias(
        cfg, mask, positions, None if cache is None else cache.mask, cache_positions
    )
    block_graph, block_state = nnx.split(model.blocks)
    embed = params["embed"]

    def body(i, h):
        take = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
        block = nnx.merge(block_graph, jax.tree.map(take, block_state))
        patches = {s: SitePatch(take(p.mask), take(p.value), p.add) for s, p in patch.items()}
        prefix_kv = None if cache is None else (take(cache.k), take(cache.v))
        return constrain(block(h, positions, bias, patches, prefix_kv)[0], BATCH_LENGTH, embed)

    # Under `grad` (ROME's v* steps) keep only the matmul outputs for the backward pass and
    # recompute the rest: by default every layer's weight slice taken in the loop is saved as
    # a residual, an extra copy of the whole stack per step (backward 1.6x slower on a CPU core).
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable)
    h = jax.lax.fori_loop(start, cfg.n_layers, body, h.astype(jnp.float32))
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[..., None], axis=1)
    h = model.final_norm(h)
    if model.lm_head is None:
        return jnp.dot(
            h.astype(model.embed.dtype), model.embed[...].T, preferred_element_type=jnp.float32
        )
    return model.lm_head(h)
