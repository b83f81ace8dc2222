"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU, fused QKV in `Conv1D`s.

`Conv1D` stores its weight [in, out] already (no transpose); `c_attn` holds q, k and v side by
side along `out`, split here into our three kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig
from jaxedit.models.families.common import (
    GPT2_STYLE_DROPOUT,
    GPT2_STYLE_KNOWN,
    TRANSPOSE,
    Entry,
    Hook,
    Row,
    check_activation,
    expand,
    gpt2_style_dims,
    gpt2_style_to_hf,
    hf_base,
    norm,
    refuse_unknown,
    special_ids,
)

MODEL_TYPES = ("gpt2",)
FAMILY = "gpt2"
KNOWN = (*GPT2_STYLE_KNOWN, "n_ctx", "scale_attn_by_inverse_layer_idx", "scale_attn_weights")
HARMLESS = (
    *GPT2_STYLE_DROPOUT,
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "reorder_and_upcast_attn",  # upcasts attention to fp32: ours is fp32 always
)
# Buffers of HF's attention (the causal mask), not weights.
IGNORED = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
ALIASES: dict[str, tuple[str, ...]] = {}


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_unknown(hf, "gpt2", KNOWN, HARMLESS)
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError("gpt2: scale_attn_by_inverse_layer_idx=True is not implemented")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("gpt2: scale_attn_weights=False is not implemented")
    act = hf.get("activation_function", "gelu_new")
    return ModelConfig(
        model_type="gpt2",
        family="gpt2",
        **gpt2_style_dims(hf),
        activation=check_activation(act, ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"), "gpt2"),
        gated_mlp=False,
        positional="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **special_ids(hf),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **hf_base(cfg, "GPT2LMHeadModel"),
        **gpt2_style_to_hf(cfg),
    }


# ----------------------------------------------------------------------------- weights


def _split_qkv(cfg: ModelConfig, a: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(x) for x in np.split(a, 3, axis=-1))


def _join_qkv(cfg: ModelConfig, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    return np.concatenate(parts, axis=-1)


QKV = Hook(_split_qkv, _join_qkv)
_untied = lambda cfg: not cfg.tie_embeddings

TOP = (
    Row("transformer.wte.weight", "embed"),
    Row("transformer.wpe.weight", "pos_embed"),
    *norm("transformer.ln_f", "final_norm", bias=True),
    Row("lm_head.weight", "lm_head/kernel", TRANSPOSE, when=_untied),
)
LAYER = (
    *norm("transformer.h.{i}.ln_1", "ln1", bias=True),
    *norm("transformer.h.{i}.ln_2", "ln2", bias=True),
    Row(
        "transformer.h.{i}.attn.c_attn.weight",
        ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel"),
        QKV,
    ),
    Row("transformer.h.{i}.attn.c_attn.bias", ("attn/q/bias", "attn/k/bias", "attn/v/bias"), QKV),
    Row("transformer.h.{i}.attn.c_proj.weight", "attn/o/kernel"),
    Row("transformer.h.{i}.attn.c_proj.bias", "attn/o/bias"),
    Row("transformer.h.{i}.mlp.c_fc.weight", "mlp/up/kernel"),
    Row("transformer.h.{i}.mlp.c_fc.bias", "mlp/up/bias"),
    Row("transformer.h.{i}.mlp.c_proj.weight", "mlp/down/kernel"),
    Row("transformer.h.{i}.mlp.c_proj.bias", "mlp/down/bias"),
)


def weight_map(cfg: ModelConfig) -> list[Entry]:
    return expand(cfg, TOP, LAYER)
