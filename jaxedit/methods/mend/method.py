"""MEND on the editing protocol: `prepare` loads a trained editor, `compute` returns its edit as
low-rank factors.

For each edited weight l the update is

    ΔW_l = s · η_l · Σ_t ũ_t δ̃_tᵀ = left @ rightᵀ,   left = s · η_l · Ũᵀ [I, N],   right = Δ̃ᵀ [O, N]

(s = `edit_scale`, N = the edit tokens that carry a gradient: masked tokens are dropped), so a
`WeightEdit` of rank N per weight holds exactly what MEND computes and never forms ∇̃W.
`edit_params` is the same edit written into the params densely (what meta-training does).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxedit.edits import WeightDelta, WeightEdit
from jaxedit.errors import InputError
from jaxedit.io.tokenizer import bucket
from jaxedit.methods.base import PrepareOptions
from jaxedit.methods.mend.checkpoint import TrainedEditor, load_editor
from jaxedit.methods.mend.editor import (
    Editor,
    Norm,
    apply_updates,
    pseudo_gradients,
    transformed_factors,
)
from jaxedit.methods.mend.factors import edit_factors
from jaxedit.methods.mend.hparams import Layout, MENDHparams, make_layout
from jaxedit.methods.mend.inputs import Labelled, encode_pair, labelled, pad_pairs
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest


def edit_params(
    cfg: ModelConfig,
    params: dict,
    editor: Editor,
    norm: Norm,
    layout: Layout,
    x: Labelled,
    use_norm: bool = True,
) -> tuple[dict, dict]:
    """One MEND edit written into `params` densely: (new params, record arrays)."""
    loss, factors = edit_factors(cfg, params, layout, x)
    grads, tilde = pseudo_gradients(editor, norm, layout, factors, use_norm)
    new = apply_updates(params, layout, editor["edit_lrs"], grads)
    lrs = jnp.abs(editor["edit_lrs"])
    norms = jnp.stack([lrs[i] * jnp.linalg.norm(g) for i, g in enumerate(grads)])
    return new, {"edit_loss": loss, "update_norms": norms, "tilde": tilde, "mask": factors.m}


def transformed_edit(
    cfg: ModelConfig,
    params: dict,
    editor: Editor,
    norm: Norm,
    layout: Layout,
    x: Labelled,
    use_norm: bool,
) -> tuple[Float[Array, ""], dict, dict]:
    """(edit loss before the edit, {group: (ũ [M N I] masked, δ̃ [M N O])}, {group: token mask
    [M N]}): the edit as factors, the pseudo-gradients never formed."""
    loss, factors = edit_factors(cfg, params, layout, x)
    return loss, transformed_factors(editor, norm, layout, factors, use_norm), factors.m


def encode_requests(
    tok, requests: list[EditRequest]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(tokens, mask, labels) of rewrite prompt + target_new, right-padded to a length bucket,
    and the number of scored positions (a multiple of 8: one compile per 8 target tokens)."""
    pairs = [encode_pair(tok, r.rewrite_prompt, r.target_new) for r in requests]
    tokens, mask, labels = pad_pairs(tok, pairs, bucket(max(len(p[0]) for p in pairs)))
    n_pos = -(-int(labels.sum(1).max()) // 8) * 8
    return tokens, mask, labels, n_pos


# ----------------------------------------------------------------------------- the protocol


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "use_norm", "n_pos"))
def _run(params, editor, norm, tokens, mask, labels, *, cfg, layout, use_norm, n_pos):
    """`transformed_edit` of padded token arrays; compiled once per model, editor layout,
    length bucket and number of target tokens (shared by every state of the same editor)."""
    x = labelled(tokens, mask, labels, n_pos)
    return transformed_edit(cfg, params, editor, norm, layout, x, use_norm)


@dataclass(frozen=True)
class MENDState:
    """What `prepare` builds: the trained editor, the step-size scale, where it came from."""

    trained: TrainedEditor
    edit_scale: float
    directory: str = ""


