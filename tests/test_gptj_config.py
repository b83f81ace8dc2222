"""GPT-J's real config.json (EleutherAI/gpt-j-6B) loads: the fields transformers' GPT-J code never
reads (`rotary`, `scale_attn_weights`, the classification head's `summary_*`) are accepted and
change nothing; a field that would change the numbers is still refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxedit import plan
from jaxedit.errors import ConfigError
from jaxedit.io.checkpoint import load
from jaxedit.models.families import config_from_hf
from jaxedit.models.transformer import forward_jit

GOLDEN = Path(__file__).parent / "goldens" / "gptj"
# What EleutherAI/gpt-j-6B's config.json has beyond the tiny golden's
REAL_EXTRAS = {
    "rotary": True,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "gradient_checkpointing": False,
}


def test_the_shipped_gpt_j_config_is_the_real_one_and_parses():
    hf = plan.hf_config("gpt-j")  # the short name for gpt-j-6b
    assert set(REAL_EXTRAS) - {"gradient_checkpointing"} <= set(hf)
    cfg = config_from_hf(hf)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim) == (28, 4096, 16, 256)
    assert cfg.d_ff == 16384 and cfg.rotary_dim == 64 and cfg.rotary_style == "interleaved"
    assert plan.model_config("gpt-j") == plan.model_config("gpt-j-6b")


def test_a_gpt_j_directory_with_the_real_fields_loads_the_same_model(tmp_path):
    d = tmp_path / "gptj"
    shutil.copytree(GOLDEN, d)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(hf | REAL_EXTRAS))
    a, b = load(GOLDEN), load(d)
    assert a.config == b.config
    tokens = np.array([[5, 17, 33, 2, 250, 9]], np.int32)
    np.testing.assert_array_equal(
        forward_jit(a.config, a.params, tokens).logits,
        forward_jit(b.config, b.params, tokens).logits,
    )
    # one field that would change the model is still refused, by name
    (d / "config.json").write_text(json.dumps(hf | REAL_EXTRAS | {"rotary_emb_base": 500}))
    with pytest.raises(ConfigError, match="rotary_emb_base"):
        load(d)
