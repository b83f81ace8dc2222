"""What family modules share: refusal of HF config fields by name, rope parsing, the config
field names of GPT-2 (which GPT-J reuses) and transformers' standard ones, and the vocabulary of
a weight map (a declarative table of rows plus small hook functions).

A weight map is a table of `Row`s, MaxText-style: each row names one HF tensor (with `{i}` for
the layer index), the jaxedit param path(s) it fills, and a `Hook` converting between the HF
layout (torch `Linear`: [out, in]) and ours ([in, out] kernels). `expand` turns a family's
table into the `Entry` list the loader and the exporter read, in the two directions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig

# ----------------------------------------------------------------------------- config fields

# Fields of HF's base `PretrainedConfig` (and of generation / training) that change nothing
# numerically at inference. A family adds its own harmless fields; anything else is refused.
HARMLESS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "unk_token_id",
        "decoder_start_token_id",
        "bos_token",
        "eos_token",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "hidden_dropout",
        "classifier_dropout",
        "attention_probs_dropout_prob",
        "hidden_dropout_prob",
        "_name_or_path",
        "_attn_implementation_autoset",
        "tokenizer_class",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "prefix",
        "task_specific_params",
        "return_dict",
        "use_return_dict",
        "output_hidden_states",
        "output_attentions",
        "output_scores",
        "is_decoder",
        "is_encoder_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "chunk_size_feed_forward",
        "torchscript",
        "pruned_heads",
        "keys_to_ignore_at_inference",
        "gradient_checkpointing",
        "use_bfloat16",
        "tf_legacy_loss",
        "tie_word_embeddings",
        "quantization_config_none",
    }
)


def refuse_unknown(
    hf: dict[str, Any], model_type: str, known: Sequence[str], harmless: Sequence[str] = ()
) -> None:
    """Raise ConfigError naming every field that is neither read (`known`) nor harmless."""
    allowed = HARMLESS | set(known) | set(harmless)
    unknown = sorted(k for k in hf if k not in allowed)
    if unknown:
        raise ConfigError(
            f"config.json of a {model_type!r} model has fields jaxedit does not implement: "
            f"{unknown}. Refusing to load rather than compute something different."
        )


def check_activation(act: str, allowed: tuple[str, ...], model_type: str) -> str:
    """The activation name jaxedit uses for a HF one (gelu_pytorch_tanh is gelu_new)."""
    if act not in allowed:
        raise ConfigError(f"{model_type}: unsupported activation {act!r} (supported: {allowed})")
    return "gelu_new" if act in ("gelu_new", "gelu_pytorch_tanh") else act


def first(x: Any) -> Any:
    """The first of a list of ids (HF allows `eos_token_id: [2, 32000]`), else the value."""
    return x[0] if isinstance(x, list) and x else x


def special_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every family reads the same way."""
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=first(hf.get("eos_token_id")))


class Rope(NamedTuple):
    theta: float
    scaling: tuple[tuple[str, Any], ...] | None
    partial: float | None  # partial_rotary_factor, when the config gives one


def rope(hf: dict[str, Any]) -> Rope:
    """Rotary settings from old (`rope_theta` / `rope_scaling`) or transformers-5
    (`rope_parameters`) style configs. Unknown scaling types are refused."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    partial = None if partial is None else float(partial)
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
        return Rope(float(theta), None, partial)
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in merged]
        if missing:
            raise ConfigError(f"rope scaling 'llama3' lacks {missing}")
        scaled = (("rope_type", "llama3"),) + tuple((k, merged[k]) for k in keys)
        return Rope(float(theta), scaled, partial)
    if rope_type == "linear":
        return Rope(float(theta), (("rope_type", "linear"), ("factor", merged["factor"])), partial)
    raise ConfigError(
        f"unsupported rope scaling type {rope_type!r} (jaxedit implements default, linear, llama3)"
    )


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers-5 `rope_parameters` for a config (partial factor added by the caller)."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        out.update(dict(cfg.rope_scaling))
    return out


def hf_base(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The `config.json` fields every family writes."""
    return {
        "model_type": cfg.model_type,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.dtype,
    }


# GPT-2's config names, which GPT-J's config reuses for the same quantities.
GPT2_STYLE_KNOWN = (
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
)
GPT2_STYLE_DROPOUT = ("attn_pdrop", "embd_pdrop", "resid_pdrop")


