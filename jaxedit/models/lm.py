"""`LanguageModel`: a config, a params pytree, a tokenizer and (for context edits) a context.

Edits never mutate a model: `jaxedit.apply(lm, edit)` returns a new `LanguageModel` whose
params carry a weight edit, or whose `context` carries a context edit (IKE). Scoring and
generation read `context` and run it once into a KV cache in front of every query.

**Fingerprints** key every cache (statistics, target values, MEND editors, IKE embeddings):
two models share one only if their params are the same. Hashing every byte costs a pass over
the model on the host (16 GB for Llama-3-8B in bf16, and impossible on one host when the params
are split over several), so a model loaded from files is identified by what determines its
params: the files' content hashes (each computed once and cached by path, size and mtime:
`jaxedit.io.filehash`), the config, the dtype and the loader's version (`Origin`). Params
derived from it keep that key for every leaf that is still the very array loaded from the
files, and mix in the bytes of the leaves that are not: a weight edit, which replaces one
stacked matrix, hashes that matrix only, and an edited model never shares the original's
fingerprint. Models not loaded from files (random init, orbax), or whose files changed on disk
since, hash every byte, as does everything under `JAXEDIT_FULL_FINGERPRINT=1` or
`fingerprint(full=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxedit.models.config import ModelConfig

if TYPE_CHECKING:
    from jaxedit.edits import ContextEdit
    from jaxedit.io.tokenizer import TextTokenizer

Params = dict[str, Any]
FULL_FINGERPRINT_ENV = "JAXEDIT_FULL_FINGERPRINT"


def _leaf_paths(params: Params) -> list[tuple[str, Any]]:
    return sorted(
        ((str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)),
        key=lambda x: x[0],
    )


def _leaf_bytes(leaf: Any) -> bytes:
    """The leaf's bytes on this host, one leaf at a time (gathered from the other processes
    when it is split across hosts)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf).tobytes()


@dataclass(frozen=True, eq=False)
class Origin:
    """Params as loaded from files: `key()` names the files' content, config, dtype and loader
    (None once a file changed on disk since loading), `leaves` the arrays it loaded."""

    key: Callable[[], str | None]
    leaves: dict[str, weakref.ref]

    @classmethod
    def of(cls, params: Params, key: Callable[[], str | None]) -> Origin:
        return cls(key, {path: weakref.ref(leaf) for path, leaf in _leaf_paths(params)})

    def relaid(self, old: Params, new: Params) -> Origin:
        """This origin for `new`, leaf for leaf the same values as `old` in another placement."""
        leaves = {}
        for (path, before), (_, after) in zip(_leaf_paths(old), _leaf_paths(new), strict=True):
            ref = self.leaves.get(path)
            if ref is not None and ref() is before:
                leaves[path] = weakref.ref(after)
        return Origin(self.key, leaves)

    def fingerprint(self, params: Params) -> str | None:
        """sha256 over the key and the bytes of every leaf not loaded from the files; None
        when the key is gone (the full hash then decides)."""
        key = self.key()
        if key is None:
            return None
        h = hashlib.sha256(b"jaxedit-origin\0" + key.encode())
        for path, leaf in _leaf_paths(params):
            ref = self.leaves.get(path)
            if ref is not None and ref() is leaf:
                continue  # the very array loaded from the files
            h.update(path.encode())
            h.update(_leaf_bytes(leaf))
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class LanguageModel:
    """A loaded model: its config, params pytree and tokenizer. Edits give new instances."""

    name: str
    config: ModelConfig
    params: Params = field(repr=False)
    tokenizer: TextTokenizer = field(repr=False)
    context: ContextEdit | None = field(default=None, repr=False)
    origin: Origin | None = field(default=None, repr=False, compare=False)

    def with_params(self, params: Params) -> LanguageModel:
        return replace(self, params=params)

    def with_layout(self, params: Params) -> LanguageModel:
        """The same param values placed differently (e.g. sharded over a mesh): leaves that were
        loaded from files keep that origin, so the fingerprint does not change."""
        if self.origin is None:
            return self.with_params(params)
        return replace(self, params=params, origin=self.origin.relaid(self.params, params))

    def with_context(self, context: ContextEdit | None) -> LanguageModel:
        return replace(self, context=context)

    def context_text(self) -> str | None:
        """The text every query follows (a context edit fitted to the model's length), or None."""
        if self.context is None:
            return None
        return self.context.render(self.tokenizer, self.config.max_positions)

    def fingerprint(self, full: bool | None = None) -> str:
        """The key caches use for these params (module docstring): from the files they were
        loaded from, else (or with `full`, or $JAXEDIT_FULL_FINGERPRINT=1) every byte."""
        if full is None:
            full = os.environ.get(FULL_FINGERPRINT_ENV, "") not in ("", "0")
        if not full and self.origin is not None:
            fp = self.origin.fingerprint(self.params)
            if fp is not None:
                return fp
        return fingerprint(self.config, self.params)

    def has_fingerprint(self, fp: str) -> bool:
        """Whether `fp` names these params: this fingerprint, or the every-byte one (what
        files written before file-based fingerprints recorded; hashed only when needed)."""
        return fp == self.fingerprint() or fp == self.fingerprint(full=True)


def fingerprint(cfg: ModelConfig, params: Params) -> str:
    """sha256 over the config and every param byte: caches are keyed by exactly these weights."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path, leaf in _leaf_paths(params):
        h.update(path.encode())
        h.update(_leaf_bytes(leaf))
    return h.hexdigest()[:16]
