"""jaxedit info: what the model is."""

import jax
import numpy as np

from jaxedit.cli.shared import load_model

NAME = "info"
HELP = "architecture, sizes, parameter count and dtype of a model"


def add_arguments(p):
    pass


def run(args) -> dict:
    lm = load_model(args)
    c = lm.config
    n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(lm.params)))
    return {
        "model": lm.name,
        "model_type": c.model_type,
        "family": c.family,
        "layers": c.n_layers,
        "d_model": c.d_model,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "d_ff": c.d_ff,
        "vocab_size": c.vocab_size,
        "max_positions": c.max_positions,
        "params": n,
        "dtype": c.dtype,
        "config": c.to_dict(),
    }


def render(r: dict) -> str:
    keys = (
        "model",
        "model_type",
        "layers",
        "d_model",
        "heads",
        "kv_heads",
        "head_dim",
        "d_ff",
        "vocab_size",
        "max_positions",
        "params",
        "dtype",
    )
    return "\n".join(
        f"{k:>14}: {r[k]:,}" if isinstance(r[k], int) else f"{k:>14}: {r[k]}" for k in keys
    )
