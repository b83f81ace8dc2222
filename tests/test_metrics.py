"""Teacher-forced scoring on hand-built logits, the leading-space rule, and metric formulas."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.errors import InputError
from jaxedit.eval import scoring as metrics

V = 8


def bigram_table() -> np.ndarray:
    """logits[prev token] = log of a known next-token distribution (a different one per token)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(V), size=V)
    return np.log(probs)


def bigram_scorer(table: np.ndarray):
    """A 'model' whose next-token logits depend only on the current token (hand-checkable)."""
    t = jnp.asarray(table)
    return metrics.logits_scorer(lambda tokens, mask: t[tokens])


def by_hand(table, prompt, target):
    """log p(target_j | ..., previous token) from the table, and the argmax-correct flags."""
    prev = [prompt[-1], *target[:-1]]
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    lps = np.array([logp[p, t] for p, t in zip(prev, target, strict=True)])
    correct = np.array([int(np.argmax(table[p])) == t for p, t in zip(prev, target, strict=True)])
    return lps, correct


CASES = [  # (prompt ids, target ids): multi-token targets of different lengths
    ([1, 2, 3], [4, 5, 6]),
    ([7], [0]),
    ([2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [1, 3]),
    ([5, 6], [7, 7, 7, 7, 7]),
]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_scores_match_hand_computation(padding):
    table = bigram_table()
    s = metrics.score_ids(
        bigram_scorer(table), [c[0] for c in CASES], [c[1] for c in CASES], padding=padding
    )
    for i, (p, t) in enumerate(CASES):
        lps, correct = by_hand(table, p, t)
        np.testing.assert_allclose(s.logprobs[i], lps, rtol=1e-5)
        np.testing.assert_array_equal(s.correct[i], correct)
        assert s.nll[i] == pytest.approx(-lps.mean(), rel=1e-5)
        assert s.prob[i] == pytest.approx(math.exp(lps.mean()), rel=1e-5)
        assert s.token_acc[i] == pytest.approx(correct.mean())
        assert s.exact[i] == correct.all()


SHARED = [  # one prompt asked for several targets (CounterFact: target_new and target_true)
    ([1, 2, 3], [4]),
    ([1, 2, 3], [5, 6]),
    ([1, 2, 3], [6]),
    ([7], [0]),
    ([7], [1]),
    ([1, 2, 3], [4]),  # a duplicate
    ([2, 3], [7]),
]


def test_share_rows_groups_one_token_targets_by_prompt():
    rows = metrics.share_rows([c[0] for c in SHARED], [c[1] for c in SHARED])
    assert rows == [(1, [0, 2, 5]), (3, [4]), (6, [])]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_shared_rows_score_like_separate_rows(padding):
    """Targets read off another query's row equal their own hand-computed scores."""
    table = bigram_table()
    ps, ts = [c[0] for c in SHARED], [c[1] for c in SHARED]
    s = metrics.score_ids(bigram_scorer(table), ps, ts, padding=padding, max_rows=8)
    for i, (p, t) in enumerate(SHARED):
        lps, correct = by_hand(table, p, t)
        np.testing.assert_allclose(s.logprobs[i], lps, rtol=1e-5)
        np.testing.assert_array_equal(s.correct[i], correct)


def test_pack_extra_targets_read_at_the_prompts_last_token():
    pk = metrics.pack([[1, 2, 3]], [[4, 5]], extra=[[6, 7]], padding="right")
    np.testing.assert_array_equal(pk.positions[0, :4], [2, 3, 2, 2])
    np.testing.assert_array_equal(pk.targets[0, :4], [4, 5, 6, 7])
    assert pk.target_mask[0, :4].all() and not pk.target_mask[0, 4:].any()


def test_argmax_target_is_exact():
    """A target built from the table's own argmaxes scores exact = 1, token_acc = 1."""
    table = bigram_table()
    prompt, target = [3], []
    cur = prompt[-1]
    for _ in range(4):
        cur = int(np.argmax(table[cur]))
        target.append(cur)
    s = metrics.score_ids(bigram_scorer(table), [prompt], [target])
    assert s.exact[0] and s.token_acc[0] == 1.0


def test_batching_does_not_change_scores():
    """Chunked into small batches (with filler rows) == one batch == one at a time."""
    table = bigram_table()
    sc = bigram_scorer(table)
    ps, ts = [c[0] for c in CASES], [c[1] for c in CASES]
    full = metrics.score_ids(sc, ps, ts)
    chunked = metrics.score_ids(sc, ps, ts, max_rows=3)
    for i in range(len(CASES)):
        one = metrics.score_ids(sc, [ps[i]], [ts[i]], padding="left")
        np.testing.assert_allclose(full.logprobs[i], chunked.logprobs[i], rtol=1e-6)
        np.testing.assert_allclose(full.logprobs[i], one.logprobs[0], rtol=1e-6)


def test_pack_layout():
    pk = metrics.pack([[1, 2, 3]], [[4, 5]], padding="left", pad_id=0, rows=2)
    T = pk.tokens.shape[1]
    # the last target token is not fed; the first target is predicted at the prompt's last token
    np.testing.assert_array_equal(pk.tokens[0, T - 4 :], [1, 2, 3, 4])
    assert pk.positions[0, 0] == T - 2 and pk.positions[0, 1] == T - 1
    assert pk.target_mask[0, :2].all() and not pk.target_mask[0, 2:].any()
    assert not pk.target_mask[1].any()  # filler row
    assert pk.mask[1].sum() == 4  # ... that is still a valid sequence


def test_leading_space_rule():
    assert metrics.split_query("The capital is", "Paris") == ("The capital is", " Paris")
    assert metrics.split_query("The capital is ", "Paris") == ("The capital is", " Paris")
    assert metrics.split_query("Q: x?\nA:", " Paris") == ("Q: x?\nA:", " Paris")
    with pytest.raises(InputError):
        metrics.continuation("  ")


def test_target_merging_with_prompt_is_tokenized_apart(smollm):
    """A prompt ending in a space: on its own, 'The capital is ' ends with a ' ' token, but
    joined with the target that space merges into ' Paris'. We score encode(' Paris') after
    the prompt without its trailing space (what the joint text tokenizes to)."""
    tok = smollm.tokenizer
    p_ids, t_ids = metrics.encode_queries(tok, ["The capital is "], ["Paris"])
    assert t_ids[0] == tok.encode_continuation(" Paris")
    assert p_ids[0] == tok.encode("The capital is")
    # The naive layout (prompt with its space, then the target) would differ:
    assert tok.encode("The capital is ")[-1] != p_ids[0][-1]
    assert tok.encode("The capital is Paris") == p_ids[0] + t_ids[0]


def test_with_prefix_prepends_prefix_ids(smollm):
    tok = smollm.tokenizer
    p_ids, _ = metrics.encode_queries(tok, ["The capital is"], ["Paris"])
    out = metrics.with_prefix(tok, "New fact: x.\n", p_ids, ["The capital is"])
    assert out[0][: len(tok.encode("New fact: x.\n"))] == tok.encode("New fact: x.\n")
    assert out[0][-len(p_ids[0]) :] == p_ids[0]


def test_score_targets_on_model(smollm):
    """Real model: batched (both paddings) == one at a time; matches the next-token prob."""
    from jaxedit.models.generate import next_token_logprobs

    prompts = ["The Eiffel Tower is located in the city of", "The capital of Germany is "]
    targets = ["Paris", "Berlin and Bonn"]
    right = metrics.score_targets(smollm, prompts, targets)
    left = metrics.score_targets(smollm, prompts, targets, padding="left")
    for i in range(2):
        one = metrics.score_targets(smollm, [prompts[i]], [targets[i]])
        np.testing.assert_allclose(right.logprobs[i], one.logprobs[0], atol=2e-4)
        np.testing.assert_allclose(left.logprobs[i], one.logprobs[0], atol=2e-4)
    lp = float(next_token_logprobs(smollm, [prompts[0]])[0, right.target_ids[0][0]])
    assert right.logprobs[0][0] == pytest.approx(lp, abs=2e-4)
    assert len(right.target_ids[1]) > 1  # multi-token target


def test_prefix_changes_scores(smollm):
    p, t = ["The Eiffel Tower is located in the city of"], ["Rome"]
    plain = metrics.score_targets(smollm, p, t)
    ctx = metrics.score_targets(
        smollm, p, t, prefix="New fact: The Eiffel Tower is located in the city of Rome.\n"
    )
    assert ctx.nll[0] < plain.nll[0]


# ----------------------------------------------------------------------------- formulas


def test_counterfact_formulas():
    new, true = np.array([1.0, 3.0, 2.0]), np.array([2.0, 1.0, 2.0])
    assert metrics.efficacy_score(new, true) == pytest.approx(1 / 3)  # tie is not a success
    em = np.mean(np.exp(-new) - np.exp(-true))
    assert metrics.efficacy_magnitude(new, true) == pytest.approx(em)
    assert metrics.neighborhood_score(new, true) == pytest.approx(1 / 3)
    assert metrics.neighborhood_magnitude(new, true) == pytest.approx(-em)
    assert metrics.harmonic_score(1.0, 0.5, 0.5) == pytest.approx(3 / (1 + 2 + 2))
    assert metrics.harmonic_score(1.0, 0.0, 0.5) == 0.0


def test_locality_agreement():
    assert metrics.locality_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        metrics.locality_agreement(np.array([1]), np.array([1, 2]))


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    expected = ((2 / 3) * h2 + (4 / 3) * 1.0) / 2
    assert metrics.ngram_entropy("a b a b") == pytest.approx(expected)
    assert metrics.fluency(["a b a b", "a b a b"]) == pytest.approx(expected)
    # repetition lowers fluency
    assert metrics.ngram_entropy("the cat " * 20) < metrics.ngram_entropy(
        "one two three four five six seven eight nine ten eleven twelve"
    )


def test_tfidf_consistency():
    corpus = ["paris is the capital of france", "berlin is in germany", "rome is old"] * 3
    tf = metrics.TfIdf.fit(corpus)
    assert tf.similarity("paris france", "paris france") == pytest.approx(1.0)
    assert tf.similarity("paris france", "berlin germany") == pytest.approx(0.0)
    mid = metrics.consistency(tf, ["paris is nice"], ["paris is the capital"])
    assert 0 < mid < 1
    with pytest.raises(InputError):
        metrics.TfIdf.fit(["", "  "])
