"""KV-cached prefix scoring equals full recomputation (left/right padding, several prefixes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import prefix_cache
from jaxedit.errors import InputError
from jaxedit.model import forward_jit

PREFIX = (
    "New Fact: The Eiffel Tower is located in Rome\nPrompt: The Eiffel Tower is in Rome\n\n"
    "New Fact: Danielle Darrieux's mother tongue is English\nPrompt: Danielle Darrieux "
    "spoke English\n\nNew Fact: Toko Yasuda plays the piano\nPrompt:"
)
QUERIES = [
    (" The Eiffel Tower is located in", " Rome"),
    (" Where is the Eiffel Tower? It is in", " the city of Paris"),
    (" The mother tongue of Danielle Darrieux is", " French"),
    (" Toko Yasuda, the", " guitar"),
    (" Berlin is the capital of", " Germany"),
]


def _ids(lm, n_prefix: int):
    tok = lm.tokenizer
    head = tok.encode(PREFIX)[:n_prefix]
    prompts = [tok.encode_continuation(p) for p, _ in QUERIES]
    targets = [tok.encode_continuation(t) for _, t in QUERIES]
    return head, prompts, targets


@pytest.mark.parametrize(
    "n_prefix,padding", [(1, "left"), (6, "right"), (40, "left"), (40, "right")]
)
def test_cached_equals_recomputed(smollm, n_prefix, padding):
    """|Δ log p| ≤ 1e-5 · max(1, |log p|): the fp32 floor of this 30-layer model. Full
    recomputation alone moves log-probs by up to ~2e-5 absolute (≈ 5e-6 relative) when only
    the batch size changes (8 rows vs 1), so an absolute 1e-5 would test float noise."""
    head, prompts, targets = _ids(smollm, n_prefix)
    assert len(head) == n_prefix
    lp_c, am_c = prefix_cache.score_continuations(smollm, head, prompts, targets, padding=padding)
    lp_f, am_f = prefix_cache.score_continuations(
        smollm, head, prompts, targets, padding=padding, use_cache=False
    )
    for a, b, x, y, t in zip(lp_c, lp_f, am_c, am_f, targets, strict=True):
        assert a.shape == (len(t),)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(x, y)


def test_recomputed_matches_unpadded_forward(smollm):
    """The reference itself: one unpadded sequence through the plain forward."""
    head, prompts, targets = _ids(smollm, 40)
    lp, am = prefix_cache.score_continuations(smollm, head, prompts, targets)
    for i in (0, 3):
        seq = head + prompts[i] + targets[i]
        logits = forward_jit(smollm.config, smollm.params, jnp.asarray([seq])).logits[0]
        logp = jax.nn.log_softmax(logits, -1)
        start = len(head) + len(prompts[i]) - 1
        want = [float(logp[start + j, t]) for j, t in enumerate(targets[i])]
        np.testing.assert_allclose(lp[i], want, atol=1e-4)
        assert list(am[i]) == [int(jnp.argmax(logits[start + j])) for j in range(len(targets[i]))]


def test_row_chunks_share_the_prefix(smollm):
    """Fewer rows per call than queries (memory cap) gives the same numbers."""
    head, prompts, targets = _ids(smollm, 6)
    lp_a, _ = prefix_cache.score_continuations(smollm, head, prompts, targets)
    lp_b, _ = prefix_cache.score_continuations(smollm, head, prompts, targets, max_rows=2)
    for a, b in zip(lp_a, lp_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bad_input(smollm):
    head, prompts, targets = _ids(smollm, 6)
    with pytest.raises(InputError):
        prefix_cache.encode_prefix(smollm, [])
    with pytest.raises(InputError):
        prefix_cache.score_continuations(smollm, head, [[]], [targets[0]])
    with pytest.raises(InputError):
        prefix_cache.score_continuations(smollm, head, prompts, targets[:2])
    with pytest.raises(InputError):
        prefix_cache.encode_prefix(smollm, [1] * (smollm.config.max_positions + 1))
    assert prefix_cache.score_continuations(smollm, head, [], []) == ([], [])
