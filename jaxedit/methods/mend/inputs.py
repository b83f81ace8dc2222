"""MEND's token inputs: prompt + answer sequences, right-padded, with the positions to score.

The vocabulary projection costs more than the three edited blocks together (SmolLM2: 57 vs 21
MFLOP a token), so logits are computed only at the positions a loss reads: the P positions that
predict an answer token (`labelled`), or every position of a locality input (`every_position`,
for the reference's locality KL over the whole input).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from jaxedit.errors import InputError
from jaxedit.eval.scoring import continuation


class Labelled(NamedTuple):
    """A right-padded batch with P scored positions per row (P fixed by the shape)."""

    tokens: Int[Array, "B T"]
    mask: Bool[Array, "B T"]
    pos: Int[Array, "B P"]  # positions whose *next* token is scored
    valid: Bool[Array, "B P"]  # padding of pos
    target: Int[Array, "B P"]  # the token predicted at pos


def labelled(
    tokens: Int[Array, "B T"], mask: Bool[Array, "B T"], labels: Bool[Array, "B T"], n_pos: int
) -> Labelled:
    """Positions p with labels[p + 1] (at most `n_pos` per row; the rest is padding)."""

    def row(t, lab):
        nxt = lab[1:]
        pos = jnp.nonzero(nxt, size=n_pos, fill_value=0)[0]
        valid = jnp.arange(n_pos) < jnp.sum(nxt)
        return pos, valid, t[pos + 1]

    pos, valid, target = jax.vmap(row)(tokens, labels)
    return Labelled(tokens, mask.astype(bool), pos, valid, target)


def every_position(tokens: Int[Array, "B T"], mask: Bool[Array, "B T"]) -> Labelled:
    """All T positions, valid where the mask holds (target: the next token; the last position
    of a row predicts past its text and has the pad / its own token as a placeholder target)."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    target = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], 1)
    return Labelled(tokens, mask.astype(bool), pos, mask.astype(bool), target)


def answer_positions(labels: Bool[Array, "B T"]) -> Bool[Array, "B T"]:
    """Over all T positions: True at p when token p + 1 is an answer (label) token."""
    return jnp.concatenate([labels[:, 1:], jnp.zeros_like(labels[:, :1])], 1).astype(bool)


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[bool]]:
    """Ids of prompt + target and a label flag on each target token (the target is scored as a
    continuation: a leading space unless it has one, `jaxedit.eval.scoring.continuation`)."""
    p, t = tok.encode(prompt), tok.encode_continuation(continuation(target))
    return p + t, [False] * len(p) + [True] * len(t)


def pad_pairs(
    tok, pairs: list[tuple[list[int], list[bool]]], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, mask, labels) right-padded to `length` (causal: padding after the text changes
    nothing before it)."""
    n = len(pairs)
    tokens = np.full((n, length), tok.pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    labels = np.zeros((n, length), bool)
    for i, (ids, lab) in enumerate(pairs):
        if len(ids) > length:
            raise InputError(f"a sequence of {len(ids)} tokens exceeds length {length}")
        tokens[i, : len(ids)], mask[i, : len(ids)], labels[i, : len(ids)] = ids, True, lab
    return tokens, mask, labels
