"""Run a shared prefix (a context edit's text) once into a KV cache; let many queries attend to it.

In-context editing (IKE) puts a long context (demonstrations + the new facts) before every
query of an edit; the queries themselves are short. Recomputing the context for every row costs
B·(S+T) token-passes; with a KV cache it costs S + B·T:

    kv_prefix          = forward(prefix)                              (once, batch 1)
    log p(y_j | prefix, x, y_<j) = forward(x ⊕ y_<j, cache=kv_prefix)    (batched rows)

Exactness: keys and values of the prefix do not depend on what follows (causal attention) and
positions continue after the prefix's real tokens (`forward` offsets them by the number of
valid cache slots), so the cached scores equal full recomputation up to float summation order
(tests: ≤ 1e-5 in log-probability, left and right padding, several prefix lengths).

Tokens: `split_context` cuts a context text and the prompts that follow it into the prefix ids
(with BOS) and each prompt's ids, such that prefix ⊕ prompt are the ids of the joined text (the
context's trailing spaces move onto the prompts: "…Prompt: " + "The X" is read as "…Prompt:" +
" The X", never with a lone " " token). Scoring (`jaxedit.eval.scoring`) and next-token
prediction / generation (`jaxedit.models.generate`) both go through it, so a model carrying a
context (`LanguageModel.context`) scores exactly the text `context + prompt`.

Shapes compile once per bucket: the prefix is left-padded to a bucket of S (its padding slots
are masked in the cache), continuation rows to buckets of (rows, T, P).

This module depends on the model, the tokenizer and `jaxedit.eval.kernels` (the jitted target
scores), not on `jaxedit.eval.scoring`, which uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.eval.kernels import Scorer, target_token_scores
from jaxedit.io.tokenizer import TextTokenizer, bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params, forward

ROW_BUCKETS = (8, 32, 128)
TARGET_BUCKETS = (4, 16, 64, 256)
# The prefix cache is broadcast to every row of a batch ([L B S G K] keys and values), so rows
# per call are capped to keep that copy under this many bytes (chunks still share one prefix).
CACHE_BYTES_PER_CALL = 512 * 2**20


@dataclass(frozen=True)
class PrefixCache:
    """Keys/values of one prefix (batch 1), left-padded to a shape bucket of S slots."""

    kv: KVCache  # k, v: [L 1 S G K]; mask [1 S]
    n_tokens: int  # real prefix tokens

    @property
    def slots(self) -> int:
        return int(self.kv.mask.shape[1])


# ----------------------------------------------------------------------------- tokens


def split_context(
    tok: TextTokenizer, context: str, prompts: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, each prompt's ids after it) for `context + prompt`.

    The prefix is tokenized once, with BOS if the model uses one; each prompt follows without
    BOS. Trailing spaces/tabs of the context are glued to the front of every prompt, so the
    ids are those a joint tokenization of `context + prompt` gives (byte-level BPE splits
    words before a space; the space belongs to the word after it). The prefix is [] when the
    context is only spaces and the model has no BOS (nothing to cache).
    """
    head_text = context.rstrip(" \t")
    glue = context[len(head_text) :]
    if head_text:
        head = tok.encode(head_text)
    else:
        head = [tok.bos_id] if tok.add_bos else []
    bodies = [tok.encode_continuation(glue + p) for p in prompts]
    if any(not b for b in bodies):
        raise InputError("empty prompt after the context")
    return head, bodies


def fitted_context(lm: LanguageModel, need_tokens: int = 0) -> str | None:
    """The text of `lm.context`, fitted so that `need_tokens` more tokens follow it; None
    when the model carries no context.

    A context edit reserves room for its own queries (`reserve_tokens`); a longer follow-up
    (a generation of many tokens) drops further demonstrations, least similar first, never a
    fact (`ContextEdit.render`).
    """
    ctx = lm.context
    if ctx is None:
        return None
    extra = max(0, int(need_tokens) - ctx.reserve_tokens)
    return ctx.render(lm.tokenizer, lm.config.max_positions - extra)


# ----------------------------------------------------------------------------- pure parts


def broadcast_cache(kv: KVCache, rows: int) -> KVCache:
    """A batch-1 cache repeated for `rows` rows (inside jit this is a broadcast, not a copy)."""
    L, _, S, G, K = kv.k.shape
    return KVCache(
        jnp.broadcast_to(kv.k, (L, rows, S, G, K)),
        jnp.broadcast_to(kv.v, (L, rows, S, G, K)),
        jnp.broadcast_to(kv.mask, (rows, S)),
    )


@partial(jax.jit, static_argnums=0)
def _encode_prefix(
    cfg: ModelConfig, params: Params, tokens: Int[Array, "1 S"], mask: Bool[Array, "1 S"]
) -> KVCache:
    # n_layers = L: run every block but skip the final norm and the [S V] logits (never read).
    out = forward(cfg, params, tokens, mask, n_layers=cfg.n_layers, return_kv=True)
    k, v = out.kv
    return KVCache(k, v, mask)


@partial(jax.jit, static_argnums=0)
def _score(
    cfg: ModelConfig,
    params: Params,
    cache: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    positions: Int[Array, "B P"],
    targets: Int[Array, "B P"],
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    # Logits only at the P scored positions: never materialise [B T V].
    shared = None if cache is None else broadcast_cache(cache, tokens.shape[0])
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


def cached_scorer(lm: LanguageModel, cache: PrefixCache | None) -> Scorer:
    """`score(tokens, mask, positions, targets)` for rows that follow `cache` (None: no prefix).

    The packed-batch interface of `jaxedit.eval.scoring` (positions index the rows' tokens).
    """

    def score(tokens, mask, positions, targets):
        return _score(
            lm.config,
            lm.params,
            None if cache is None else cache.kv,
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
    score = cached_scorer(lm, cache)
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
        lp, am = score(*packed)
        lp, am = np.asarray(lp), np.asarray(am)
        for r, i in enumerate(idx):
            k = len(target_ids[i])
            lp_out[i], am_out[i] = lp[r, :k], am[r, :k]
    return lp_out, am_out
