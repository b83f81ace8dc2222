"""MEND's losses and metrics on logits taken at scored positions (eric-mitchell/mend `losses.py`).

    NLL       = - Σ_p m_p log p(y_p | x_<p) / Σ_p m_p                 (masked_log_probs' nll)
    KL_loc    = Σ_t m_t KL(p_W(· | x_≤t) ‖ p_W̃(· | x_≤t)) / Σ_t m_t      (kl_loc_loss)
    edit acc  = fraction of rows whose every label token is the argmax (multiclass_log_probs)

Which positions carry m_t in KL_loc is `MENDHparams.loc_kl_positions` (`loc_kl_mask`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxedit.methods.mend.inputs import Labelled, answer_positions


def nll(logits: Float[Array, "B P V"], x: Labelled) -> Float[Array, ""]:
    """Mean negative log-likelihood of the label tokens (the reference's masked NLL)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    lp = jnp.take_along_axis(logp, x.target[..., None], -1)[..., 0]
    m = x.valid.astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)


def label_accuracy(logits: Float[Array, "B P V"], x: Labelled) -> Float[Array, ""]:
    """Fraction of rows whose every label token is the argmax (MEND's edit accuracy)."""
    ok = (jnp.argmax(logits, -1) == x.target) | ~x.valid
    return jnp.mean(jnp.all(ok, -1).astype(jnp.float32))


def kl_loc(
    pre: Float[Array, "B P V"], post: Float[Array, "B P V"], valid: Bool[Array, "B P"]
) -> Float[Array, ""]:
    """Mean over the valid positions of KL(p_pre ‖ p_post) (the reference's `kl_loc_loss`)."""
    lp_pre = jax.nn.log_softmax(pre.astype(jnp.float32), -1)
    lp_post = jax.nn.log_softmax(post.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp_pre) * (lp_pre - lp_post), -1)
    m = valid.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def loc_kl_mask(
    mask: Bool[Array, "B T"], labels: Bool[Array, "B T"], positions: str
) -> Bool[Array, "B T"]:
    """The positions of a locality input (logits at every position) whose KL is averaged.

    "all": every non-padding token (the reference passes the attention mask); "answer": the
    positions that predict an answer token.
    """
    if positions == "all":
        return mask.astype(bool)
    if positions == "answer":
        return answer_positions(labels) & mask.astype(bool)
    raise ValueError(f"unknown locality KL positions {positions!r}")