def prepare(lm: LanguageModel, hp: MENDHparams, opts: PrepareOptions) -> MENDState:
    """Load the editor named by `hp.editor` (refused if trained for other weights).

    The editor's own training hparams (its config.json) define its network and the weights it
    edits; of `hp` only `editor` and `edit_scale` are read."""
    if not hp.editor:
        raise InputError(
            "MEND needs a trained editor: set the hparams field editor=DIR "
            "(e.g. --set editor=DIR, or m.hparams(..., editor=DIR); see `jaxedit mend-train`)"
        )
    return make_state(lm, load_editor(hp.editor, lm), hp.edit_scale, str(hp.editor))


def make_state(
    lm: LanguageModel, trained: TrainedEditor, edit_scale: float = 1.0, directory: str = ""
) -> MENDState:
    """The state `compute` needs, for an editor already in memory (its layout must be the one
    its hparams give on this model)."""
    if make_layout(lm.config, trained.hparams) != trained.layout:
        raise InputError(f"the editor's layout does not fit model {lm.name!r}")
    if not (np.isfinite(edit_scale) and edit_scale >= 0):
        raise InputError(f"edit scale must be a finite number ≥ 0, not {edit_scale}")
    return MENDState(trained, float(edit_scale), directory)


def compute(
    lm: LanguageModel, state: MENDState, requests: list[EditRequest]
) -> tuple[WeightEdit, dict]:
    """The edit of `requests` (one MEND step on all their edit tokens) as low-rank deltas."""
    t0 = time.perf_counter()
    trained = state.trained
    tokens, mask, labels, n_pos = encode_requests(lm.tokenizer, requests)
    loss, tilde, keep = _run(
        lm.params,
        trained.editor,
        trained.norm,
        tokens,
        mask,
        labels,
        cfg=lm.config,
        layout=trained.layout,
        use_norm=trained.hparams.norm,
        n_pos=n_pos,
    )
    etas = np.asarray(trained.editor["edit_lrs"], np.float32) * state.edit_scale
    deltas, norms = _deltas(trained.layout, tilde, keep, etas)
    names = [f"{s}.{layer}" for s, layer in trained.layout.weights]
    info = {
        "weights": names,
        "edit_loss_before": float(loss),
        "update_norms": dict(zip(names, norms, strict=True)),
        "edit_lrs": [float(x) for x in etas],
        "edit_scale": state.edit_scale,
        "ranks": {n: int(d.left.shape[1]) for n, d in zip(names, deltas, strict=True)},
        "seconds": round(time.perf_counter() - t0, 4),
    }
    meta = {
        "method": "mend",
        "editor": state.directory,
        "editor_step": trained.step,
        "edit_scale": state.edit_scale,
        "requests": [r.rewrite_prompt + " -> " + r.target_new for r in requests],
    }
    return WeightEdit(tuple(deltas), meta), info


def _deltas(layout: Layout, tilde: dict, keep: dict, etas: np.ndarray):
    """One `WeightDelta` per edited weight (tokens without a gradient dropped) and ‖ΔW‖_F."""
    deltas: list = [None] * len(layout.weights)
    norms: list = [None] * len(layout.weights)
    for name, _, _, members in layout.groups:
        ut, dt = (np.asarray(a, np.float32) for a in tilde[name])
        m = np.asarray(keep[name])
        for j, i in enumerate(members):
            u, d = ut[j][m[j]], dt[j][m[j]]  # [N I], [N O]
            site, layer = layout.weights[i]
            deltas[i] = WeightDelta(
                site, layer, left=etas[i] * u.T, right=np.ascontiguousarray(d.T)
            )
            # ‖η Uᵀ D‖_F² = η² Σ (U Uᵀ) ⊙ (D Dᵀ): exact without forming the [I, O] matrix
            sq = float(np.sum((u @ u.T) * (d @ d.T)))
            norms[i] = abs(float(etas[i])) * float(np.sqrt(max(sq, 0.0)))
    return deltas, norms
