"""Sites and patches are pure arrays: replace/add, vmap, jit, grad; KV cache; truncated forward.

All on the tiny golden models (`tests/goldens/`), in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_parity import golden, golden_model

from jaxedit.models.sites import (
    BLOCK_SITES,
    SitePatch,
    add_to_weights,
    get_weight,
    make_patch,
    set_weight,
)
from jaxedit.models.transformer import KVCache, forward, forward_jit


@functools.cache
def setup(family: str = "llama"):
    """(lm, tokens [B T], mask, clean output with every site captured)."""
    lm, g = golden_model(family), golden(family)
    tokens, mask = jnp.asarray(g["full_ids"]), jnp.asarray(g["full_mask"])
    clean = forward_jit(lm.config, lm.params, tokens, mask, capture=("embed", *BLOCK_SITES))
    return lm, tokens, mask, clean


def run(lm, tokens, mask, patch, **kw):
    return forward_jit(lm.config, lm.params, tokens, mask, patch=patch, **kw)


@pytest.mark.parametrize("site", ("resid", "mlp_out", "mlp_key", "attn_out"))
@pytest.mark.parametrize(("layer", "position"), [(0, 3), (1, 11), (0, 0)])
def test_replace_with_clean_activation_reproduces_clean_run(site, layer, position):
    lm, tokens, mask, clean = setup()
    value = clean.captured[site]
    patch = {site: make_patch(lm.config, site, tokens.shape, layer, position, value)}
    out = run(lm, tokens, mask, patch)
    np.testing.assert_allclose(out.logits, clean.logits, atol=1e-6, rtol=0)


def test_replace_changes_only_later_positions():
    """The patch is really applied: zeroing resid at (l, t) changes logits at t.. only."""
    lm, tokens, mask, clean = setup()
    t = 5
    out = run(lm, tokens, mask, {"resid": make_patch(lm.config, "resid", tokens.shape, 0, t)})
    np.testing.assert_allclose(out.logits[:, :t], clean.logits[:, :t], atol=1e-6, rtol=0)
    assert np.abs(out.logits[:, t:] - clean.logits[:, t:]).min(axis=-1).max() > 0
    assert np.abs(out.logits[:, t] - clean.logits[:, t]).max() > 1e-2


def test_embed_patch_and_batch_broadcast():
    lm, tokens, mask, clean = setup()
    embed = make_patch(lm.config, "embed", tokens.shape, None, 4, clean.captured["embed"])
    out = run(lm, tokens, mask, {"embed": embed})
    np.testing.assert_allclose(out.logits, clean.logits, atol=1e-6, rtol=0)
    # mask/value with a batch axis of 1 broadcast over the batch
    v = jnp.ones((lm.config.d_model,))
    full = make_patch(lm.config, "mlp_out", tokens.shape, 1, 2, v, add=True)
    one = SitePatch(full.mask[:, :1], full.value[:, :1], full.add)
    a, b = run(lm, tokens, mask, {"mlp_out": full}), run(lm, tokens, mask, {"mlp_out": one})
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-6, rtol=0)
    assert np.abs(a.logits - clean.logits).max() > 1e-2


def _grid(lm, tokens, corrupted):
    """One patch per (layer, position), each writing the corrupted run's resid there."""
    L, (B, T) = lm.config.n_layers, tokens.shape
    cells = [(layer, t) for layer in range(L) for t in (0, 4, 8, 11)]
    patches = [
        make_patch(lm.config, "resid", (B, T), layer, t, corrupted.captured["resid"])
        for layer, t in cells
    ]
    return cells, patches


def test_vmapped_patches_equal_loop():
    lm, tokens, mask, clean = setup()
    other = jnp.roll(tokens, 1, axis=1)  # a different input to take patch values from
    corrupted = forward_jit(lm.config, lm.params, other, mask, capture=("resid",))
    _, patches = _grid(lm, tokens, corrupted)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *patches)

    @jax.jit
    def logits_for(p):
        return forward(lm.config, lm.params, tokens, mask, patch={"resid": p}).logits

    batched = jax.vmap(logits_for)(stacked)
    looped = jnp.stack([logits_for(p) for p in patches])
    np.testing.assert_allclose(batched, looped, atol=1e-4, rtol=0)  # batched matmul order
    assert np.abs(looped - clean.logits[None]).max() > 1e-2  # the patches do something


def test_jit_equals_eager():
    lm, tokens, mask, _ = setup()
    v = jax.random.normal(jax.random.key(0), (lm.config.d_ff,))
    patch = {"mlp_key": make_patch(lm.config, "mlp_key", tokens.shape, 0, [2, 7], v, add=True)}
    kw = dict(patch=patch, capture=("resid", "mlp_out"), logit_positions=jnp.array([[11], [6]]))
    eager = forward(lm.config, lm.params, tokens, mask, **kw)
    jitted = forward_jit(lm.config, lm.params, tokens, mask, **kw)
    np.testing.assert_allclose(eager.logits, jitted.logits, atol=1e-5, rtol=0)
    for site in ("resid", "mlp_out"):
        np.testing.assert_allclose(eager.captured[site], jitted.captured[site], atol=1e-5, rtol=0)


