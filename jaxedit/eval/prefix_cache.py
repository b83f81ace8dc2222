"""Score many short continuations after one shared prefix, computing the prefix only once.

In-context editing (IKE) puts a long prefix (demonstrations + the new fact) before every query
of an edit; the queries themselves are short. Recomputing the prefix for every row costs
B·(S+T) token-passes; with a KV cache it costs S + B·T:

    kv_prefix          = forward(prefix)                              (once, batch 1)
    log p(y_j | prefix, x, y_<j) = forward(x ⊕ y_<j, cache=kv_prefix)    (batched rows)

Exactness: keys and values of the prefix do not depend on what follows (causal attention) and
positions continue after the prefix's real tokens (`forward` offsets them by the number of
valid cache slots), so the cached scores equal full recomputation up to float summation order
(tests: ≤ 1e-5 in log-probability, left and right padding, several prefix lengths).

Shapes compile once per bucket: the prefix is left-padded to a bucket of S (its padding slots
are masked in the cache), continuation rows to buckets of (rows, T, P).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError

# metrics imports this module only inside a function, so importing its scorer here is cycle-free.
from jaxedit.eval.scoring import _lm_scores, target_token_scores
from jaxedit.io.tokenizer import bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params, forward

ROW_BUCKETS = (8, 32, 128)
TARGET_BUCKETS = (4, 16, 64, 256)
# The prefix cache is broadcast to every row of a batch ([L B S G K] keys and values), so rows
# per call are capped to keep that copy under this many bytes (chunks still share one prefix).
CACHE_BYTES_PER_CALL = 512 * 2**20

Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[Array, Array]]


@dataclass(frozen=True)
class PrefixCache:
    """Keys/values of one prefix (batch 1), left-padded to a shape bucket of S slots."""

    kv: KVCache  # k, v: [L 1 S G K]; mask [1 S]
    n_tokens: int  # real prefix tokens

    @property
    def slots(self) -> int:
        return int(self.kv.mask.shape[1])


# ----------------------------------------------------------------------------- pure parts


@partial(jax.jit, static_argnums=0)
def _encode_prefix(
    cfg: ModelConfig, params: Params, tokens: Int[Array, "1 S"], mask: Bool[Array, "1 S"]
) -> KVCache:
    # n_layers = L: run every block but skip the final norm and the [S V] logits (never read).
    out = forward(cfg, params, tokens, mask, n_layers=cfg.n_layers, return_kv=True)
    k, v = out.kv
    return KVCache(k, v, mask)


@partial(jax.jit, static_argnums=0)
def _score_with_cache(
    cfg: ModelConfig,
    params: Params,
    cache: KVCache,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    positions: Int[Array, "B P"],
    targets: Int[Array, "B P"],
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    B = tokens.shape[0]
    L, _, S, G, K = cache.k.shape
    shared = KVCache(
        jnp.broadcast_to(cache.k, (L, B, S, G, K)),
        jnp.broadcast_to(cache.v, (L, B, S, G, K)),
        jnp.broadcast_to(cache.mask, (B, S)),
    )
    out = forward(cfg, params, tokens, mask, cache=shared, logit_positions=positions)
    return target_token_scores(out.logits, targets)


# ----------------------------------------------------------------------------- API


def encode_prefix(lm: LanguageModel, prefix_ids: Sequence[int]) -> PrefixCache:
    """Run the prefix once and keep its keys/values (left-padded to a bucket)."""
    ids = [int(i) for i in prefix_ids]
    if not ids:
        raise InputError("empty prefix: nothing to cache")
    if len(ids) > lm.config.max_positions:
        raise InputError(
            f"prefix of {len(ids)} tokens exceeds the model's {lm.config.max_positions}"
        )
    S = bucket(len(ids))
    tokens = np.full((1, S), lm.tokenizer.pad_id, np.int32)
    mask = np.zeros((1, S), bool)
    tokens[0, S - len(ids) :] = ids
    mask[0, S - len(ids) :] = True
    kv = _encode_prefix(lm.config, lm.params, jnp.asarray(tokens), jnp.asarray(mask))
    return PrefixCache(kv, len(ids))


def cached_scorer(lm: LanguageModel, cache: PrefixCache) -> Scorer:
    """`score(tokens, mask, positions, targets)` for continuation rows that follow `cache`.

    The packed-batch interface of `jaxedit.eval.scoring` (positions index the continuation rows).
    """

    def score(tokens, mask, positions, targets):
        return _score_with_cache(
            lm.config,
            lm.params,
            cache.kv,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(positions),
            jnp.asarray(targets),
        )

    return score


def prefix_scorer(lm: LanguageModel, prefix_ids: Sequence[int]) -> Scorer:
    """A packed-batch scorer whose rows follow `prefix_ids`; the prefix runs once, lazily."""
    state: dict[str, PrefixCache] = {}

    def score(tokens, mask, positions, targets):
        if "cache" not in state:
            state["cache"] = encode_prefix(lm, prefix_ids)
        return cached_scorer(lm, state["cache"])(tokens, mask, positions, targets)

    return score


def max_rows_for(lm: LanguageModel, slots: int, max_rows: int) -> int:
    """Rows per call such that the broadcast cache stays under `CACHE_BYTES_PER_CALL`."""
    cfg = lm.config
    per_row = 2 * cfg.n_layers * slots * cfg.n_kv_heads * cfg.head_dim * 4
    fit = min(max_rows, max(1, CACHE_BYTES_PER_CALL // per_row))
    # A row bucket, so that callers padding rows to buckets stay within the cap.
    return max([b for b in ROW_BUCKETS if b <= fit] or [fit])


def _bucket_in(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


def _pack(
    rows_ids: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    target_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    padding: str,
    rows: int,
):
    """Pad `rows_ids` (prompt ⊕ target[:-1]) to buckets; target j is read at prompt_end - 1 + j."""
    n = len(rows_ids)
    T = bucket(max(map(len, rows_ids)))
    P = _bucket_in(max(map(len, target_ids)), TARGET_BUCKETS)
    tokens = np.full((rows, T), pad_id, np.int32)
    mask = np.zeros((rows, T), bool)
    positions = np.zeros((rows, P), np.int32)
    targets = np.zeros((rows, P), np.int32)
    for i in range(rows):
        src = i if i < n else 0  # filler rows repeat row 0 (valid sequences, results dropped)
        s, t = rows_ids[src], target_ids[src]
        lo = T - len(s) if padding == "left" else 0
        tokens[i, lo : lo + len(s)] = s
        mask[i, lo : lo + len(s)] = True
        start = lo + prompt_lens[src] - 1
        positions[i, : len(t)] = start + np.arange(len(t))
        positions[i, len(t) :] = start
        targets[i, : len(t)] = t
    return tokens, mask, positions, targets


def score_continuations(
    lm: LanguageModel,
    prefix_ids: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    *,
    use_cache: bool = True,
    padding: str = "right",
    max_rows: int = 32,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Teacher-forced scores of `target_ids[i]` after `prefix_ids ⊕ prompt_ids[i]`.

    Arguments:
        prefix_ids: the shared prefix (with BOS if the model uses one).
        prompt_ids, target_ids: per query, non-empty, without BOS.
        use_cache: False recomputes the prefix in every row (the reference / the baseline).
    Returns:
        (log p of each target token, the argmax token at each target position), per query.
    """
    if padding not in ("left", "right"):
        raise ValueError("padding must be 'left' or 'right'")
    n = len(prompt_ids)
    if len(target_ids) != n:
        raise InputError(f"{n} prompts but {len(target_ids)} targets")
    if any(len(p) == 0 for p in prompt_ids) or any(len(t) == 0 for t in target_ids):
        raise InputError("empty prompt or target: every query needs tokens after the prefix")
    if n == 0:
        return [], []
    head = [int(i) for i in prefix_ids]
    cache = encode_prefix(lm, head) if use_cache else None
    if cache is not None:
        max_rows = max_rows_for(lm, cache.slots, max_rows)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(target_ids[i]))
    lp_out: list[np.ndarray] = [np.zeros(0)] * n
    am_out: list[np.ndarray] = [np.zeros(0)] * n
    for lo in range(0, n, max_rows):
        idx = order[lo : lo + max_rows]
        rows = min(_bucket_in(len(idx), ROW_BUCKETS), max_rows)  # ≥ len(idx)
        lead = [] if cache is not None else head
        rows_ids = [lead + list(prompt_ids[i]) + list(target_ids[i][:-1]) for i in idx]
        prompt_lens = [len(lead) + len(prompt_ids[i]) for i in idx]
        packed = _pack(
            rows_ids,
            prompt_lens,
            [target_ids[i] for i in idx],
            pad_id=lm.tokenizer.pad_id,
            padding=padding,
            rows=rows,
        )
        if cache is not None:
            lp, am = cached_scorer(lm, cache)(*packed)
        else:
            lp, am = _lm_scores(lm.config, lm.params, *map(jnp.asarray, packed))
        lp, am = np.asarray(lp), np.asarray(am)
        for r, i in enumerate(idx):
            k = len(target_ids[i])
            lp_out[i], am_out[i] = lp[r, :k], am[r, :k]
    return lp_out, am_out
