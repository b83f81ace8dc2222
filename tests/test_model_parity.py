"""Parity with transformers' PyTorch models: committed goldens always, live when torch imports.

Goldens (`tests/goldens/<family>/`, from `scripts/make_goldens.py`): a randomly initialised tiny
HF model per family as a HF directory, plus HF's logits and `hidden_states` for an unpadded, a
left-padded and a right-padded batch. HF's `hidden_states` are [embeddings, block 1 output, ...,
block L output with the final norm applied]; ours are `embed` and the `resid` site.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_torch

from jaxedit.io.checkpoint import load
from jaxedit.models.generate import top_k
from jaxedit.models.transformer import final_norm, forward_jit

GOLDENS = Path(__file__).parent / "goldens"
FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral")
BATCHES = ("full", "left", "right")
LOGIT_TOL = 1e-4
HIDDEN_TOL = 1e-4


@functools.cache
def golden_model(family: str, dtype: str = "float32"):
    return load(GOLDENS / family, dtype=dtype)


@functools.cache
def golden(family: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDENS / family / "golden.npz"))


def make_goldens_module():
    spec = importlib.util.spec_from_file_location(
        "make_goldens", Path(__file__).parent.parent / "scripts" / "make_goldens.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours(lm, ids, mask):
    """(logits [B T V], hidden [L+1 B T D] laid out like HF's hidden_states).

    Jitted: every batch here has the same shape, so each family compiles once."""
    out = forward_jit(
        lm.config, lm.params, jnp.asarray(ids), jnp.asarray(mask), capture=("embed", "resid")
    )
    resid = out.captured["resid"]
    last = final_norm(lm.config, lm.params, resid[-1])
    hidden = jnp.concatenate([out.captured["embed"][None], resid[:-1], last[None]])
    return np.asarray(out.logits), np.asarray(hidden)


def max_diff_real(a, b, mask, batch_axis=0):
    """max |a - b| over real (unpadded) tokens only; mask [B T] broadcast from `batch_axis`."""
    m = mask.reshape((1,) * batch_axis + mask.shape + (1,) * (a.ndim - batch_axis - 2))
    return float(np.max(np.abs(a - b) * m))


@functools.cache
def ours_on_golden(family: str, batch: str):
    g = golden(family)
    return ours(golden_model(family), g[f"{batch}_ids"], g[f"{batch}_mask"])


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_golden_logits_and_hidden_states(family, batch):
    g = golden(family)
    mask = g[f"{batch}_mask"]
    logits, hidden = ours_on_golden(family, batch)
    assert logits.shape == g[f"{batch}_logits"].shape
    assert max_diff_real(logits, g[f"{batch}_logits"], mask) <= LOGIT_TOL
    assert hidden.shape == g[f"{batch}_hidden"].shape
    for layer in range(hidden.shape[0]):  # every captured resid equals HF's hidden state
        diff = max_diff_real(hidden[layer], g[f"{batch}_hidden"][layer], mask)
        assert diff <= HIDDEN_TOL, f"hidden state {layer}: max |Δ| = {diff}"


@pytest.mark.parametrize("side", ("left", "right"))
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_matches_unpadded_rows(family, side):
    """A padded row computes what its tokens alone compute (positions come from the mask).

    Row i of the padded batches holds the first n_i tokens of row i of the unpadded batch;
    by causality those tokens' logits in the unpadded run are the logits of the prefix alone.
    """
    g = golden(family)
    mask = g[f"{side}_mask"]
    padded, _ = ours_on_golden(family, side)
    full, _ = ours_on_golden(family, "full")
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        assert n < mask.shape[1] or row == 0  # the batch really is padded
        np.testing.assert_allclose(padded[row, mask[row]], full[row, :n], atol=1e-5, rtol=0)


def test_logit_positions_select_rows():
    lm, g = golden_model("llama"), golden("llama")
    ids, mask = jnp.asarray(g["left_ids"]), jnp.asarray(g["left_mask"])
    full, _ = ours_on_golden("llama", "left")
    pos = jnp.array([[11, 3], [11, 5]])
    some = forward_jit(lm.config, lm.params, ids, mask, logit_positions=pos).logits
    np.testing.assert_allclose(some, jnp.take_along_axis(full, pos[..., None], 1), atol=1e-5)


@pytest.mark.parametrize("family", ("gpt2", "llama", "qwen2"))
def test_bfloat16_params_run_and_stay_close(family):
    lm32, lm16 = golden_model(family), golden_model(family, "bfloat16")
    assert {x.dtype for x in _leaves(lm16.params)} == {jnp.dtype(jnp.bfloat16)}
    g = golden(family)
    ids, mask = g["full_ids"], g["full_mask"]
    out = forward_jit(lm16.config, lm16.params, jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32  # logits / norms / softmax in fp32 whatever the params
    logits16 = np.asarray(out.logits)
    assert np.isfinite(logits16).all()
    logits32, _ = ours(lm32, ids, mask)
    scale = np.abs(logits32).max()
    assert np.abs(logits16 - logits32).max() <= 0.05 * scale  # bf16 keeps ~3 significant digits
    p16, p32 = _softmax(logits16), _softmax(logits32)
    assert np.abs(p16 - p32).sum(-1).max() < 0.1  # total variation of the next-token distribution


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- live (torch)


@requires_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_live_parity_fresh_random_model(family, tmp_path):
    """A fresh random HF model (other seed, other inputs), saved and loaded through our loader."""
    mg = make_goldens_module()
    model = mg.random_model(family, seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    mg.byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    lm = load(tmp_path)
    for name, (ids, mask) in mg.batches(seed=1).items():
        hf_logits, hf_hidden = mg.run_hf(model, ids, mask)
        logits, hidden = ours(lm, ids, mask)
        assert max_diff_real(logits, hf_logits, mask) <= LOGIT_TOL, name
        assert max_diff_real(hidden, hf_hidden, mask, batch_axis=1) <= HIDDEN_TOL, name


# ----------------------------------------------------------------------------- embedded model


def test_embedded_model_matches_transformers(smollm):
    """transformers' p(" Paris") for the same GGUF (tests/goldens/embedded.json) within 0.005."""
    ref = json.loads((GOLDENS / "embedded.json").read_text())
    assert smollm.tokenizer.encode(ref["prompt"]) == ref["input_ids"]
    top = top_k(smollm, ref["prompt"], k=5)
    assert top[0]["token"] == ref["target"] == " Paris"
    assert top[0]["id"] == ref["target_id"]
    assert abs(top[0]["prob"] - ref["prob"]) <= 0.005
    # the rest of the head of the distribution agrees too
    for mine, theirs in zip(top[1:], ref["top"][1:5], strict=True):
        assert mine["id"] == theirs["id"]
        assert abs(mine["prob"] - theirs["prob"]) <= 0.005


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_out_of_vocab_ids_at_padded_positions_change_nothing(family):
    """Padding never injects non-finite values: whatever id sits at a masked position (here one
    far outside the vocabulary, which a lookup would embed as NaN), every real position's
    logits are the golden ones."""
    g = golden(family)
    lm = golden_model(family)
    for side in ("left", "right"):
        mask = g[f"{side}_mask"]
        ids = np.where(mask, g[f"{side}_ids"], 10**6).astype(np.int32)
        logits, _ = ours(lm, ids, mask)
        assert np.isfinite(logits).all()
        assert max_diff_real(logits, g[f"{side}_logits"], mask) <= LOGIT_TOL