def test_grad_through_added_value_equals_finite_difference():
    """d log p(target) / d delta, delta added at mlp_out (ROME's v*, MEND's output grads)."""
    site = "mlp_out"
    lm, tokens, mask, clean = setup()
    layer, t, target = 0, 6, 17

    def logp(delta):
        patch = {site: make_patch(lm.config, site, tokens.shape, layer, t, delta, add=True)}
        out = forward(lm.config, lm.params, tokens, mask, patch=patch)
        return jax.nn.log_softmax(out.logits[0, -1])[target]

    D = lm.config.d_model
    delta0 = 0.1 * jax.random.normal(jax.random.key(1), (D,))
    grad = jax.jit(jax.grad(logp))(delta0)
    assert grad.shape == (D,) and np.abs(grad).max() > 1e-3
    f = jax.jit(logp)
    for seed in range(3):
        u = jax.random.normal(jax.random.key(10 + seed), (D,))
        u = u / jnp.linalg.norm(u)
        eps = 1e-2
        fd = (f(delta0 + eps * u) - f(delta0 - eps * u)) / (2 * eps)
        np.testing.assert_allclose(float(grad @ u), float(fd), rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------- KV cache


def _padded(tokens, lengths, side):
    """A [B T] mask with `lengths[i]` real tokens in row i, padded on `side`."""
    B, T = tokens.shape
    mask = np.zeros((B, T), bool)
    for i, n in enumerate(lengths):
        mask[i, slice(T - n, T) if side == "left" else slice(0, n)] = True
    return mask


@pytest.mark.parametrize("family", ("llama", "gpt2", "mistral"))
@pytest.mark.parametrize("side", ("left", "right"))
def test_prefix_cached_forward_equals_full_forward(family, side):
    """forward(suffix, cache=kv(prefix)) == forward(prefix + suffix) at the suffix positions.

    The prefix buffer has S = 8 slots holding n = 1, 4 or 7 real tokens (n - 2 in row 1):
    left-padded, or ("right") real tokens first and a hole of padding before the suffix, whose
    second row is right-padded too. Shapes stay fixed, so each family compiles three programs.
    Learned positions (gpt2) and sliding windows spanning the cache (mistral) are covered.
    """
    lm, tokens, _, _ = setup(family)
    cfg, params = lm.config, lm.params
    B, T = tokens.shape
    S = 8
    prefix, suffix = tokens[:, :S], tokens[:, S:]
    s_mask = np.ones(suffix.shape, bool)
    if side == "right":
        s_mask[1, -2:] = False
    for n in (1, 4, 7):
        p_mask = _padded(prefix, [n, max(n - 2, 1)], side)
        full_mask = np.concatenate([p_mask, s_mask], 1)
        full = forward_jit(cfg, params, tokens, jnp.asarray(full_mask), capture=("resid",))
        pre = forward_jit(cfg, params, prefix, jnp.asarray(p_mask), return_kv=True)
        k, v = pre.kv
        assert k.shape == (cfg.n_layers, B, S, cfg.n_kv_heads, cfg.head_dim)
        cache = KVCache(k, v, jnp.asarray(p_mask))
        cached = forward_jit(
            cfg, params, suffix, jnp.asarray(s_mask), cache=cache, capture=("resid",)
        )
        real = s_mask[..., None]
        diff = np.abs(np.asarray(cached.logits) - np.asarray(full.logits[:, S:])) * real
        assert diff.max() <= 1e-5, f"{n} real prefix tokens: {diff.max()}"
        ref = np.asarray(full.captured["resid"][:, :, S:])
        r_diff = np.abs(cached.captured["resid"] - ref) * real[None]
        assert r_diff.max() <= 1e-5 * max(1.0, np.abs(ref).max())  # relative: resid grows


# ----------------------------------------------------------------------------- truncated forward


@pytest.mark.parametrize("n", (1, 2))
def test_truncated_forward_equals_full_capture(n):
    lm, tokens, mask, clean = setup("gpt_neox")
    out = forward_jit(lm.config, lm.params, tokens, mask, n_layers=n, capture=BLOCK_SITES)
    assert out.logits is None
    for site in BLOCK_SITES:
        assert out.captured[site].shape[0] == n
        np.testing.assert_allclose(
            out.captured[site], clean.captured[site][:n], atol=1e-6, rtol=0, err_msg=site
        )


def test_truncated_forward_rejects_bad_depth():
    lm, tokens, mask, _ = setup()
    with pytest.raises(ValueError, match="n_layers"):
        forward(lm.config, lm.params, tokens, mask, n_layers=lm.config.n_layers + 1)


@pytest.mark.parametrize("layers", [(0, 1), (1, 0), (1,)])
def test_add_to_weights_equals_per_layer_updates(layers):
    """One update of the stacked array == one `set_weight` per layer; the input is untouched."""
    params = golden_model("llama").params
    before = np.asarray(get_weight(params, "mlp_out", layers[0]))
    deltas = jax.random.normal(jax.random.key(1), (len(layers), *before.shape))
    got = add_to_weights(params, "mlp_out", layers, deltas)
    want = params
    for layer, d in zip(layers, deltas, strict=True):
        want = set_weight(want, "mlp_out", layer, get_weight(want, "mlp_out", layer) + d)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(get_weight(params, "mlp_out", layers[0])), before)
    # donated: the same numbers, written into the old stack's buffer, which is gone afterwards
    own = jax.tree.map(jnp.array, params)  # copies: the golden model stays usable
    donated = add_to_weights(own, "mlp_out", layers, deltas, donate=True)
    for a, b in zip(jax.tree.leaves(donated), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert own["blocks"]["mlp"]["down"]["kernel"].is_deleted()
    assert not own["blocks"]["mlp"]["up"]["kernel"].is_deleted()  # only the edited stack
    with pytest.raises(ValueError, match="one delta per distinct layer"):
        add_to_weights(params, "mlp_out", (1, 1), deltas[:1].repeat(2, 0))
    with pytest.raises(ValueError, match="out of range"):
        add_to_weights(params, "mlp_out", (2,), deltas[:1])
