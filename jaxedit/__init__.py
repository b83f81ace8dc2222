"""jaxedit: locate and edit the knowledge of language models, in JAX/Flax.

import jaxedit as je
lm = je.load("smollm2-135m")                  # config, params pytree, tokenizer
out = je.forward(lm.config, lm.params, tokens, capture=("mlp_key",))
"""

from jaxedit.checkpoint import LanguageModel, load, save_hf, save_orbax
from jaxedit.config import ModelConfig
from jaxedit.errors import CheckpointError, ConfigError, InputError, JaxeditError
from jaxedit.generate import generate, next_token_logprobs, top_k
from jaxedit.model import KVCache, Output, forward, forward_jit, init_params, last_positions
from jaxedit.requests import EditRequest, Probe
from jaxedit.sites import SITES, SitePatch, get_weight, make_patch, set_weight

__all__ = [
    "SITES",
    "CheckpointError",
    "ConfigError",
    "EditRequest",
    "InputError",
    "JaxeditError",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "Output",
    "Probe",
    "SitePatch",
    "forward",
    "forward_jit",
    "generate",
    "get_weight",
    "init_params",
    "last_positions",
    "load",
    "make_patch",
    "next_token_logprobs",
    "save_hf",
    "save_orbax",
    "set_weight",
    "top_k",
]
