"""jaxedit: locate and edit the knowledge of language models, in JAX/Flax.

import jaxedit as je
lm = je.load("smollm2-135m")                        # config, params pytree, tokenizer
m = je.methods.get("rome")
hp = m.hparams("smollm2-135m")
edit, info = m.compute(lm, m.prepare(lm, hp), [je.EditRequest(prompt, subject, target)])
lm2 = je.apply(lm, edit)                            # lm untouched
"""

from jaxedit import methods
from jaxedit.edits import (
    ContextEdit,
    Demonstration,
    Edit,
    WeightDelta,
    WeightEdit,
    apply,
    compose,
    load_edit,
    save_edit,
)
from jaxedit.errors import CheckpointError, ConfigError, InputError, JaxeditError
from jaxedit.eval.runner import evaluate
from jaxedit.io.checkpoint import load, save_hf, save_orbax
from jaxedit.models.config import ModelConfig
from jaxedit.models.generate import generate, next_token_logprobs, top_k
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sharding import make_mesh, shard
from jaxedit.models.sites import SITES, SitePatch, get_weight, make_patch, set_weight
from jaxedit.models.transformer import (
    KVCache,
    Output,
    forward,
    forward_jit,
    init_params,
    last_positions,
)
from jaxedit.requests import EditRequest, Probe

__all__ = [
    "make_mesh",
    "shard",
    "SITES",
    "CheckpointError",
    "ConfigError",
    "ContextEdit",
    "Demonstration",
    "Edit",
    "EditRequest",
    "InputError",
    "JaxeditError",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "Output",
    "Probe",
    "SitePatch",
    "WeightDelta",
    "WeightEdit",
    "apply",
    "compose",
    "evaluate",
    "forward",
    "forward_jit",
    "generate",
    "get_weight",
    "init_params",
    "last_positions",
    "load",
    "load_edit",
    "make_patch",
    "methods",
    "next_token_logprobs",
    "save_edit",
    "save_hf",
    "save_orbax",
    "set_weight",
    "top_k",
]
