"""Next-token prediction and generation (greedy or sampled) with a KV cache.

Generation pre-fills the prompt once, then decodes one token per step inside a single
`lax.scan`, attending to a fixed-size cache buffer (one compile per prompt bucket and length).

A model that carries a context edit (`lm.context`, IKE) is asked `context + prompt`: the
context runs once into a KV cache (`jaxedit.eval.prefix_cache`) that every prompt row attends
to, with the tokens a joint tokenization of the text gives (`split_context`), so the results
equal those of the plain model on the concatenated text (tests/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.eval.prefix_cache import (
    PrefixCache,
    broadcast_cache,
    encode_prefix,
    fitted_context,
    split_context,
)
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params, forward


def context_rows(
    lm: LanguageModel, prompts: Sequence[str], extra_tokens: int = 0
) -> tuple[PrefixCache | None, list[list[int]]]:
    """(prefix cache or None, token-id rows): each prompt after the model's context, if any;
    rows start with BOS (when the model uses one) only when there is no prefix cache.

    `extra_tokens` is room kept after the longest prompt (tokens to generate)."""
    for p in prompts:
        if not p:
            raise InputError("empty prompt")
    tok = lm.tokenizer
    # Without a context, each prompt alone (with BOS); its length bounds the context's fit.
    plain = [tok.encode(p) for p in prompts]
    context = fitted_context(lm, max(map(len, plain)) + extra_tokens)
    if context is None:
        return None, plain
    head, bodies = split_context(tok, context, prompts)
    if not head:  # a context of spaces only and no BOS: nothing to cache
        return None, bodies
    return encode_prefix(lm, head), bodies


@partial(jax.jit, static_argnums=0)
def _last_logprobs(
    cfg: ModelConfig,
    params: Params,
    prefix: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    last: Int[Array, " B"],
) -> Float[Array, "B V"]:
    cache = None if prefix is None else broadcast_cache(prefix, tokens.shape[0])
    out = forward(cfg, params, tokens, mask, cache=cache, logit_positions=last[:, None])
    return jax.nn.log_softmax(out.logits[:, 0].astype(jnp.float32), axis=-1)


def next_token_logprobs(lm: LanguageModel, prompts: list[str]) -> Float[Array, "B V"]:
    """log p(next token | [context +] prompt) after each prompt's last token (left-padded)."""
    prefix, rows = context_rows(lm, prompts)
    b = lm.tokenizer.batch(rows, padding="left")
    return _last_logprobs(
        lm.config,
        lm.params,
        _kv(prefix),
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        jnp.asarray(b.last),
    )


def top_k(lm: LanguageModel, prompt: str, k: int = 5) -> list[dict]:
    """[{"token", "id", "prob"}] for the k most likely next tokens."""
    if not 0 < k <= lm.config.vocab_size:
        raise InputError(f"--top-k must be 1..{lm.config.vocab_size} (the vocabulary), got {k}")
    logp = np.asarray(next_token_logprobs(lm, [prompt])[0])
    ids = np.argsort(-logp)[:k]
    return [
        {"token": lm.tokenizer.decode([i]), "id": int(i), "prob": float(np.exp(logp[i]))}
        for i in ids
    ]


def _kv(prefix: PrefixCache | None) -> KVCache | None:
    return None if prefix is None else prefix.kv


def prefill_and_decode(
    cfg: ModelConfig,
    params: Params,
    shared: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    n_new: int,
    pick: Callable[[Any, Float[Array, "B V"], Int[Array, ""]], tuple[Any, Int[Array, " B"]]],
    state: Any,
) -> Int[Array, "B N"]:
    """n_new tokens after each left-padded row, one `lax.scan` step each (call inside jit).

    The rows run once (after `shared`, a prefix cache already broadcast to B rows, or None)
    into a cache buffer with n_new empty slots; each step picks a token from the last logits
    with `pick(state, logits, i) -> (state, tokens)` (greedy, temperature or top-k sampling:
    the caller's rule and random state) and writes that token's keys/values into slot i."""
    B, T = tokens.shape
    pre = forward(
        cfg,
        params,
        tokens,
        mask,
        logit_positions=jnp.full((B, 1), T - 1, jnp.int32),
        cache=shared,
        return_kv=True,
    )
    k, v = pre.kv  # [L B T G K]
    if shared is not None:  # the buffer holds context | prompt | generated tokens
        k = jnp.concatenate([shared.k.astype(k.dtype), k], axis=2)
        v = jnp.concatenate([shared.v.astype(v.dtype), v], axis=2)
        mask = jnp.concatenate([shared.mask, mask], axis=1)
    start = k.shape[2]
    pad = ((0, 0), (0, 0), (0, n_new), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(mask, ((0, 0), (0, n_new))))

    def step(carry, i):
        cache, logits, state = carry
        state, tok = pick(state, logits, i)
        # The new token attends to the cache (which does not yet hold it) and to itself.
        out = forward(
            cfg, params, tok[:, None], jnp.ones((B, 1), bool), cache=cache, return_kv=True
        )
        nk, nv = out.kv
        cache = KVCache(
            jax.lax.dynamic_update_slice_in_dim(cache.k, nk.astype(cache.k.dtype), start + i, 2),
            jax.lax.dynamic_update_slice_in_dim(cache.v, nv.astype(cache.v.dtype), start + i, 2),
            cache.mask.at[:, start + i].set(True),
        )
        return (cache, out.logits[:, 0], state), tok

    _, toks = jax.lax.scan(step, (cache, pre.logits[:, 0], state), jnp.arange(n_new))
    return toks.T


@partial(jax.jit, static_argnums=(0, 5))
def _generate(
    cfg: ModelConfig,
    params: Params,
    prefix: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    max_new: int,
    temperature,
    key,
) -> Int[Array, "B N"]:
    shared = None if prefix is None else broadcast_cache(prefix, tokens.shape[0])

    def pick(key, logits, i):
        key, sub = jax.random.split(key)
        greedy = jnp.argmax(logits, -1)
        sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6), -1)
        return key, jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    return prefill_and_decode(cfg, params, shared, tokens, mask, max_new, pick, key)


def generate(
    lm: LanguageModel,
    prompt: str,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Greedy (temperature 0) or sampled continuation of [context +] prompt; stops at EOS."""
    if not prompt:
        raise InputError("empty prompt")
    if max_new_tokens <= 0:
        raise InputError("--max-new-tokens must be positive")
    if max_new_tokens >= lm.config.max_positions:  # before anything is sized by it
        raise InputError(
            f"--max-new-tokens {max_new_tokens}: the model has {lm.config.max_positions} "
            "positions in all, prompt included"
        )
    prefix, rows = context_rows(lm, [prompt], extra_tokens=max_new_tokens)
    used = (0 if prefix is None else prefix.n_tokens) + len(rows[0]) + max_new_tokens
    if used > lm.config.max_positions:
        raise InputError(
            f"prompt and {max_new_tokens} new tokens need {used} positions, more than the "
            f"model's {lm.config.max_positions} positions"
        )
    b = lm.tokenizer.batch(rows, padding="left")
    toks = np.asarray(
        _generate(
            lm.config,
            lm.params,
            _kv(prefix),
            jnp.asarray(b.tokens),
            jnp.asarray(b.mask),
            max_new_tokens,
            jnp.float32(temperature),
            jax.random.key(seed),
        )
    )[0].tolist()
    if lm.tokenizer.eos_id is not None and lm.tokenizer.eos_id in toks:
        toks = toks[: toks.index(lm.tokenizer.eos_id)]
    return lm.tokenizer.decode(toks)
