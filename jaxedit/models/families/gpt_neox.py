"""GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): parallel (or sequential) residual with two norms,
rotate-half partial rotary (`rotary_pct`, default 25%), QKV fused per head.

`query_key_value` lays its output rows out per head, [H, (q|k|v), K], not [(q|k|v), H, K]:
the hooks below regroup them into our three [D, H*K] kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxedit.models.config import ModelConfig
from jaxedit.models.families.common import (
    STANDARD_KNOWN,
    TRANSPOSE,
    Entry,
    Hook,
    Row,
    check_activation,
    expand,
    hf_base,
    linear,
    norm,
    refuse_unknown,
    rope,
    rope_to_hf,
    special_ids,
    standard_to_hf,
)

MODEL_TYPES = ("gpt_neox",)
FAMILY = "gpt_neox"
KNOWN = (
    *STANDARD_KNOWN,
    "layer_norm_eps",
    "rotary_pct",
    "rotary_emb_base",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "use_parallel_residual",
    "attention_bias",
    "tie_word_embeddings",
)
HARMLESS = ()
IGNORED = (r"\.attention\.bias$", r"\.attention\.masked_bias$", r"rotary_emb\.inv_freq$")
# Older transformers named the output head `embed_out` at the top level, newer ones nest it.
ALIASES = {"embed_out.weight": ("gpt_neox.embed_out.weight", "lm_head.weight")}


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_unknown(hf, "gpt_neox", KNOWN, HARMLESS)
    r = rope(hf)
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    K = D // H
    partial = r.partial if r.partial is not None else hf.get("rotary_pct", 0.25)
    bias = hf.get("attention_bias", True)
    act = hf.get("hidden_act", "gelu")
    return ModelConfig(
        model_type="gpt_neox",
        family="gpt_neox",
        vocab_size=hf["vocab_size"],
        d_model=D,
        n_layers=hf["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=H,
        head_dim=K,
        d_ff=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=check_activation(
            act, ("gelu", "gelu_new", "relu", "gelu_pytorch_tanh"), "gpt_neox"
        ),
        gated_mlp=False,
        positional="rotary",
        rotary_dim=int(K * partial),
        rotary_style="half",
        rope_theta=r.theta,
        rope_scaling=r.scaling,
        parallel_residual=hf.get("use_parallel_residual", True),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **special_ids(hf),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    partial = cfg.rotary_dim / cfg.head_dim
    return {
        **hf_base(cfg, "GPTNeoXForCausalLM"),
        **standard_to_hf(cfg),
        "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": cfg.parallel_residual,
        "attention_bias": cfg.qkv_bias,
        "rope_parameters": {**rope_to_hf(cfg), "partial_rotary_factor": partial},
        "rotary_pct": partial,
        "rope_theta": cfg.rope_theta,
    }


# ----------------------------------------------------------------------------- weights


def _split_w(cfg: ModelConfig, a: np.ndarray) -> tuple[np.ndarray, ...]:
    H, K = cfg.n_heads, cfg.head_dim
    a = a.reshape(H, 3, K, -1)
    return tuple(np.ascontiguousarray(a[:, j].reshape(H * K, -1).T) for j in range(3))


def _join_w(cfg: ModelConfig, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    H, K = cfg.n_heads, cfg.head_dim
    return np.stack([p.T.reshape(H, K, -1) for p in parts], 1).reshape(3 * H * K, -1)


def _split_b(cfg: ModelConfig, a: np.ndarray) -> tuple[np.ndarray, ...]:
    H, K = cfg.n_heads, cfg.head_dim
    a = a.reshape(H, 3, K)
    return tuple(np.ascontiguousarray(a[:, j].reshape(H * K)) for j in range(3))


def _join_b(cfg: ModelConfig, parts: tuple[np.ndarray, ...]) -> np.ndarray:
    H, K = cfg.n_heads, cfg.head_dim
    return np.stack([p.reshape(H, K) for p in parts], 1).reshape(3 * H * K)


QKV_WEIGHT, QKV_BIAS = Hook(_split_w, _join_w), Hook(_split_b, _join_b)
_qkv_bias = lambda cfg: cfg.qkv_bias
_out_bias = lambda cfg: cfg.attn_out_bias
_untied = lambda cfg: not cfg.tie_embeddings
_L = "gpt_neox.layers.{i}"

TOP = (
    Row("gpt_neox.embed_in.weight", "embed"),
    *norm("gpt_neox.final_layer_norm", "final_norm", bias=True),
    Row("embed_out.weight", "lm_head/kernel", TRANSPOSE, when=_untied),
)
LAYER = (
    *norm(f"{_L}.input_layernorm", "ln1", bias=True),
    *norm(f"{_L}.post_attention_layernorm", "ln2", bias=True),
    Row(
        f"{_L}.attention.query_key_value.weight",
        ("attn/q/kernel", "attn/k/kernel", "attn/v/kernel"),
        QKV_WEIGHT,
    ),
    Row(
        f"{_L}.attention.query_key_value.bias",
        ("attn/q/bias", "attn/k/bias", "attn/v/bias"),
        QKV_BIAS,
        when=_qkv_bias,
    ),
    *linear(f"{_L}.attention.dense", "attn/o", bias=_out_bias),
    *linear(f"{_L}.mlp.dense_h_to_4h", "mlp/up", bias=True),
    *linear(f"{_L}.mlp.dense_4h_to_h", "mlp/down", bias=True),
)


def weight_map(cfg: ModelConfig) -> list[Entry]:
    return expand(cfg, TOP, LAYER)
