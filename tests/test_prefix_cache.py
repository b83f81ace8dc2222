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


# ----------------------------------------------------------------------------- context text


CONTEXTS = [
    "New Fact: Rome\nPrompt: ",  # short, ends in a space (IKE's layout)
    PREFIX + " ",
    PREFIX.replace("Prompt:", "Prompt:\n") * 2,  # longer, ends in a newline
]


@pytest.mark.parametrize("ctx", range(len(CONTEXTS)))
def test_split_context_equals_the_joined_text(smollm, ctx):
    """prefix ⊕ body are the ids of `context + prompt` (no lone " " token), and the cached
    scores of a target after them equal the plain forward over the joined text."""
    tok = smollm.tokenizer
    context = CONTEXTS[ctx]
    prompts = [p.strip() for p, _ in QUERIES]
    head, bodies = prefix_cache.split_context(tok, context, prompts)
    for p, body in zip(prompts, bodies, strict=True):
        assert head + body == tok.encode(context + p)
    assert tok.encode(" ")[-1] not in head + bodies[0]
    # One query, laid out in one fixed width so that every context shares one compile.
    target = tok.encode_continuation(QUERIES[0][1])
    (lp,), _ = prefix_cache.score_continuations(smollm, head, bodies[:1], [target], padding="left")
    seq = tok.encode(context + prompts[0]) + target
    tokens, mask = np.zeros((1, 256), np.int32), np.zeros((1, 256), bool)
    tokens[0, : len(seq)], mask[0, : len(seq)] = seq, True
    logits = forward_jit(smollm.config, smollm.params, tokens, mask).logits[0]
    logp = jax.nn.log_softmax(logits, -1)
    start = len(head) + len(bodies[0]) - 1
    want = [float(logp[start + j, t]) for j, t in enumerate(target)]
    np.testing.assert_allclose(lp, want, atol=1e-4)


def test_fitted_context(smollm):
    from jaxedit.edits import ContextEdit, Demonstration, apply

    assert prefix_cache.fitted_context(smollm) is None
    demo = Demonstration("copy", "New Fact: a\nPrompt: a\n\n", 0.1)
    lm = apply(smollm, ContextEdit(("b",), (demo,), reserve_tokens=10))
    full = "New Fact: a\nPrompt: a\n\nNew Fact: b\nPrompt: "
    assert prefix_cache.fitted_context(lm, 10) == lm.context_text() == full
    # a follow-up that leaves no room for the demonstration drops it, never the fact
    room = smollm.config.max_positions - len(smollm.tokenizer.encode("New Fact: b\nPrompt: "))
    assert prefix_cache.fitted_context(lm, room) == "New Fact: b\nPrompt: "
    with pytest.raises(InputError):
        prefix_cache.fitted_context(lm, room + 1)
