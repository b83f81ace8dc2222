"""The Llama family: Llama 1-3, SmolLM2, Qwen2 and Mistral (`LlamaForCausalLM`,
`Qwen2ForCausalLM`, `MistralForCausalLM`): RMSNorm, rotate-half rotary (optionally scaled),
SwiGLU MLP, grouped-query attention.

The three HF model types share the computation and every weight name; they differ only in
which biases exist and in sliding-window attention, which `VARIANTS` spells out (read from
transformers' modeling files), so they are one file rather than three copies of one table:

    llama    q/k/v/o biases = `attention_bias`, MLP biases = `mlp_bias`, no sliding window
    qwen2    q/k/v biases always, o and MLP never; `use_sliding_window=True` is refused
    mistral  no biases; `sliding_window` (every layer) is read

The GGUF names llama.cpp gives these tensors, and the HF config a GGUF's metadata stands for,
are here too: a GGUF of architecture `llama` or `qwen2` is this family in another container.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig
from jaxedit.models.families.common import (
    STANDARD_KNOWN,
    TRANSPOSE,
    Entry,
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

MODEL_TYPES = ("llama", "qwen2", "mistral")
FAMILY = "llama"
KNOWN = (
    *STANDARD_KNOWN,
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "layer_types",
)
IGNORED = (r"rotary_emb\.inv_freq$",)
ALIASES = {"lm_head.weight": ("model.lm_head.weight",)}


@dataclass(frozen=True)
class Variant:
    """What one HF model type of the family changes. A bias given as None is read from the
    config field named by `known` (llama's `attention_bias` / `mlp_bias`)."""

    architecture: str
    qkv_bias: bool | None
    attn_out_bias: bool | None
    mlp_bias: bool | None
    known: tuple[str, ...] = ()  # fields this model type reads on top of KNOWN
    harmless: tuple[str, ...] = ()  # fields its modeling code ignores


VARIANTS = {
    "llama": Variant(
        "LlamaForCausalLM",
        qkv_bias=None,
        attn_out_bias=None,
        mlp_bias=None,
        known=("attention_bias", "mlp_bias"),
        harmless=("pretraining_tp",),  # a training-time matmul split: same result
    ),
    "qwen2": Variant(
        "Qwen2ForCausalLM",
        qkv_bias=True,
        attn_out_bias=False,
        mlp_bias=False,
        known=("use_sliding_window",),
        # read only when use_sliding_window is true, which is refused
        harmless=("sliding_window", "max_window_layers", "attention_bias", "mlp_bias"),
    ),
    "mistral": Variant(
        "MistralForCausalLM",
        qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        known=("sliding_window",),
        harmless=("attention_bias", "mlp_bias"),
    ),
}


def _window(hf: dict[str, Any], model_type: str) -> int | None:
    """The sliding window every layer uses (None: full attention); refuses per-layer mixes."""
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("qwen2: use_sliding_window=True is not implemented")
    expected = "full_attention" if window is None else "sliding_attention"
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != expected for t in layer_types):
        raise ConfigError(
            f"{model_type}: layer_types {sorted(set(layer_types))} is not implemented "
            f"(jaxedit runs {expected} in every layer for this config)"
        )
    return window


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    v = VARIANTS[model_type]
    refuse_unknown(hf, model_type, KNOWN + v.known, v.harmless)
    r = rope(hf)
    if r.partial not in (None, 1.0):
        raise ConfigError(f"{model_type}: partial_rotary_factor={r.partial} is not implemented")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    K = hf.get("head_dim") or D // H
    attention_bias = bool(hf.get("attention_bias", False))
    pick = lambda fixed, read: read if fixed is None else fixed
    return ModelConfig(
        model_type=model_type,
        family="llama",
        vocab_size=hf["vocab_size"],
        d_model=D,
        n_layers=hf["num_hidden_layers"],
        n_heads=H,
        n_kv_heads=hf.get("num_key_value_heads") or H,
        head_dim=K,
        d_ff=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=check_activation(
            hf.get("hidden_act", "silu"), ("silu", "gelu", "relu"), model_type
        ),
        gated_mlp=True,
        positional="rotary",
        rotary_dim=K,
        rotary_style="half",
        rope_theta=r.theta,
        rope_scaling=r.scaling,
        qkv_bias=pick(v.qkv_bias, attention_bias),
        attn_out_bias=pick(v.attn_out_bias, attention_bias),
        mlp_bias=pick(v.mlp_bias, bool(hf.get("mlp_bias", False))),
        # transformers omits fields equal to the class default when saving: False for all three
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_window(hf, model_type),
        **special_ids(hf),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {
        **hf_base(cfg, VARIANTS[cfg.model_type].architecture),
        **standard_to_hf(cfg),
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_to_hf(cfg),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if not cfg.rope_scaling else dict(cfg.rope_scaling),
    }
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


# ----------------------------------------------------------------------------- weights

_L = "model.layers.{i}"
TOP = (
    Row("model.embed_tokens.weight", "embed"),
    *norm("model.norm", "final_norm", bias=False),
    Row("lm_head.weight", "lm_head/kernel", TRANSPOSE, when=lambda cfg: not cfg.tie_embeddings),
)
LAYER = (
    *norm(f"{_L}.input_layernorm", "ln1", bias=False),
    *norm(f"{_L}.post_attention_layernorm", "ln2", bias=False),
    *linear(f"{_L}.self_attn.q_proj", "attn/q", bias=lambda cfg: cfg.qkv_bias),
    *linear(f"{_L}.self_attn.k_proj", "attn/k", bias=lambda cfg: cfg.qkv_bias),
    *linear(f"{_L}.self_attn.v_proj", "attn/v", bias=lambda cfg: cfg.qkv_bias),
    *linear(f"{_L}.self_attn.o_proj", "attn/o", bias=lambda cfg: cfg.attn_out_bias),
    *linear(f"{_L}.mlp.gate_proj", "mlp/gate", bias=lambda cfg: cfg.mlp_bias),
    *linear(f"{_L}.mlp.up_proj", "mlp/up", bias=lambda cfg: cfg.mlp_bias),
    *linear(f"{_L}.mlp.down_proj", "mlp/down", bias=lambda cfg: cfg.mlp_bias),
)


def weight_map(cfg: ModelConfig) -> list[Entry]:
    return expand(cfg, TOP, LAYER)


# ----------------------------------------------------------------------------- GGUF

GGUF_ARCHITECTURES = ("llama", "qwen2")
# llama.cpp permutes Q/K rows (rotate-half -> interleaved pairs) only for `llama`; qwen2 GGUFs
# keep HF's layout.
GGUF_PERMUTES_QK = ("llama",)
GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name_from_gguf(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor (None when it is not one of this family's)."""
    if gguf_name in GGUF_TOP:
        return GGUF_TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER[m.group(2)]}"
    return None


def hf_config_from_gguf(fields: dict[str, Any], arch: str, has_output: bool) -> dict[str, Any]:
    """The HF `config.json` a llama / qwen2 GGUF's metadata (`{arch}.*`) stands for."""
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported {GGUF_ARCHITECTURES}")
    if fields.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ConfigError(f"GGUF rope scaling {fields[f'{arch}.rope.scaling.type']!r} unsupported")
    g = lambda k, d=None: fields.get(f"{arch}.{k}", d)
    n_heads = int(g("attention.head_count"))
    n_vocab = len(fields["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in fields else 0
    return {
        "model_type": arch,
        "vocab_size": int(g("vocab_size", n_vocab)),
        "hidden_size": int(g("embedding_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "intermediate_size": int(g("feed_forward_length")),
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
    }
