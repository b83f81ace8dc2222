"""MEND's meta-training state and optimiser: everything a checkpoint holds, as one pytree.

Kept apart from `train` (the step and the loop) and `checkpoint` (files) so that both build on
it without importing each other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxedit.methods.mend.editor import init_editor, init_norm
from jaxedit.methods.mend.hparams import Layout, MENDHparams


class TrainState(NamedTuple):
    step: jax.Array
    editor: dict
    norm: dict
    opt_state: Any
    best_val: jax.Array  # early stopping: best validation loss so far
    since_best: jax.Array  # validations without improvement


def make_optimizer(hp: MENDHparams, editor: dict) -> optax.MultiSteps:
    """Adam on the editor (lr) and on η (lr_lr, + lr when `eta_outer`), global-norm clipped and
    accumulated over `accumulate` steps (optax.MultiSteps)."""
    # η is stepped by its own Adam (lr_lr) and, as in the reference, by the editor's (lr); two
    # Adams on the same gradient take steps in the same direction, so one Adam with the summed lr.
    eta_lr = hp.lr_lr + (hp.lr if hp.eta_outer else 0.0)
    labels = {"edit_lrs": "lrs", "nets": jax.tree.map(lambda _: "nets", editor["nets"])}
    inner = optax.chain(
        optax.clip_by_global_norm(hp.grad_clip),
        optax.multi_transform({"nets": optax.adam(hp.lr), "lrs": optax.adam(eta_lr)}, labels),
    )
    return optax.MultiSteps(inner, every_k_schedule=max(hp.accumulate, 1))


def init_state(layout: Layout, hp: MENDHparams) -> TrainState:
    editor = init_editor(jax.random.key(hp.seed), layout, hp)
    opt = make_optimizer(hp, editor)
    return TrainState(
        jnp.zeros((), jnp.int32),
        editor,
        init_norm(layout),
        opt.init(editor),
        jnp.asarray(jnp.inf, jnp.float32),
        jnp.zeros((), jnp.int32),
    )
