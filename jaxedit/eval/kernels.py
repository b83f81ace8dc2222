"""The jitted functions teacher-forced scoring runs: log p(target token) and the argmax.

They sit below both the batching engine (`jaxedit.eval.scoring`) and the prefix KV cache
(`jaxedit.eval.prefix_cache`), so each of those imports them without importing the other.

A **scorer** maps one packed batch (`scoring.Packed`: tokens, mask, the positions whose
logits predict the target tokens, and those target tokens) to (log-probs [B P], argmax [B P]).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.models.config import ModelConfig
from jaxedit.models.transformer import Params, forward

Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[Array, Array]]


def target_token_scores(
    logits: Float[Array, "B P V"], targets: Int[Array, "B P"]
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    """log p(target token) (log-softmax in fp32) and the argmax token at each scored position."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return tok_lp, jnp.argmax(logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def lm_scores(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    positions: Int[Array, "B P"],
    targets: Int[Array, "B P"],
) -> tuple[Float[Array, "B P"], Int[Array, "B P"]]:
    """`target_token_scores` of the model's logits at `positions` (one compile per shape)."""
    # Logits only at the P scored positions: never materialise [B T V].
    out = forward(cfg, params, tokens, mask, logit_positions=positions)
    return target_token_scores(out.logits, targets)
