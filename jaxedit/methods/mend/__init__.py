"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

    m = jaxedit.methods.get("mend")
    hp = m.hparams("smollm2-135m", editor="editors/smollm2-135m")   # a `jaxedit mend-train` dir
    state = m.prepare(lm, hp)                 # loads the editor (refused for other weights), jits
    edit, info = m.compute(lm, state, requests)   # low-rank ΔW_l = η_l Σ_t ũ_t δ̃_tᵀ per weight
    lm2 = jaxedit.apply(lm, edit)

One concern per module, imported in this order (no cycles):
    hparams     MENDHparams, Layout (which weights, which share an editor net)
    inputs      prompt + answer token arrays and the positions to score
    instructions  InstructEdit's task templates and where they are written in
    data        training cases (CounterFact / zsRE / KnowEdit; one task or several, instructed
                or not), tokenised, and the (task-balanced) batch order
    losses      NLL, edit accuracy, locality KL (and which positions it reads)
    factors     u_t, δ_t of the edit loss: ∇_W L = Σ_t u_t δ_tᵀ; prefix residual, sub-model
    editor      IDMLP + normaliser as pytrees; pseudo-gradients ∇̃_W = Σ_t ũ_t δ̃_tᵀ
    state       meta-training state and optimiser
    checkpoint  the trained editor on disk (save / load, fingerprint-checked)
    train       pure train_step / eval_step and the resumable loop
    method      prepare / compute on the editing protocol

Options that depart from eric-mitchell/mend, each off by default and documented in `hparams`
(the smollm2 preset says which it turns on, and why): η stepped by its own optimiser only
(`eta_outer=False`), the edit loss also on the edit input (`inner_loss`), the locality KL only
at answer positions (`loc_kl_positions="answer"`; default "all", as the reference). Presets may
also start η negative (the identity editor's W + η ∇W is gradient descent only for η < 0).
"""

from __future__ import annotations

from jaxedit.methods.base import EditMethod
from jaxedit.methods.mend.checkpoint import TrainedEditor, load_editor
from jaxedit.methods.mend.editor import (
    init_editor,
    init_norm,
    pseudo_gradients,
    transform,
    update_norm,
)
from jaxedit.methods.mend.factors import Factors, edit_factors, gradient_factors, true_gradients
from jaxedit.methods.mend.hparams import Layout, MENDHparams, make_layout
from jaxedit.methods.mend.method import MENDState, compute, edit_params, prepare

METHOD = EditMethod(
    name="mend",
    hparams_cls=MENDHparams,
    prepare_fn=prepare,
    compute_fn=compute,
    summary="MEND: a trained editor network turns the edit's gradient into a low-rank update",
)

__all__ = [
    "METHOD",
    "Factors",
    "Layout",
    "MENDHparams",
    "MENDState",
    "TrainedEditor",
    "compute",
    "edit_factors",
    "edit_params",
    "gradient_factors",
    "init_editor",
    "init_norm",
    "load_editor",
    "make_layout",
    "prepare",
    "pseudo_gradients",
    "transform",
    "true_gradients",
    "update_norm",
]
