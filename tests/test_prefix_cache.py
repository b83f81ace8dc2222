"""KV-cached prefix scoring equals full recomputation (left/right padding, several prefixes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.errors import InputError
from jaxedit.eval import prefix_cache
from jaxedit.models.transformer import forward_jit

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


# ----------------------------------------------------------------------------- metrics' prefix path

CONTEXTS = [
    "New Fact: Rome\nPrompt: ",  # short, ends in a space (IKE's layout)
    PREFIX + " ",
    PREFIX.replace("Prompt:", "Prompt:\n") * 2,  # longer, ends in a newline
]


@pytest.mark.parametrize("ctx,padding", [(0, "left"), (1, "right"), (2, "left"), (2, "right")])
def test_metrics_prefix_uses_cache_and_matches_full_rows(smollm, ctx, padding):
    from jaxedit.eval import scoring as metrics

    prefix = CONTEXTS[ctx]
    prompts = [p.strip() for p, _ in QUERIES]
    targets = [t.strip() for _, t in QUERIES]
    cached = metrics.score_targets(smollm, prompts, targets, prefix=prefix, padding=padding)
    p_ids, t_ids = metrics.encode_queries(smollm.tokenizer, prompts, targets)
    rows = metrics.with_prefix(smollm.tokenizer, prefix, p_ids, prompts)
    full = metrics.score_ids(metrics.lm_scorer(smollm), rows, t_ids, padding=padding)
    # Rows here are laid out differently from the full rows (T buckets, batch shapes), which
    # alone moves fp32 log-probs by a few 1e-5 (benchmarks/results/ike.json, "noise_floor").
    for a, b in zip(cached.logprobs, full.logprobs, strict=True):
        # Seen up to 7.6e-5 absolute on a log-prob of -2.5 (3e-5 relative) for one layout.
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    for a, b in zip(cached.argmax, full.argmax, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prefix_trailing_space_joins_like_the_text(smollm):
    """ "…Prompt: " + "The X" is tokenized as the joined text: no lone " " token."""
    from jaxedit.eval import scoring as metrics

    tok = smollm.tokenizer
    prefix, prompt = "New Fact: The Eiffel Tower is in Rome\nPrompt: ", "The Eiffel Tower is in"
    p_ids, _ = metrics.encode_queries(tok, [prompt], ["Rome"])
    (row,) = metrics.with_prefix(tok, prefix, p_ids, [prompt])
    assert row == tok.encode(prefix + prompt)
    assert tok.encode(" ")[-1] not in row
