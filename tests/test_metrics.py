"""Teacher-forced scoring on hand-built logits, the leading-space rule, a context edit's
scores, and the metric formulas on hand-computed examples of their published definitions."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.edits import ContextEdit, apply
from jaxedit.errors import InputError
from jaxedit.eval import metrics, scoring

V = 8


def bigram_table() -> np.ndarray:
    """logits[prev token] = log of a known next-token distribution (a different one per token)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(V), size=V)
    return np.log(probs)


def bigram_scorer(table: np.ndarray):
    """A 'model' whose next-token logits depend only on the current token (hand-checkable)."""
    t = jnp.asarray(table)
    return scoring.logits_scorer(lambda tokens, mask: t[tokens])


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
    s = scoring.score_ids(
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
    rows = scoring.share_rows([c[0] for c in SHARED], [c[1] for c in SHARED])
    assert rows == [(1, [0, 2, 5]), (3, [4]), (6, [])]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_shared_rows_score_like_separate_rows(padding):
    """Targets read off another query's row equal their own hand-computed scores."""
    table = bigram_table()
    ps, ts = [c[0] for c in SHARED], [c[1] for c in SHARED]
    s = scoring.score_ids(bigram_scorer(table), ps, ts, padding=padding, max_rows=8)
    for i, (p, t) in enumerate(SHARED):
        lps, correct = by_hand(table, p, t)
        np.testing.assert_allclose(s.logprobs[i], lps, rtol=1e-5)
        np.testing.assert_array_equal(s.correct[i], correct)


def test_pack_extra_targets_read_at_the_prompts_last_token():
    pk = scoring.pack([[1, 2, 3]], [[4, 5]], extra=[[6, 7]], padding="right")
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
    s = scoring.score_ids(bigram_scorer(table), [prompt], [target])
    assert s.exact[0] and s.token_acc[0] == 1.0


def test_batching_does_not_change_scores():
    """Chunked into small batches (with filler rows) == one batch == one at a time."""
    table = bigram_table()
    sc = bigram_scorer(table)
    ps, ts = [c[0] for c in CASES], [c[1] for c in CASES]
    full = scoring.score_ids(sc, ps, ts)
    chunked = scoring.score_ids(sc, ps, ts, max_rows=3)
    for i in range(len(CASES)):
        one = scoring.score_ids(sc, [ps[i]], [ts[i]], padding="left")
        np.testing.assert_allclose(full.logprobs[i], chunked.logprobs[i], rtol=1e-6)
        np.testing.assert_allclose(full.logprobs[i], one.logprobs[0], rtol=1e-6)


def test_pack_layout():
    pk = scoring.pack([[1, 2, 3]], [[4, 5]], padding="left", pad_id=0, rows=2)
    T = pk.tokens.shape[1]
    # the last target token is not fed; the first target is predicted at the prompt's last token
    np.testing.assert_array_equal(pk.tokens[0, T - 4 :], [1, 2, 3, 4])
    assert pk.positions[0, 0] == T - 2 and pk.positions[0, 1] == T - 1
    assert pk.target_mask[0, :2].all() and not pk.target_mask[0, 2:].any()
    assert not pk.target_mask[1].any()  # filler row
    assert pk.mask[1].sum() == 4  # ... that is still a valid sequence


def test_leading_space_rule():
    assert scoring.split_query("The capital is", "Paris") == ("The capital is", " Paris")
    assert scoring.split_query("The capital is ", "Paris") == ("The capital is", " Paris")
    assert scoring.split_query("Q: x?\nA:", " Paris") == ("Q: x?\nA:", " Paris")
    with pytest.raises(InputError):
        scoring.continuation("  ")


def test_target_merging_with_prompt_is_tokenized_apart(smollm):
    """A prompt ending in a space: on its own, 'The capital is ' ends with a ' ' token, but
    joined with the target that space merges into ' Paris'. We score encode(' Paris') after
    the prompt without its trailing space (what the joint text tokenizes to)."""
    tok = smollm.tokenizer
    p_ids, t_ids = scoring.encode_queries(tok, ["The capital is "], ["Paris"])
    assert t_ids[0] == tok.encode_continuation(" Paris")
    assert p_ids[0] == tok.encode("The capital is")
    # The naive layout (prompt with its space, then the target) would differ:
    assert tok.encode("The capital is ")[-1] != p_ids[0][-1]
    assert tok.encode("The capital is Paris") == p_ids[0] + t_ids[0]


def test_score_targets_on_model(smollm):
    """Real model: batched (both paddings) == one at a time; matches the next-token prob."""
    from jaxedit.models.generate import next_token_logprobs

    prompts = ["The Eiffel Tower is located in the city of", "The capital of Germany is "]
    targets = ["Paris", "Berlin and Bonn"]
    right = scoring.score_targets(smollm, prompts, targets)
    left = scoring.score_targets(smollm, prompts, targets, padding="left")
    for i in range(2):
        one = scoring.score_targets(smollm, [prompts[i]], [targets[i]])
        np.testing.assert_allclose(right.logprobs[i], one.logprobs[0], atol=2e-4)
        np.testing.assert_allclose(left.logprobs[i], one.logprobs[0], atol=2e-4)
    lp = float(next_token_logprobs(smollm, [prompts[0]])[0, right.target_ids[0][0]])
    assert right.logprobs[0][0] == pytest.approx(lp, abs=2e-4)
    assert len(right.target_ids[1]) > 1  # multi-token target


def test_context_edit_scores_as_the_joined_text(smollm):
    """A model carrying a context edit scores exactly `context + prompt` on the plain model
    (the context runs once into a KV cache; the joined text is scored in full)."""
    lm2 = apply(smollm, ContextEdit(("The Eiffel Tower is located in the city of Rome",), (), 16))
    prompts = ["The Eiffel Tower is located in the city of", "The capital of Germany is "]
    targets = ["Rome", "Berlin and Bonn"]
    ctx = scoring.score_targets(lm2, prompts, targets)
    text = lm2.context_text()
    assert text.endswith("Prompt: ") and text.count("Prompt:") == 1
    full = scoring.score_targets(smollm, [text + p for p in prompts], targets)
    for a, b in zip(ctx.logprobs, full.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)
    plain = scoring.score_targets(smollm, prompts[:1], targets[:1])
    assert ctx.nll[0] < plain.nll[0]  # the new fact in context makes " Rome" likelier


# ----------------------------------------------------------------------------- formulas


def nll(*probs: float) -> np.ndarray:
    """Mean token NLLs whose P = exp(-nll) are the given probabilities."""
    return -np.log(np.array(probs))


def test_counterfact_scores_by_hand():
    """ROME §3.2: ES/PS = mean 1[P(new) > P(true)], EM = mean P(new) - P(true); NS/NM swap."""
    new, true = nll(0.5, 0.2, 0.3), nll(0.25, 0.4, 0.3)  # wins, loses, ties
    assert metrics.efficacy_score(new, true) == pytest.approx(1 / 3)  # a tie is no success
    assert metrics.efficacy_magnitude(new, true) == pytest.approx((0.25 - 0.2 + 0.0) / 3)
    assert metrics.neighborhood_score(new, true) == pytest.approx(1 / 3)
    assert metrics.neighborhood_magnitude(new, true) == pytest.approx((-0.25 + 0.2) / 3)


def test_harmonic_score_by_hand():
    """MEMIT's Score = hmean(ES, PS, NS): hmean(1, 1/2, 1/2) = 3 / (1 + 2 + 2)."""
    assert metrics.harmonic_score(1.0, 0.5, 0.5) == pytest.approx(0.6)
    assert metrics.harmonic_score(0.9, 0.9, 0.9) == pytest.approx(0.9)
    assert metrics.harmonic_score(1.0, 0.0, 0.5) == 0.0


def test_token_accuracy_exact_and_locality():
    assert metrics.token_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    assert metrics.exact_match(np.array([7, 8]), np.array([7, 8]))
    assert not metrics.exact_match(np.array([7, 8]), np.array([7, 9]))
    assert metrics.locality_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        metrics.locality_agreement(np.array([1]), np.array([1, 2]))
    with pytest.raises(ValueError):
        metrics.token_accuracy(np.array([], int), np.array([], int))


def test_ngram_entropy_by_hand():
    """(2/3 H_2 + 4/3 H_3) / 2 in bits, H_n the entropy of the text's word n-grams."""
    # a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert metrics.ngram_entropy("a b a b") == pytest.approx(((2 / 3) * h2 + 4 / 3) / 2)
    # one word repeated: a single bigram and a single trigram -> 0 bits
    assert metrics.ngram_entropy("rome " * 30) == 0.0
    # 12 distinct words: 11 equiprobable bigrams, 10 trigrams -> log2 11, log2 10
    varied = "one two three four five six seven eight nine ten eleven twelve"
    expected = ((2 / 3) * math.log2(11) + (4 / 3) * math.log2(10)) / 2
    assert metrics.ngram_entropy(varied) == pytest.approx(expected)
    assert metrics.fluency([varied, "rome " * 30]) == pytest.approx(expected / 2)
    assert metrics.word_tokens("Paris, France.") == ["Paris", ",", "France", "."]


def test_tfidf_as_scikit_learn_by_hand():
    """idf = ln((1 + N) / (1 + df)) + 1, raw counts, L2 norm; tokens of 2+ word characters."""
    tf = metrics.TfIdf.fit(["the cat sat", "the dog sat", "the cat ran a mile"])
    idf = lambda df: math.log(4 / (1 + df)) + 1
    assert tf.idf[tf.vocab["the"]] == pytest.approx(1.0)  # in every document
    assert tf.idf[tf.vocab["cat"]] == pytest.approx(idf(2))
    assert "a" not in tf.vocab  # one-character words are not tokens
    v = tf.vector("The cat, the CAT")  # counts: the 2, cat 2 (lower-cased)
    w = np.array([2 * 1.0, 2 * idf(2)])
    np.testing.assert_allclose(v[[tf.vocab["the"], tf.vocab["cat"]]], w / np.linalg.norm(w))
    sim = tf.similarity("cat", "the cat")  # cos([0, c], [1, c]) = c / sqrt(1 + c^2)
    assert sim == pytest.approx(idf(2) / math.sqrt(1 + idf(2) ** 2))


def test_consistency_identical_and_disjoint():
    tf = metrics.TfIdf.fit(["paris is the capital of france", "berlin is in germany"])
    assert metrics.consistency(tf, ["paris france"], ["paris", "france"]) == pytest.approx(1.0)
    assert metrics.consistency(tf, ["paris france"], ["berlin germany"]) == 0.0
    assert metrics.consistency(tf, ["zzz"], ["paris"]) == 0.0  # no vocabulary word
    with pytest.raises(InputError):
        metrics.consistency(tf, ["paris"], [])
    with pytest.raises(InputError):
        metrics.TfIdf.fit(["", "  "])
