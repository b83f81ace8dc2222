"""One module per family, each owning its HF mapping: `from_hf(hf) -> ModelConfig` (refusing
fields it does not implement, by name), `to_hf(cfg)`, and `weight_map(cfg)` (a declarative
table of HF tensor names and our param paths, with small hooks: see `common`).

Every family module defines MODEL_TYPES (the HF `model_type`s it reads), FAMILY (its
`ModelConfig.family`), IGNORED (regexes of checkpoint buffers that are not weights) and ALIASES
(other names some checkpoints give a tensor). This module only dispatches.

The dispatcher lives here rather than in `jaxedit.models.config`: the family modules build
`ModelConfig`s, so a dispatcher in config.py would make config <-> families an import cycle.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig
from jaxedit.models.families import gpt2, gpt_neox, gptj, llama
from jaxedit.models.families.common import Entry

MODULES: tuple[ModuleType, ...] = (gpt2, gptj, gpt_neox, llama)
BY_MODEL_TYPE = {t: m for m in MODULES for t in m.MODEL_TYPES}
BY_FAMILY = {m.FAMILY: m for m in MODULES}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def for_model_type(model_type: Any) -> ModuleType:
    if model_type not in BY_MODEL_TYPE:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; "
            f"jaxedit supports {list(SUPPORTED_MODEL_TYPES)}"
        )
    return BY_MODEL_TYPE[model_type]


def for_config(cfg: ModelConfig) -> ModuleType:
    return BY_FAMILY[cfg.family]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a HF `config.json` dict. Raises ConfigError naming what is unsupported."""
    return for_model_type(hf.get("model_type")).from_hf(hf)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` that `transformers` loads into the same computation."""
    return for_model_type(cfg.model_type).to_hf(cfg)


def weight_map(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of this config, with the param paths it fills."""
    return for_config(cfg).weight_map(cfg)
