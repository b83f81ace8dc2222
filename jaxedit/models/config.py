"""One frozen config for every GPT-style family, and its translation from/to HF `config.json`.

Families differ only in these fields (and in the loader's weight-name map), never in model code.
The HF translation refuses fields it does not implement, so a checkpoint never loads silently wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from jaxedit.errors import ConfigError

Family = Literal["gpt2", "gptj", "gpt_neox", "llama"]
SUPPORTED_MODEL_TYPES = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Dimension names: V vocab, D width, L layers, H query heads, G key/value heads,
    K head dim, F MLP width, P max positions.
    """

    model_type: str  # the HF model_type we came from / export to
    family: Family
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # G (grouped-query attention when G < H)
    head_dim: int  # K
    d_ff: int  # F
    max_positions: int  # P
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Literal["gelu_new", "gelu", "silu", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU: down(act(gate x) * up x)
    positional: Literal["learned", "rotary"] = "rotary"
    rotary_dim: int = 0  # rotated dims per head (partial rotary for GPT-J / NeoX)
    rotary_style: Literal["half", "interleaved"] = "half"  # NeoX/Llama rotate-half, GPT-J pairs
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # ("rope_type", "llama3"), ...
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    shared_parallel_norm: bool = False  # GPT-J: the MLP reads ln1 too (no ln2)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def n_params_estimate(self) -> int:
        D, F, L, V = self.d_model, self.d_ff, self.n_layers, self.vocab_size
        attn = D * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = D * F * (3 if self.gated_mlp else 2)
        return L * (attn + mlp) + V * D * (1 if self.tie_embeddings else 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
        return cls(**d)


# --------------------------------------------------------------------------- HF translation

# Fields that change nothing numerically at inference (or that we handle by construction).
_HARMLESS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "task_specific_params",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "n_inner",
    "_name_or_path",
    "tokenizer_class",
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_decoder",
    "add_cross_attention",
    "tie_word_embeddings",
    "pretraining_tp",
    "gradient_checkpointing",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rms_norm_eps",
    "max_window_layers",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
    "chunk_size_feed_forward",
    "problem_type",
    "finetuning_task",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "torchscript",
    "pruned_heads",
    "keys_to_ignore_at_inference",
    "reorder_and_upcast_attn",
    "scale_attn_weights",
    "use_return_dict",
    "bos_token",
    "eos_token",
    "use_bfloat16",
    "tf_legacy_loss",
    "output_scores",
    "cross_attention_hidden_size",
    "is_encoder_decoder",
    "num_labels",
    "_attn_implementation_autoset",
    "unk_token_id",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "quantization_config_none",
}


def _rope(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None, float | None]:
    """(theta, scaling, partial_rotary_factor) from old (`rope_theta`/`rope_scaling`) or
    transformers-5 (`rope_parameters`) style configs. Unknown scaling types are refused."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    scaling_type = scaling.get("rope_type", scaling.get("type"))
    rope_type = params.get("rope_type", scaling_type or "default")
    if scaling_type is not None and scaling_type != rope_type:
        # transformers lets `rope_scaling` override `rope_parameters`; older readers do the
        # opposite. A config that says both ways is ambiguous: refuse it.
        raise ConfigError(
            f"config.json has rope_scaling type {scaling_type!r} but rope_parameters type "
            f"{rope_type!r}; remove one of them"
        )
    merged = {**scaling, **params}
    if rope_type == "default":
        return float(theta), None, partial
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in merged]
        if missing:
            raise ConfigError(f"rope scaling 'llama3' lacks {missing}")
        return (
            float(theta),
            (("rope_type", "llama3"),) + tuple((k, merged[k]) for k in keys),
            partial,
        )
    if rope_type == "linear":
        return float(theta), (("rope_type", "linear"), ("factor", merged["factor"])), partial
    raise ConfigError(
        f"unsupported rope scaling type {rope_type!r} (jaxedit implements default, linear, llama3)"
    )


def _refuse_unknown(hf: dict[str, Any], known: set[str], model_type: str) -> None:
    unknown = sorted(k for k in hf if k not in known and k not in _HARMLESS)
    if unknown:
        raise ConfigError(
            f"config.json of a {model_type!r} model has fields jaxedit does not implement: "
            f"{unknown}. Refusing to load rather than compute something different."
        )


def _check_activation(act: str, allowed: tuple[str, ...], model_type: str) -> str:
    if act not in allowed:
        raise ConfigError(f"{model_type}: unsupported activation {act!r} (supported: {allowed})")
    return "gelu_new" if act in ("gelu_new", "gelu_pytorch_tanh") else act


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a HF `config.json` dict. Raises ConfigError naming what is unsupported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; "
            f"jaxedit supports {list(SUPPORTED_MODEL_TYPES)}"
        )
    common = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")))
    if model_type == "gpt2":
        _refuse_unknown(
            hf,
            {
                "vocab_size",
                "n_embd",
                "n_layer",
                "n_head",
                "n_positions",
                "n_ctx",
                "activation_function",
                "scale_attn_by_inverse_layer_idx",
            },
            model_type,
        )
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ConfigError("gpt2: scale_attn_by_inverse_layer_idx=True is not implemented")
        if hf.get("scale_attn_weights") is False:
            raise ConfigError("gpt2: scale_attn_weights=False is not implemented")
        D, H = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            model_type="gpt2",
            family="gpt2",
            vocab_size=hf["vocab_size"],
            d_model=D,
            n_layers=hf["n_layer"],
            n_heads=H,
            n_kv_heads=H,
            head_dim=D // H,
            d_ff=hf.get("n_inner") or 4 * D,
            max_positions=hf["n_positions"],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_check_activation(
                hf.get("activation_function", "gelu_new"),
                ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"),
                model_type,
            ),
            gated_mlp=False,
            positional="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            **common,
        )
    if model_type == "gptj":
        _refuse_unknown(
            hf,
            {
                "vocab_size",
                "n_embd",
                "n_layer",
                "n_head",
                "n_positions",
                "rotary_dim",
                "activation_function",
            },
            model_type,
        )
        D, H = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            model_type="gptj",
            family="gptj",
            vocab_size=hf["vocab_size"],
            d_model=D,
            n_layers=hf["n_layer"],
            n_heads=H,
            n_kv_heads=H,
            head_dim=D // H,
            d_ff=hf.get("n_inner") or 4 * D,
            max_positions=hf["n_positions"],
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_check_activation(
                hf.get("activation_function", "gelu_new"),
                ("gelu_new", "gelu", "gelu_pytorch_tanh"),
                model_type,
            ),
            gated_mlp=False,
            positional="rotary",
            rotary_dim=hf.get("rotary_dim") or D // H,
            rotary_style="interleaved",
            rope_theta=10000.0,
            parallel_residual=True,
            shared_parallel_norm=True,
            mlp_bias=True,
            tie_embeddings=False,
            lm_head_bias=True,
            **common,
        )
    if model_type == "gpt_neox":
        _refuse_unknown(
            hf,
            {
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "hidden_act",
                "rotary_pct",
                "rotary_emb_base",
                "rope_parameters",
                "rope_scaling",
                "rope_theta",
                "use_parallel_residual",
                "attention_bias",
                "partial_rotary_factor",
            },
            model_type,
        )
        theta, scaling, partial = _rope(hf)
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        K = D // H
        partial = partial if partial is not None else hf.get("rotary_pct", 0.25)
        bias = hf.get("attention_bias", True)
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
            activation=_check_activation(
                hf.get("hidden_act", "gelu"),
                ("gelu", "gelu_new", "relu", "gelu_pytorch_tanh"),
                model_type,
            ),
            gated_mlp=False,
            positional="rotary",
            rotary_dim=int(K * partial),
            rotary_style="half",
            rope_theta=theta,
            rope_scaling=scaling,
            parallel_residual=hf.get("use_parallel_residual", True),
            qkv_bias=bias,
            attn_out_bias=bias,
            mlp_bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **common,
        )
    # llama / qwen2 / mistral
    _refuse_unknown(
        hf,
        {
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "hidden_act",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "attention_bias",
            "mlp_bias",
            "head_dim",
        },
        model_type,
    )
    theta, scaling, partial = _rope(hf)
    if partial not in (None, 1.0):
        raise ConfigError(f"{model_type}: partial_rotary_factor={partial} is not implemented")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    K = hf.get("head_dim") or D // H
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("qwen2: use_sliding_window=True is not implemented")
    attn_bias = bool(hf.get("attention_bias", False))
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
        activation=_check_activation(
            hf.get("hidden_act", "silu"), ("silu", "gelu", "relu"), model_type
        ),
        gated_mlp=True,
        positional="rotary",
        rotary_dim=K,
        rotary_style="half",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else attn_bias,
        attn_out_bias=attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
        sliding_window=window,
        **common,
    )


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` that `transformers` loads into the same computation."""
    base: dict[str, Any] = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.dtype,
    }
    if cfg.family == "gpt2":
        act = cfg.activation
        return {
            **base,
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.max_positions,
            "n_inner": cfg.d_ff,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": act,
        }
    if cfg.family == "gptj":
        return {
            **base,
            "architectures": ["GPTJForCausalLM"],
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.max_positions,
            "n_inner": cfg.d_ff,
            "rotary_dim": cfg.rotary_dim,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation,
        }
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        rope.update(dict(cfg.rope_scaling))
    if cfg.family == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        return {
            **base,
            "architectures": ["GPTNeoXForCausalLM"],
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_positions,
            "hidden_act": cfg.activation,
            "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.qkv_bias,
            "rope_parameters": rope,
            "rotary_pct": cfg.rotary_dim / cfg.head_dim,
            "rope_theta": cfg.rope_theta,
        }
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }[cfg.model_type]
    out = {
        **base,
        "architectures": [arch],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if not cfg.rope_scaling else dict(cfg.rope_scaling),
    }
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out
