"""The editing metrics of the literature as pure formulas (numpy only; no model, no JAX).

Every function takes numbers the scoring engine (`jaxedit.eval.scoring`) or the generator
(`jaxedit.eval.generation`) produced and returns a metric; its docstring gives the formula and
its source. Values are fractions in [0, 1] (the papers' tables multiply by 100), except
fluency (bits). "P(x)" is exp(-mean token NLL) of continuation x, teacher forced;
comparisons are strict, as in ROME.

Names in results.json, what they measure, and where the definition comes from:

- `efficacy_score` / `paraphrase_score`: mean 1[P(new) > P(true)] on the rewrite / paraphrase
  prompts (ROME "ES" / "PS"); `*_magnitude`: mean P(new) - P(true) (ROME "EM" / "PM").
- `neighborhood_score`: mean 1[P(true) > P(new)] on neighbours (ROME "NS");
  `neighborhood_magnitude`: mean P(true) - P(new) (ROME "NM").
- `score`: hmean(ES, PS, NS) (MEMIT "Score").
- `efficacy_acc`, `paraphrase_acc`, `neighborhood_acc`: every target token is the argmax
  (MEMIT `*_prompts_correct`).
- `reliability`, `generalization`, `specificity_acc`, `portability`, `reverse`: teacher-forced
  token accuracy of the expected answer (EasyEdit `rewrite_acc` / `rephrase_acc` /
  `portability`; ROME zsRE "Efficacy" / "Paraphrase" / "Specificity").
- `locality`: fraction of a neighbour's answer positions whose argmax the edit leaves
  unchanged (EasyEdit `locality`).
- `fluency`: mean over generations of (2/3 H_2 + 4/3 H_3) / 2, bits (ROME `ngram_entropy`).
- `consistency`: cos(tfidf(generations), tfidf(reference snippets)) (ROME `reference_score`).
- `*_gen` (`efficacy_gen`, `paraphrase_gen`, `neighborhood_gen`, `specificity_gen`,
  `portability_gen`, `reverse_gen`): the fraction of prompts whose greedy continuation begins
  with the expected answer (`generated_match`), what the model actually says rather than how
  it ranks a forced answer ("The Mirage of Model Editing", Yang et al. 2025: teacher-forced
  accuracy overstates editing success); `locality_gen`: the fraction of neighbour prompts whose
  continuation the edit leaves unchanged (`normalize_answer` of both).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxedit.errors import InputError

# ----------------------------------------------------------------------------- CounterFact


def efficacy_score(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """ES = mean over prompts of 1[P(new) > P(true)], i.e. NLL_true > NLL_new (strict).

    Source: Meng et al. 2022 (ROME) §3.2; kmeng01/rome `experiments/summarize.py`
    (`rewrite_success`: target_true > target_new in NLL, per case over its prompts). On
    paraphrase prompts this is ROME's "PS" (`paraphrase_success`).
    """
    return float(np.mean(np.asarray(nll_true) > np.asarray(nll_new)))


def efficacy_magnitude(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """EM = mean over prompts of P(new) - P(true), P = exp(-mean token NLL).

    Source: ROME `summarize.py` (`rewrite_diff`: exp(-target_new) - exp(-target_true)).
    On paraphrase prompts ROME's "PM" (`paraphrase_diff`).
    """
    return float(np.mean(np.exp(-np.asarray(nll_new)) - np.exp(-np.asarray(nll_true))))


def neighborhood_score(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """NS = mean over neighbourhood prompts of 1[P(true) > P(new)] (strict).

    CounterFact's neighbours share the case's true object, so the edit should leave them
    preferring it. Source: ROME `summarize.py` (`neighborhood_success`: target_true <
    target_new in NLL).
    """
    return float(np.mean(np.asarray(nll_true) < np.asarray(nll_new)))


def neighborhood_magnitude(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """NM = mean over neighbourhood prompts of P(true) - P(new) (ROME `neighborhood_diff`)."""
    return float(np.mean(np.exp(-np.asarray(nll_true)) - np.exp(-np.asarray(nll_new))))


def harmonic_score(efficacy: float, paraphrase: float, neighborhood: float) -> float:
    """S = 3 / (1/ES + 1/PS + 1/NS), each already averaged over cases (MEMIT `summarize.py`,
    `hmean` of the three success rates). A zero component gives 0 (scipy's convention)."""
    xs = [efficacy, paraphrase, neighborhood]
    if any(x <= 0 for x in xs):
        return 0.0
    return float(len(xs) / sum(1.0 / x for x in xs))


# ----------------------------------------------------------------------------- token accuracy


def token_accuracy(argmax: np.ndarray, targets: np.ndarray) -> float:
    """acc = (1/n) Σ_j 1[argmax_j = y_j] over the n target tokens, teacher forced.

    Source: EasyEdit `evaluate_utils.test_prediction_acc` (reliability / generalization /
    portability); ROME `eval_utils_zsre.py` (zsRE efficacy / paraphrase / specificity).
    """
    argmax, targets = np.asarray(argmax), np.asarray(targets)
    if argmax.shape != targets.shape or argmax.size == 0:
        raise ValueError(f"argmax {argmax.shape} and targets {targets.shape} must match, non-empty")
    return float(np.mean(argmax == targets))


def exact_match(argmax: np.ndarray, targets: np.ndarray) -> bool:
    """1[argmax_j = y_j for every target token j] (MEMIT `eval_utils_counterfact`,
    `*_prompts_correct`: the model's greedy continuation is the whole target)."""
    return token_accuracy(argmax, targets) == 1.0


def locality_agreement(pre_argmax: np.ndarray, post_argmax: np.ndarray) -> float:
    """Locality = (1/n) Σ_j 1[argmax_post_j = argmax_pre_j] on a neighbour's answer positions.

    Both argmaxes are taken teacher forced on the same tokens (prompt + true answer), before
    and after the edit. Source: EasyEdit `compute_locality_quality` + `summary_metrics`
    (mean of `np.equal(pre, post)`).
    """
    pre, post = np.asarray(pre_argmax), np.asarray(post_argmax)
    if pre.shape != post.shape:
        raise ValueError("pre/post argmax shapes differ")
    return float(np.mean(pre == post))


# ----------------------------------------------------------------------------- generated answers

_ARTICLE = re.compile(r"^(?:the|a|an) ")


def normalize_answer(text: str) -> str:
    """Text as compared for the `*_gen` metrics: accents removed (NFKD, combining marks
    dropped), lower case, every punctuation mark a space, whitespace collapsed, one leading
    article (the / a / an) dropped.

    SQuAD's answer normalisation (Rajpurkar et al. 2016, `normalize_answer`: lower case, no
    punctuation, no articles, single spaces), except that punctuation separates words instead
    of vanishing ("English-speaking" -> "english speaking", so the answer "English" is a whole
    word of it) and only a leading article goes (a prefix test needs no more).
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = " ".join(re.sub(r"[\W_]+", " ", text).split())
    return _ARTICLE.sub("", text)


def generated_match(continuation: str, answers: Sequence[str]) -> bool:
    """1[the continuation begins with one of the answers], both `normalize_answer`ed, the
    answer ending at a word boundary ("Paris, France" matches "Paris"; "Parisian" does not).

    An answer that normalises to nothing (only punctuation) never matches. Source of the idea:
    generation-based success in "The Mirage of Model Editing" (Yang et al. 2025), with the
    SQuAD normalisation above instead of their LLM judge.
    """
    c = normalize_answer(continuation)
    for a in answers:
        n = normalize_answer(a)
        if n and (c == n or c.startswith(n + " ")):
            return True
    return False


# ----------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks: a regex stand-in for `nltk.word_tokenize` (which ROME
    uses; nltk is not a dependency). They differ on contractions ("don't": nltk "do", "n't")."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: (1/|ns|) Σ_n w_n H_n,  H_n = -Σ_g f_g log2 f_g,

    f_g the relative frequency of word n-gram g in the text. With the defaults,
    (2/3 H_2 + 4/3 H_3) / 2. Source: ROME `eval_utils_counterfact.compute_n_gram_entropy`
    (agg="arith"). ROME's tables print it ×100 ("Fluency" ≈ 620); we report bits. A text with
    fewer than n words has no n-grams and contributes H_n = 0 (ROME's numpy gives nan there).
    """
    words = word_tokens(text)
    hs = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        hs.append(w * -sum((c / total) * math.log2(c / total) for c in grams.values()))
    return float(np.mean(hs))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy of generated texts (ROME `n_gram_entropy`, agg="arith")."""
    if not texts:
        raise InputError("fluency needs at least one text")
    return float(np.mean([ngram_entropy(t) for t in texts]))


# ----------------------------------------------------------------------------- consistency

# scikit-learn's default `TfidfVectorizer` tokens: lower-cased runs of 2+ word characters.
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tfidf_tokens(text: str) -> list[str]:
    return _TFIDF_TOKEN.findall(text.lower())


@dataclass(frozen=True)
class TfIdf:
    """TF-IDF vectors as scikit-learn's default `TfidfVectorizer`, which ROME fits
    (`dsets/tfidf_stats.collect_stats`) on the texts of its attribute snippets:

        idf(w) = ln((1 + N) / (1 + df(w))) + 1     (smooth idf; N documents, df = documents with w)
        v(text)_w = count(w in text) · idf(w),  then v / ‖v‖₂   (words outside the vocabulary drop)
    """

    vocab: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, documents: Sequence[str]) -> TfIdf:
        docs = [set(tfidf_tokens(d)) for d in documents]
        docs = [d for d in docs if d]
        if not docs:
            raise InputError("TF-IDF corpus is empty")
        df = Counter(w for d in docs for w in d)
        words = sorted(df)
        idf = np.array([math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in words])
        return cls({w: i for i, w in enumerate(words)}, idf)

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for w in tfidf_tokens(text):
            i = self.vocab.get(w)
            if i is not None:
                v[i] += 1
        v *= self.idf
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def similarity(self, a: str, b: str) -> float:
        """cos(v(a), v(b)); 0 when either text has no vocabulary word (ROME divides by 0)."""
        return float(self.vector(a) @ self.vector(b))


def consistency(tfidf: TfIdf, generations: Sequence[str], references: Sequence[str]) -> float:
    """RS = cos(tfidf(" ".join(generations)), tfidf(" ".join(references))).

    Source: ROME `eval_utils_counterfact.test_generation` (`reference_score`), the references
    being the attribute snippets of (relation, target_new): Wikipedia text about other subjects
    that have the new object, so a model that speaks of the subject as having it scores higher.
    """
    if not generations or not references:
        raise InputError("consistency needs generated texts and reference texts")
    return tfidf.similarity(" ".join(generations), " ".join(references))
