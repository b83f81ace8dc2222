"""Next-token prediction and generation (greedy or sampled) with a KV cache.

Generation pre-fills the prompt once, then decodes one token per step inside a single
`lax.scan`, attending to a fixed-size cache buffer (one compile per prompt bucket and length).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxedit.errors import InputError
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params, forward, forward_jit


def next_token_logprobs(lm: LanguageModel, prompts: list[str]) -> Float[Array, "B V"]:
    """log p(next token | prompt) after each prompt's last token (left-padded batch)."""
    for p in prompts:
        if not p:
            raise InputError("empty prompt")
    b = lm.tokenizer.batch(prompts, padding="left")
    out = forward_jit(
        lm.config,
        lm.params,
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        logit_positions=jnp.asarray(b.last)[:, None],
    )
    return jax.nn.log_softmax(out.logits[:, 0], axis=-1)


def top_k(lm: LanguageModel, prompt: str, k: int = 5) -> list[dict]:
    """[{"token", "id", "prob"}] for the k most likely next tokens."""
    if k <= 0:
        raise InputError("--top-k must be positive")
    logp = np.asarray(next_token_logprobs(lm, [prompt])[0])
    ids = np.argsort(-logp)[:k]
    return [
        {"token": lm.tokenizer.decode([i]), "id": int(i), "prob": float(np.exp(logp[i]))}
        for i in ids
    ]


@partial(jax.jit, static_argnums=(0, 4))
def _generate(
    cfg: ModelConfig, params: Params, tokens, mask, max_new: int, temperature, key
) -> Int[Array, "B N"]:
    B, T = tokens.shape
    pre = forward(
        cfg, params, tokens, mask, logit_positions=jnp.full((B, 1), T - 1), return_kv=True
    )
    k, v = pre.kv  # [L B T G K]
    pad = ((0, 0), (0, 0), (0, max_new), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(mask, ((0, 0), (0, max_new))))

    def pick(logits, key):
        greedy = jnp.argmax(logits, -1)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), -1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    def step(carry, i):
        cache, logits, key = carry
        key, sub = jax.random.split(key)
        tok = pick(logits, sub)
        slot = jnp.zeros_like(cache.mask).at[:, T + i].set(True)
        # The new token attends to the cache (which does not yet hold it) and to itself.
        out = forward(
            cfg, params, tok[:, None], jnp.ones((B, 1), bool), cache=cache, return_kv=True
        )
        nk, nv = out.kv
        cache = KVCache(
            jax.lax.dynamic_update_slice_in_dim(cache.k, nk.astype(cache.k.dtype), T + i, 2),
            jax.lax.dynamic_update_slice_in_dim(cache.v, nv.astype(cache.v.dtype), T + i, 2),
            cache.mask | slot,
        )
        return (cache, out.logits[:, 0], key), tok

    _, toks = jax.lax.scan(step, (cache, pre.logits[:, 0], key), jnp.arange(max_new))
    return toks.T


def generate(
    lm: LanguageModel,
    prompt: str,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Greedy (temperature 0) or sampled continuation; stops at EOS."""
    if not prompt:
        raise InputError("empty prompt")
    if max_new_tokens <= 0:
        raise InputError("--max-new-tokens must be positive")
    b = lm.tokenizer.batch([prompt], padding="left")
    toks = np.asarray(
        _generate(
            lm.config,
            lm.params,
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
