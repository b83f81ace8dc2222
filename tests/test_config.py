"""HF config.json <-> ModelConfig: each family's features, round trips, refusals by name."""

from __future__ import annotations

import json

import pytest
from test_model_parity import FAMILIES, GOLDENS

from jaxedit.errors import ConfigError
from jaxedit.io.checkpoint import param_slots
from jaxedit.models.config import ModelConfig
from jaxedit.models.families import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf, weight_map


def hf(family: str) -> dict:
    return json.loads((GOLDENS / family / "config.json").read_text())


def test_family_features():
    c = {f: config_from_hf(hf(f)) for f in FAMILIES}
    assert c["gpt2"].positional == "learned" and c["gpt2"].tie_embeddings and c["gpt2"].qkv_bias
    assert c["gptj"].parallel_residual and c["gptj"].shared_parallel_norm
    assert c["gptj"].rotary_style == "interleaved" and c["gptj"].rotary_dim == 4
    assert c["gptj"].lm_head_bias and not c["gptj"].tie_embeddings
    assert c["gpt_neox"].parallel_residual and not c["gpt_neox"].shared_parallel_norm
    assert c["gpt_neox"].rotary_style == "half" and c["gpt_neox"].rotary_dim == 2  # 25% of 8
    assert c["llama"].n_kv_heads == 2 and c["llama"].n_heads == 4 and c["llama"].gated_mlp
    assert dict(c["llama"].rope_scaling)["rope_type"] == "llama3"
    assert c["llama"].rope_theta == 500000.0
    assert c["qwen2"].qkv_bias and not c["qwen2"].attn_out_bias and not c["qwen2"].tie_embeddings
    assert c["mistral"].sliding_window == 5 and c["mistral"].n_kv_heads == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip(family):
    cfg = config_from_hf(hf(family))
    assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_dict_round_trip(family):
    cfg = config_from_hf(hf(family)).replace(dtype="bfloat16")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("llama", {"model_type": "bert"}, "unsupported architecture"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic"}}, "dynamic"),
        ("llama", {"some_new_field": 1}, "some_new_field"),
        ("llama", {"hidden_act": "swish_v2"}, "swish_v2"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
        ("gptj", {"tie_word_embeddings": True}, "tie_word_embeddings"),
        ("gpt_neox", {"num_key_value_heads": 2}, "num_key_value_heads"),
        ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ("mistral", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
        ("llama", {"sliding_window": 4}, "sliding_window"),  # llama has none: not ignorable
    ],
)
def test_refusals_name_the_problem(family, change, message):
    d = {**hf(family), **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_hf(d)


def test_every_supported_model_type_has_a_golden():
    assert sorted(SUPPORTED_MODEL_TYPES) == sorted(FAMILIES)


@pytest.mark.parametrize(
    ("model_type", "change", "expect"),
    [
        # transformers' modeling code: llama reads attention_bias / mlp_bias, qwen2 always has
        # q/k/v biases and never o / MLP ones, mistral has none, whatever the config says
        ("llama", {"attention_bias": True}, dict(qkv_bias=True, attn_out_bias=True)),
        ("llama", {"mlp_bias": True}, dict(mlp_bias=True, qkv_bias=False)),
        ("qwen2", {"attention_bias": True}, dict(qkv_bias=True, attn_out_bias=False)),
        (
            "mistral",
            {"attention_bias": True, "mlp_bias": True},
            dict(qkv_bias=False, mlp_bias=False),
        ),
        # a field transformers omits when it equals the class default (False for these)
        ("llama", {"tie_word_embeddings": None}, dict(tie_embeddings=False)),
        ("qwen2", {"tie_word_embeddings": None}, dict(tie_embeddings=False)),
        ("gpt2", {"tie_word_embeddings": None}, dict(tie_embeddings=True)),
        ("gpt2", {"tie_word_embeddings": False}, dict(tie_embeddings=False)),
    ],
)
def test_family_variants_follow_transformers(model_type, change, expect):
    d = {k: v for k, v in {**hf(model_type), **change}.items() if v is not None}
    cfg = config_from_hf(d)
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert config_from_hf(config_to_hf(cfg)) == cfg


VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("gpt2", {"tie_embeddings": False}),
    ("gpt_neox", {"tie_embeddings": True, "qkv_bias": False, "attn_out_bias": False}),
    ("llama", {"tie_embeddings": False, "qkv_bias": True, "attn_out_bias": True, "mlp_bias": True}),
]


@pytest.mark.parametrize(("family", "change"), VARIANTS)
def test_weight_map_fills_every_param_exactly_once(family, change):
    """Each family's table, for each bias / tying option, covers the param layout with no gap
    (a gap would leave memory uninitialised) and no overlap, and names each HF tensor once."""
    cfg = config_from_hf(hf(family)).replace(**change)
    entries = weight_map(cfg)
    slots = [(path, e.layer) for e in entries for path in e.paths]
    assert len(slots) == len(set(slots))
    assert set(slots) == param_slots(cfg)
    names = [e.hf for e in entries]
    assert len(names) == len(set(names))