def gpt2_style_dims(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig sizes and LayerNorm read from GPT-2-named fields (multi-head attention,
    d_ff 4·D unless `n_inner` says otherwise)."""
    D, H = hf["n_embd"], hf["n_head"]
    return dict(
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
    )


def gpt2_style_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The GPT-2-named fields of `gpt2_style_dims`, written back (with the activation)."""
    return {
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_positions": cfg.max_positions,
        "n_inner": cfg.d_ff,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": cfg.activation,
    }


# transformers' standard config names (GPT-NeoX, Llama and most later families).
STANDARD_KNOWN = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_act",
)


def standard_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `STANDARD_KNOWN` fields of a config, written back (vocab_size is in `hf_base`)."""
    return {
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
    }


# ----------------------------------------------------------------------------- weight maps

ParamPath = tuple[str, ...]
Arrays = tuple[np.ndarray, ...]


class Hook(NamedTuple):
    """HF tensor -> our arrays (one per param path of the row), and back."""

    to_ours: Callable[[ModelConfig, np.ndarray], Arrays]
    to_hf: Callable[[ModelConfig, Arrays], np.ndarray]


def _identity(cfg: ModelConfig, a: np.ndarray) -> Arrays:
    return (a,)


def _identity_back(cfg: ModelConfig, parts: Arrays) -> np.ndarray:
    return parts[0]


def _transpose(cfg: ModelConfig, a: np.ndarray) -> Arrays:
    # A view: the loader copies it into its stacked buffer anyway (one copy, not two).
    return (a.T,)


def _transpose_back(cfg: ModelConfig, parts: Arrays) -> np.ndarray:
    return np.ascontiguousarray(parts[0].T)


IDENTITY = Hook(_identity, _identity_back)
TRANSPOSE = Hook(_transpose, _transpose_back)  # torch Linear [out, in] <-> our kernel [in, out]


@dataclass(frozen=True)
class Row:
    """One line of a weight table: HF name (`{i}`: layer), our path(s) ("a/b/c"), hook, and
    `when`, a predicate on the config for tensors only some checkpoints have (biases...)."""

    hf: str
    ours: str | tuple[str, ...]
    hook: Hook = IDENTITY
    when: Callable[[ModelConfig], bool] | None = None


def linear(hf: str, ours: str, bias: bool | Callable[[ModelConfig], bool]) -> tuple[Row, ...]:
    """A torch `Linear`: the weight transposed, and the bias when `bias` (a predicate on the
    config for biases that depend on it) holds."""
    weight = Row(f"{hf}.weight", f"{ours}/kernel", TRANSPOSE)
    if bias is False:
        return (weight,)
    return weight, Row(f"{hf}.bias", f"{ours}/bias", when=None if bias is True else bias)


def norm(hf: str, ours: str, bias: bool) -> tuple[Row, ...]:
    """A LayerNorm (weight, bias) or RMSNorm (weight)."""
    scale = Row(f"{hf}.weight", f"{ours}/scale")
    return (scale, Row(f"{hf}.bias", f"{ours}/bias")) if bias else (scale,)


@dataclass(frozen=True)
class Entry:
    """One HF tensor of a concrete config: the param paths it fills (inside `params`; `layer`
    indexes the leading axis of stacked block params) and the bound conversions."""

    hf: str
    paths: tuple[ParamPath, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], Arrays]
    to_hf: Callable[[Arrays], np.ndarray]


def expand(cfg: ModelConfig, top: Sequence[Row], layer: Sequence[Row]) -> list[Entry]:
    """The entries of a config: `top` rows once, `layer` rows (paths under `blocks/`) per layer."""

    def entry(row: Row, i: int | None) -> Entry:
        ours = (row.ours,) if isinstance(row.ours, str) else row.ours
        paths = tuple(tuple(p.split("/")) for p in ours)
        if i is not None:
            paths = tuple(("blocks", *p) for p in paths)
        hf = row.hf if i is None else row.hf.format(i=i)
        to_ours = functools.partial(row.hook.to_ours, cfg)
        return Entry(hf, paths, i, to_ours, functools.partial(row.hook.to_hf, cfg))

    wanted = lambda rows: [r for r in rows if r.when is None or r.when(cfg)]
    top_rows, layer_rows = wanted(top), wanted(layer)
    return [entry(r, None) for r in top_rows] + [
        entry(r, i) for i in range(cfg.n_layers) for r in layer_rows
    ]
