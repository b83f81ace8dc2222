"""Teacher-forced scoring of target continuations: the batching engine every metric reads.

`score_targets(lm, prompts, targets) -> TargetScores` runs the model once over every
`prompt + target` sequence (batched, padded to shape buckets, jitted once per bucket) and
returns, per case, the log-probability of every target token given the prompt and the
previous target tokens (teacher forcing) and the model's argmax at those positions. From these:
`nll` (mean token negative log-likelihood), `prob = exp(-nll)` (geometric-mean token
probability, what ROME calls the probability of a target), `token_acc` and `exact` (the
formulas of `jaxedit.eval.metrics`).

A model that carries a context edit (IKE: `LanguageModel.context`) is scored after its
context, `lm.context_text()`: the context runs once into a KV cache that every row attends to
(`jaxedit.eval.prefix_cache`), with the same numbers as scoring context + prompt rows in full.

The leading-space rule (applied in exactly one place, `split_query`)
    The scored continuation is `" " + target` unless the target already starts with
    whitespace; trailing spaces/tabs of the prompt are removed first. Prompt and continuation
    are tokenized *separately* and the ids concatenated, so the scored tokens are always
    `tokenizer.encode_continuation(" " + target)`: the same ids after every prompt, and a
    prompt ending in a space ("The capital is ") cannot steal the space from the target's
    first token (jointly tokenized, " Paris" would split into " " + "Paris"). ROME scores
    `tok(" " + target)` the same way; EasyEdit tokenizes `prompt + " " + target` jointly, which
    is identical except at such merges.

Batching: `share_rows` lets every one-token target of a prompt ride on one row of that
prompt; `score_ids` groups rows by length bucket and cuts them into row buckets (8/32/128).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from jaxedit.errors import InputError
from jaxedit.eval import metrics, prefix_cache
from jaxedit.eval.kernels import Scorer, lm_scores, target_token_scores
from jaxedit.io.tokenizer import TextTokenizer, bucket
from jaxedit.models.lm import LanguageModel

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
        tok.check_fits(len(p_ids[-1]) + len(t_ids[-1]) - 1, p, "the prompt with its target")
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


def lm_scorer(lm: LanguageModel) -> Scorer:
    """The model's jitted scorer (one compile per (rows, T, P) bucket)."""

    def score(tokens, mask, positions, targets):
        return lm_scores(
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
        """`metrics.token_accuracy` per case (EasyEdit / ROME-zsRE accuracy)."""
        pairs = zip(self.argmax, self.target_ids, strict=True)
        return np.array([metrics.token_accuracy(a, t) for a, t in pairs], np.float64)

    @property
    def exact(self) -> np.ndarray:
        """`metrics.exact_match` per case (MEMIT CounterFact `*_correct`)."""
        pairs = zip(self.argmax, self.target_ids, strict=True)
        return np.array([metrics.exact_match(a, t) for a, t in pairs])


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


def score_targets(
    lm: LanguageModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    padding: str = "right",
    max_rows: int = ROW_BUCKETS[-1],
) -> TargetScores:
    """Teacher-forced scores of `" " + target` after each prompt (leading-space rule above).

    Arguments:
        lm: the (possibly edited) model; a context edit it carries is read before every
            prompt, fitted so that the longest query follows it (`prefix_cache.fitted_context`).
        prompts, targets: one target per prompt; several targets for one prompt = repeat it.
    Returns:
        `TargetScores` with per-case token log-probs and argmax; `.nll`, `.prob`,
        `.token_acc`, `.exact` per case.
    """
    p_ids, t_ids = encode_queries(lm.tokenizer, prompts, targets)
    scorer = lm_scorer(lm)
    if lm.context is not None:
        # The context runs once into a KV cache that every row attends to (the same numbers as
        # scoring context + prompt rows in full; tests/test_prefix_cache.py).
        longest = max(len(p) + len(t) for p, t in zip(p_ids, t_ids, strict=True))
        context = prefix_cache.fitted_context(lm, longest)
        bare = [split_query(p, t)[0] for p, t in zip(prompts, targets, strict=True)]
        head, p_ids = prefix_cache.split_context(lm.tokenizer, context, bare)
        if head:  # (a context of spaces only, without BOS, leaves nothing to cache)
            scorer = prefix_cache.prefix_scorer(lm, head)
            max_rows = prefix_cache.max_rows_for(lm, bucket(len(head)), max_rows)
    return score_ids(
        scorer, p_ids, t_ids, pad_id=lm.tokenizer.pad_id, padding=padding, max_rows=max_rows
    )
