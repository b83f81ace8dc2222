"""Teacher-forced scoring of target continuations, and the editing metrics of the literature.

Scoring
-------
`score_targets(lm, prompts, targets, prefix=None) -> TargetScores` runs the model once over
every `prompt + target` sequence (batched, padded to shape buckets, jitted once per bucket) and
returns, per case, the log-probability of every target token given the prompt and the
previous target tokens (teacher forcing) and the model's argmax at those positions. From these:
`nll` (mean token negative log-likelihood), `prob = exp(-nll)` (geometric-mean token
probability, what ROME calls the probability of a target), `token_acc` (fraction of target
tokens that are the argmax) and `exact` (all target tokens are the argmax).

The leading-space rule (applied in exactly one place, `split_query`)
    The scored continuation is `" " + target` unless the target already starts with
    whitespace; trailing spaces/tabs of the prompt are removed first. Prompt and continuation
    are tokenized *separately* and the ids concatenated, so the scored tokens are always
    `tokenizer.encode_continuation(" " + target)`: the same ids after every prompt, and a
    prompt ending in a space ("The capital is ") cannot steal the space from the target's
    first token (jointly tokenized, " Paris" would split into " " + "Paris"). ROME scores
    `tok(" " + target)` the same way; EasyEdit tokenizes `prompt + " " + target` jointly, which
    is identical except at such merges.

Metrics (all reported as fractions in [0, 1]; the papers' tables multiply by 100)
-------------------------------------------------------------------------------------
- `efficacy_score`: P(new) > P(true) on the rewrite prompt. ROME paper "ES"; kmeng01/rome
  `experiments/summarize.py` `rewrite_success`.
- `efficacy_magnitude`: P(new) - P(true) on the rewrite prompt. ROME "EM"; `rewrite_diff`.
- `paraphrase_score` / `paraphrase_magnitude`: the same on paraphrase prompts. ROME "PS"/"PM".
- `neighborhood_score` / `neighborhood_magnitude`: P(true) > P(new) and P(true) - P(new) on
  neighbourhood prompts (CounterFact neighbours share the case's true object). ROME "NS"/"NM".
- `score`: harmonic mean of the three *_score means. MEMIT `summarize.py` "Score".
- `efficacy_acc`, `paraphrase_acc`, `neighborhood_acc`: every target token is the argmax
  (target_new; target_true for neighbours). MEMIT `eval_utils_counterfact` `*_prompts_correct`.
- `reliability`: token accuracy of target_new on the rewrite prompt. EasyEdit `rewrite_acc`;
  ROME zsRE "Efficacy".
- `generalization`: token accuracy of target_new on paraphrases. EasyEdit `rephrase_acc`;
  ROME zsRE "Paraphrase".
- `specificity_acc`: token accuracy of each neighbour's own true answer. ROME zsRE
  "Specificity".
- `locality`: fraction of neighbour-answer positions whose argmax the edit leaves unchanged.
  EasyEdit `locality`.
- `portability`, `portability/KIND`: token accuracy (best alias) on portability questions.
  EasyEdit `portability`.
- `reverse`: token accuracy (best alias) on reverse questions (seed README, "reverse").
- `fluency`: weighted bi/tri-gram entropy of generations, bits. ROME `compute_n_gram_entropy`.
- `consistency`: TF-IDF cosine of generations to reference text. ROME `tfidf_similarity`.

"P(x)" is `exp(-mean token NLL)` of continuation x; comparisons are strict, as in ROME.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.io.tokenizer import TextTokenizer, bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params, forward

# A scorer maps a packed batch to (target token log-probs [B P], argmax [B P]).
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[Array, Array]]

ROW_BUCKETS = (8, 32, 128)  # batch rows: few compiles, little padding waste
TARGET_BUCKETS = (4, 16, 64, 256)  # scored positions per row


# ----------------------------------------------------------------------------- layout


def continuation(target: str) -> str:
    """The scored continuation of a target: `" " + target` unless it starts with whitespace."""
    if not target.strip():
        raise InputError(f"empty target {target!r}")
    return target if target[:1].isspace() else " " + target


def split_query(prompt: str, target: str) -> tuple[str, str]:
    """(prompt, continuation) under the leading-space rule (see the module docstring)."""
    if not prompt.strip():
        raise InputError("empty prompt")
    return prompt.rstrip(" \t"), continuation(target)


def encode_queries(
    tok: TextTokenizer, prompts: Sequence[str], targets: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with BOS if the model uses one) and of each continuation."""
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    p_ids, t_ids = [], []
    for p, t in zip(prompts, targets, strict=True):
        p, c = split_query(p, t)
        p_ids.append(tok.encode(p))
        t_ids.append(tok.encode_continuation(c))
    return p_ids, t_ids


