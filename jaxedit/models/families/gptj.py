"""GPT-J (`GPTJForCausalLM`): attention and MLP in parallel, both reading `ln_1` (no `ln_2`);
interleaved partial rotary (pairs (2i, 2i+1) of the first `rotary_dim` dims); untied `lm_head`
with a bias."""

from __future__ import annotations

from typing import Any

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig
from jaxedit.models.families.common import (
    GPT2_STYLE_DROPOUT,
    GPT2_STYLE_KNOWN,
    Entry,
    Row,
    check_activation,
    expand,
    gpt2_style_dims,
    gpt2_style_to_hf,
    hf_base,
    linear,
    norm,
    refuse_unknown,
    special_ids,
)

MODEL_TYPES = ("gptj",)
FAMILY = "gptj"
KNOWN = (*GPT2_STYLE_KNOWN, "rotary_dim", "tie_word_embeddings")
# What EleutherAI/gpt-j-6B's config.json carries besides: `rotary` and `scale_attn_weights` are
# read by no GPT-J code in transformers (GPT-J always rotates `rotary_dim` dims and scales scores
# by 1/sqrt(head_dim)), `summary_*` configure a sequence-classification head jaxedit does not
# build. Accepting them computes what transformers computes.
HARMLESS = (
    *GPT2_STYLE_DROPOUT,
    "rotary",
    "scale_attn_weights",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
)
IGNORED = (r"\.attn\.bias$", r"\.attn\.masked_bias$", r"rotary_emb\.inv_freq$")
ALIASES: dict[str, tuple[str, ...]] = {}


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    refuse_unknown(hf, "gptj", KNOWN, HARMLESS)
    if hf.get("tie_word_embeddings"):
        # GPT-J's lm_head has a bias, which tied embeddings (no lm_head) cannot carry.
        raise ConfigError("gptj: tie_word_embeddings=True is not implemented")
    act = hf.get("activation_function", "gelu_new")
    return ModelConfig(
        model_type="gptj",
        family="gptj",
        **gpt2_style_dims(hf),
        activation=check_activation(act, ("gelu_new", "gelu", "gelu_pytorch_tanh"), "gptj"),
        gated_mlp=False,
        positional="rotary",
        rotary_dim=hf.get("rotary_dim") or hf["n_embd"] // hf["n_head"],
        rotary_style="interleaved",
        rope_theta=10000.0,
        parallel_residual=True,
        shared_parallel_norm=True,
        mlp_bias=True,
        tie_embeddings=False,
        lm_head_bias=True,
        **special_ids(hf),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **hf_base(cfg, "GPTJForCausalLM"),
        **gpt2_style_to_hf(cfg),
        "rotary_dim": cfg.rotary_dim,
    }


TOP = (
    Row("transformer.wte.weight", "embed"),
    *norm("transformer.ln_f", "final_norm", bias=True),
    *linear("lm_head", "lm_head", bias=True),
)
LAYER = (
    *norm("transformer.h.{i}.ln_1", "ln1", bias=True),
    *linear("transformer.h.{i}.attn.q_proj", "attn/q", bias=False),
    *linear("transformer.h.{i}.attn.k_proj", "attn/k", bias=False),
    *linear("transformer.h.{i}.attn.v_proj", "attn/v", bias=False),
    *linear("transformer.h.{i}.attn.out_proj", "attn/o", bias=False),
    *linear("transformer.h.{i}.mlp.fc_in", "mlp/up", bias=True),
    *linear("transformer.h.{i}.mlp.fc_out", "mlp/down", bias=True),
)


def weight_map(cfg: ModelConfig) -> list[Entry]:
    return expand(cfg, TOP, LAYER)
