"""`LanguageModel`: a config, a params pytree, a tokenizer and (for context edits) a context.

Edits never mutate a model: `jaxedit.apply(lm, edit)` returns a new `LanguageModel` whose
params carry a weight edit, or whose `context` carries a context edit (IKE). Scoring and
generation read `context` and run it once into a KV cache in front of every query.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxedit.models.config import ModelConfig

if TYPE_CHECKING:
    from jaxedit.edits import ContextEdit
    from jaxedit.io.tokenizer import TextTokenizer

Params = dict[str, Any]


@dataclass(frozen=True)
class LanguageModel:
    """A loaded model: its config, params pytree and tokenizer. Edits give new instances."""

    name: str
    config: ModelConfig
    params: Params = field(repr=False)
    tokenizer: TextTokenizer = field(repr=False)
    context: ContextEdit | None = field(default=None, repr=False)

    def with_params(self, params: Params) -> LanguageModel:
        return replace(self, params=params)

    def with_context(self, context: ContextEdit | None) -> LanguageModel:
        return replace(self, context=context)

    def context_text(self) -> str | None:
        """The text every query follows (a context edit fitted to the model's length), or None."""
        if self.context is None:
            return None
        return self.context.render(self.tokenizer, self.config.max_positions)

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.params)


def fingerprint(cfg: ModelConfig, params: Params) -> str:
    """sha256 over the config and every param byte: caches are keyed by exactly these weights."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        h.update(str(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]