def _bucket_in(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


@dataclass(frozen=True)
class Packed:
    """One padded batch: row i is prompt_i + target_i (the last target token is not fed)."""

    tokens: np.ndarray  # [B T] int32
    mask: np.ndarray  # [B T] bool
    positions: np.ndarray  # [B P] int32: positions whose logits predict the target tokens
    targets: np.ndarray  # [B P] int32
    target_mask: np.ndarray  # [B P] bool


def pack(
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    padding: str = "right",
    rows: int | None = None,
    extra: Sequence[Sequence[int]] | None = None,
) -> Packed:
    """Lay out prompt+target rows, padded left or right, to shape buckets.

    Target token j of row i is predicted by the logits at the position of the token before it
    (the prompt's last token for j = 0). Rows beyond the data (up to `rows`) copy row 0 so
    that they are valid sequences; their targets are masked out. `extra[i]` lists further
    one-token targets read at row i's prompt's last position, after row i's own target slots:
    those logits depend on the prompt only (causal attention), not on the target after it.
    """
    if padding not in ("left", "right"):
        raise ValueError("padding must be 'left' or 'right'")
    n = len(prompt_ids)
    if n == 0 or len(target_ids) != n:
        raise InputError("pack needs as many non-empty prompts as targets")
    extra = [[] for _ in range(n)] if extra is None else [list(e) for e in extra]
    seqs = [list(p) + list(t[:-1]) for p, t in zip(prompt_ids, target_ids, strict=True)]
    if any(len(p) == 0 for p in prompt_ids) or any(len(t) == 0 for t in target_ids):
        raise InputError("empty prompt or target after tokenization")
    B = rows or n
    T = bucket(max(map(len, seqs)))
    slots = [len(t) + len(e) for t, e in zip(target_ids, extra, strict=True)]
    P = _bucket_in(max(slots), TARGET_BUCKETS)
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    positions = np.zeros((B, P), np.int32)
    targets = np.zeros((B, P), np.int32)
    tmask = np.zeros((B, P), bool)
    for i in range(B):
        src = i if i < n else 0
        s, p, t, e = seqs[src], prompt_ids[src], target_ids[src], extra[src]
        lo = T - len(s) if padding == "left" else 0
        k = len(t) + len(e)
        tokens[i, lo : lo + len(s)] = s
        mask[i, lo : lo + len(s)] = True
        positions[i, : len(t)] = lo + len(p) - 1 + np.arange(len(t))
        positions[i, len(t) :] = lo + len(p) - 1  # the extras; beyond k any valid index
        targets[i, : len(t)] = t
        targets[i, len(t) : k] = e
        tmask[i, :k] = i < n
    return Packed(tokens, mask, positions, targets, tmask)


def share_rows(
    prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]]
) -> list[tuple[int, list[int]]]:
    """The rows to run for a set of queries: (query laid out as prompt + target, [one-token
    queries of the same prompt read off that row at the prompt's last position]).

    Every one-token target of a prompt rides on one row of that prompt, so CounterFact's
    rewrite / paraphrase / neighbourhood prompts, each asked for target_new and target_true,
    cost one row instead of two when the targets are single tokens."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    out = []
    for queries in by_prompt.values():
        multi = [i for i in queries if len(target_ids[i]) > 1]
        single = [i for i in queries if len(target_ids[i]) == 1]
        host = multi or single[:1]
        out.append((host[0], single if multi else single[1:]))
        out.extend((i, []) for i in host[1:])
    return out


# ----------------------------------------------------------------------------- scoring


def target_token_scores(
    logits: Float[Array, "B P V"], targets: Int[Array, "B P"]
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    """log p(target token) and the argmax token at each scored position (pure)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return tok_lp, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def _lm_scores(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    positions: Int[Array, "B P"],
    targets: Int[Array, "B P"],
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    # Logits only at the P scored positions: never materialise [B T V].
    out = forward(cfg, params, tokens, mask, logit_positions=positions)
    return target_token_scores(out.logits, targets)


def lm_scorer(lm: LanguageModel) -> Scorer:
    """The model's jitted scorer (one compile per (rows, T, P) bucket)."""

    def score(tokens, mask, positions, targets):
        return _lm_scores(
            lm.config,
            lm.params,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(positions),
            jnp.asarray(targets),
        )

    return score


def logits_scorer(logits_fn: Callable[[Array, Array], Array]) -> Scorer:
    """A scorer from any `logits_fn(tokens [B T], mask [B T]) -> logits [B T V]` (tests)."""

    def score(tokens, mask, positions, targets):
        logits = logits_fn(jnp.asarray(tokens), jnp.asarray(mask))
        at = jnp.take_along_axis(logits, jnp.asarray(positions)[..., None], axis=1)
        return target_token_scores(at, jnp.asarray(targets))

    return score


@dataclass(frozen=True)
class TargetScores:
    """Per-case teacher-forced scores of a target continuation (numpy, ragged per case)."""

    target_ids: list[np.ndarray]  # [n_i] the scored continuation tokens
    logprobs: list[np.ndarray]  # [n_i] log p(token | prompt, previous target tokens)
    argmax: list[np.ndarray]  # [n_i] the model's argmax at those positions

    def __len__(self) -> int:
        return len(self.target_ids)

    @property
    def nll(self) -> np.ndarray:
        """Mean token negative log-likelihood per case (ROME's `target_new` / `target_true`)."""
        return np.array([-lp.mean() for lp in self.logprobs], np.float64)

    @property
    def prob(self) -> np.ndarray:
        """exp(-nll): geometric-mean token probability (ROME's P(target))."""
        return np.exp(-self.nll)

    @property
    def correct(self) -> list[np.ndarray]:
        return [a == t for a, t in zip(self.argmax, self.target_ids, strict=True)]

    @property
    def token_acc(self) -> np.ndarray:
        """Fraction of target tokens that are the argmax (EasyEdit / ROME-zsRE accuracy)."""
        return np.array([c.mean() for c in self.correct], np.float64)

    @property
    def exact(self) -> np.ndarray:
        """All target tokens are the argmax (MEMIT CounterFact `*_correct`)."""
        return np.array([bool(c.all()) for c in self.correct])


def score_ids(
    scorer: Scorer,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    padding: str = "right",
    max_rows: int = ROW_BUCKETS[-1],
    share: bool = True,
) -> TargetScores:
    """Score token-id queries in batches that waste little padding.

    Queries sharing a prompt share a row where they can (`share_rows`; `share=False`: one row
    per query). Rows are grouped by
    their length bucket T (a 12-token row is never padded to 32 because a 20-token row shares
    its batch), and each group is cut into chunks whose sizes are row
    buckets (120 rows -> 32+32+32+8+8+8, not 128): compute is spent on real tokens, and
    shapes stay within a few compiled buckets.
    """
    n = len(prompt_ids)
    if n == 0:
        return TargetScores([], [], [])
    rows = share_rows(prompt_ids, target_ids) if share else [(i, []) for i in range(n)]
    length = [len(prompt_ids[h]) + len(target_ids[h]) - 1 for h, _ in rows]
    order = sorted(range(len(rows)), key=lambda r: (bucket(length[r]), length[r]))
    lp_out: list[np.ndarray | None] = [None] * n
    am_out: list[np.ndarray | None] = [None] * n
    for idx, n_rows in _chunks(order, [bucket(length[r]) for r in order], max_rows):
        hosts = [rows[r][0] for r in idx]
        riders = [rows[r][1] for r in idx]
        pk = pack(
            [prompt_ids[h] for h in hosts],
            [target_ids[h] for h in hosts],
            pad_id=pad_id,
            padding=padding,
            rows=n_rows,
            extra=[[target_ids[i][0] for i in rs] for rs in riders],
        )
        lp, am = scorer(pk.tokens, pk.mask, pk.positions, pk.targets)
        lp, am = np.asarray(lp), np.asarray(am)
        for r, (h, rs) in enumerate(zip(hosts, riders, strict=True)):
            k = len(target_ids[h])
            lp_out[h], am_out[h] = lp[r, :k], am[r, :k]
            for j, i in enumerate(rs):
                lp_out[i], am_out[i] = lp[r, k + j : k + j + 1], am[r, k + j : k + j + 1]
    return TargetScores([np.asarray(t, np.int32) for t in target_ids], lp_out, am_out)


def _chunks(order: list[int], buckets: list[int], max_rows: int):
    """(row indices, padded row count) per call: one length bucket per call, chunk sizes
    taken greedily from the row buckets (the remainder < smallest bucket is padded)."""
    sizes = [b for b in ROW_BUCKETS if b <= max_rows] or [max_rows]
    lo = 0
    while lo < len(order):
        hi = lo
        while hi < len(order) and buckets[hi] == buckets[lo]:
            hi += 1
        while lo < hi:
            left = hi - lo
            size = max([b for b in sizes if b <= left] or [min(sizes)])
            take = min(size, left)
            yield order[lo : lo + take], size
            lo += take


def split_prefix(
    tok: TextTokenizer, prefix: str, prompt_ids: list[list[int]], prompts: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, each prompt's ids after it) for an in-context prefix (IKE's context).

    The prefix is tokenized once, with BOS; each prompt follows without BOS, so the prefix
    ids are shared by every row (what `jaxedit.eval.prefix_cache` caches). Trailing spaces of the
    prefix move onto the prompts ("…Prompt: " + "The X" is read as "…Prompt:" + " The X"):
    the ids are those a joint tokenization of the text gives, never a lone " " token.
    """
    head_text = prefix.rstrip(" \t")
    glue = prefix[len(head_text) :]
    head = tok.encode(head_text) if head_text else ([tok.bos_id] if tok.add_bos else [])
    bodies = []
    for ids, p in zip(prompt_ids, prompts, strict=True):
        if glue:
            bodies.append(tok.encode_continuation(glue + p.rstrip(" \t")))
        else:
            bodies.append(ids[1:] if tok.add_bos and ids[:1] == [tok.bos_id] else ids)
    return head, bodies


def with_prefix(
    tok: TextTokenizer, prefix: str, prompt_ids: list[list[int]], prompts: Sequence[str]
) -> list[list[int]]:
    """Prepend an in-context prefix to every query: prefix ids + prompt ids (`split_prefix`)."""
    head, bodies = split_prefix(tok, prefix, prompt_ids, prompts)
    return [head + b for b in bodies]


def score_targets(
    lm: LanguageModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    prefix: str | None = None,
    padding: str = "right",
    max_rows: int = ROW_BUCKETS[-1],
) -> TargetScores:
    """Teacher-forced scores of `" " + target` after each prompt (leading-space rule above).

    Arguments:
        lm: the (possibly edited) model.
        prompts, targets: one target per prompt; several targets for one prompt = repeat it.
        prefix: text prepended to every prompt (in-context editing), see `with_prefix`.
    Returns:
        `TargetScores` with per-case token log-probs and argmax; `.nll`, `.prob`,
        `.token_acc`, `.exact` per case.
    """
    p_ids, t_ids = encode_queries(lm.tokenizer, prompts, targets)
    scorer = lm_scorer(lm)
    if prefix:
        # The prefix runs once into a KV cache that every row attends to (same numbers as
        # scoring `with_prefix` rows in full; tests/test_prefix_cache.py).
        from jaxedit.eval import prefix_cache

        head, p_ids = split_prefix(lm.tokenizer, prefix, p_ids, prompts)
        if head:  # (a prefix of spaces only leaves nothing to cache)
            scorer = prefix_cache.prefix_scorer(lm, head)
            max_rows = prefix_cache.max_rows_for(lm, bucket(len(head)), max_rows)
    return score_ids(
        scorer, p_ids, t_ids, pad_id=lm.tokenizer.pad_id, padding=padding, max_rows=max_rows
    )


# ----------------------------------------------------------------------------- metrics


def efficacy_score(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """ES = mean_prompts 1[P(new) > P(true)], i.e. NLL_true > NLL_new (strict).

    Source: Meng et al. 2022 (ROME) §3; kmeng01/rome `experiments/summarize.py`
    (`rewrite_success`), per case over its rewrite prompts. Used for paraphrase prompts too
    (`paraphrase_score`, ROME "PS").
    """
    return float(np.mean(np.asarray(nll_true) > np.asarray(nll_new)))


def efficacy_magnitude(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """EM = mean_prompts P(new) - P(true), P = exp(-mean token NLL).

    Source: ROME `summarize.py` (`rewrite_diff`: exp(-nll_new) - exp(-nll_true)).
    `paraphrase_magnitude` ("PM") is the same on paraphrase prompts.
    """
    return float(np.mean(np.exp(-np.asarray(nll_new)) - np.exp(-np.asarray(nll_true))))


def neighborhood_score(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """NS = mean_prompts 1[P(true) > P(new)] on neighbourhood prompts (strict).

    Source: ROME `summarize.py` (`neighborhood_success`: target_true < target_new in NLL).
    """
    return float(np.mean(np.asarray(nll_true) < np.asarray(nll_new)))


def neighborhood_magnitude(nll_new: np.ndarray, nll_true: np.ndarray) -> float:
    """NM = mean_prompts P(true) - P(new) on neighbourhood prompts (ROME `neighborhood_diff`)."""
    return float(np.mean(np.exp(-np.asarray(nll_true)) - np.exp(-np.asarray(nll_new))))


def harmonic_score(efficacy: float, paraphrase: float, neighborhood: float) -> float:
    """S = hmean(ES, PS, NS), each already averaged over cases (MEMIT `summarize.py`).

    A zero component gives 0 (scipy's convention).
    """
    xs = [efficacy, paraphrase, neighborhood]
    if any(x <= 0 for x in xs):
        return 0.0
    return float(len(xs) / sum(1.0 / x for x in xs))


def token_accuracy(scores: TargetScores) -> np.ndarray:
    """acc_i = (1/n_i) sum_j 1[argmax_j = y_j], teacher forced, per case.

    Source: EasyEdit `evaluate_utils.test_prediction_acc` (reliability / generalization /
    portability); ROME `eval_utils_zsre.py` (zsRE efficacy / paraphrase / specificity).
    """
    return scores.token_acc


def locality_agreement(pre_argmax: np.ndarray, post_argmax: np.ndarray) -> float:
    """Locality = (1/n) sum_j 1[argmax_post_j = argmax_pre_j] on a neighbour's answer positions.

    Both argmaxes are taken teacher forced on the same tokens (prompt + true answer), before
    and after the edit. Source: EasyEdit `compute_locality_quality` + `summary_metrics`
    (mean of `np.equal(pre, post)`).
    """
    pre, post = np.asarray(pre_argmax), np.asarray(post_argmax)
    if pre.shape != post.shape:
        raise ValueError("pre/post argmax shapes differ")
    return float(np.mean(pre == post))


# ----------------------------------------------------------------------------- generation metrics

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks (a regex stand-in for `nltk.word_tokenize`)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: mean_n w_n H_n, H_n = -sum_g f_g log2 f_g over n-grams.

    With the defaults this is (2/3 H_2 + 4/3 H_3) / 2. Source: ROME
    `eval_utils_counterfact.compute_n_gram_entropy` (arithmetic aggregation). ROME's tables
    report it x100 ("Fluency" ~ 620); we report the value in bits. Words come from
    `word_tokens` (nltk's tokenizer is not a dependency). A text with fewer than n words
    contributes H_n = 0.
    """
    words = word_tokens(text)
    hs = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = 0.0
        for c in grams.values():
            f = c / total
            h -= f * math.log2(f)
        hs.append(w * h)
    return float(np.mean(hs))


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over generated texts (ROME `n_gram_entropy`, agg='arith')."""
    if not texts:
        raise InputError("fluency needs at least one text")
    return float(np.mean([ngram_entropy(t) for t in texts]))


@dataclass(frozen=True)
class TfIdf:
    """TF-IDF with IDF fitted on a local corpus (ROME fits its vectorizer on Wikipedia).

    idf(w) = ln((1 + N) / (1 + df(w))) + 1 (scikit-learn's default smooth idf), tf = raw
    counts, L2-normalised vectors, lower-cased words. The statistics differ from ROME's
    (Wikipedia), so values are comparable between our runs, not with the paper's.
    """

    vocab: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, documents: Sequence[str], max_vocab: int = 50_000) -> TfIdf:
        docs = [set(w.lower() for w in _WORD.findall(d) if w.isalnum()) for d in documents]
        docs = [d for d in docs if d]
        if not docs:
            raise InputError("TF-IDF corpus is empty")
        df = Counter(w for d in docs for w in d)
        words = [w for w, _ in sorted(df.items(), key=lambda x: (-x[1], x[0]))[:max_vocab]]
        vocab = {w: i for i, w in enumerate(words)}
        idf = np.array([math.log((1 + len(docs)) / (1 + df[w])) + 1 for w in words])
        return cls(vocab, idf)

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for w in _WORD.findall(text.lower()):
            i = self.vocab.get(w)
            if i is not None:
                v[i] += 1
        v *= self.idf
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def similarity(self, a: str, b: str) -> float:
        """cos(tfidf(a), tfidf(b)); 0 when either has no known word."""
        return float(self.vector(a) @ self.vector(b))


def consistency(tfidf: TfIdf, generations: Sequence[str], references: Sequence[str]) -> float:
    """RS = cos(tfidf(" ".join(generations)), tfidf(" ".join(references))).

    Source: ROME `eval_utils_counterfact.test_generation` (`reference_score`), where the
    references are Wikipedia snippets about target_new.
    """
    return tfidf.similarity(" ".join(generations), " ".join(references))


def load_corpus(path: str, min_chars: int = 40) -> list[str]:
    """Documents for `TfIdf.fit`: the non-heading lines of a raw text file (e.g. WikiText)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise InputError(f"cannot read corpus {path}: {e}") from e
    return [ln for ln in lines if len(ln) >= min_chars and not ln.startswith("=")]
