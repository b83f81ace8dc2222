"""The statistics cache: one .npz per (model, layer, corpus, counts, dtype), never trusted blindly.

A file is keyed by the model fingerprint (sha256 over every param byte), the layer, the corpus
fingerprint (`jaxedit.stats.corpora.corpus_fingerprint`), the token / document counts, the
truncation length, the dtype and the key width. It is written atomically (a temp file beside
it, then `os.replace`) and checked on load: key fields, shape, finiteness and a checksum of the
matrix. Anything that does not match raises `CheckpointError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Float

from jaxedit.errors import CheckpointError
from jaxedit.io.atomic import atomic_path
from jaxedit.models.lm import LanguageModel

CACHE_ENV = "JAXEDIT_CACHE"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Stats:
    """C = E[k kᵀ] of one layer, with what it was computed from."""

    mom2: Float[np.ndarray, "F F"]  # float32 / float64
    count: int  # tokens seen
    meta: dict  # cache key fields + corpus / timing info

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])


_FP_CACHE: dict[int, tuple[weakref.ref, str]] = {}


def model_fingerprint(lm: LanguageModel) -> str:
    """`lm.fingerprint()` (sha256 over every param), computed once per LanguageModel object."""
    hit = _FP_CACHE.get(id(lm))
    if hit is not None and hit[0]() is lm:
        return hit[1]
    fp = lm.fingerprint()
    _FP_CACHE[id(lm)] = (weakref.ref(lm), fp)
    return fp


def default_cache_dir() -> Path:
    """$JAXEDIT_CACHE/stats, else $XDG_CACHE_HOME/jaxedit/stats, else ~/.cache/jaxedit/stats."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxedit"
    )
    return Path(root) / "stats"


def cache_key(
    lm: LanguageModel,
    layer: int,
    corpus_fp: str,
    n_tokens: int | None,
    n_samples: int | None,
    max_len: int,
    dtype: str,
) -> dict:
    return {
        "version": FORMAT_VERSION,
        "model": model_fingerprint(lm),
        "layer": int(layer),
        "corpus": corpus_fp,
        "n_tokens": n_tokens,
        "n_samples": n_samples,
        "max_len": int(max_len),
        "dtype": dtype,
        "width": int(lm.config.d_ff),
    }


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model']}_L{key['layer']}_{digest}.npz"


def _checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_stats(path: str | os.PathLike, stats: Stats) -> None:
    """Atomically: write a temp file beside `path`, then `os.replace` it into place."""
    meta = {**stats.meta, "count": stats.count, "sha256": _checksum(stats.mom2)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # 0644, as any file the user makes
        np.savez(fh, mom2=stats.mom2, meta=np.array(json.dumps(meta, sort_keys=True)))


def load_stats(path: str | os.PathLike, key: dict | None = None) -> Stats:
    """Read and validate a statistics file; raise `CheckpointError` on any mismatch."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mom2 = np.array(z["mom2"])
            meta = json.loads(str(z["meta"]))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable statistics file ({e})") from e
    if key is not None:
        diff = {k: (meta.get(k), v) for k, v in key.items() if meta.get(k) != v}
        if diff:
            raise CheckpointError(f"{path}: statistics were computed for other settings {diff}")
    F = meta.get("width")
    if mom2.shape != (F, F):
        raise CheckpointError(f"{path}: second moment has shape {mom2.shape}, expected ({F}, {F})")
    if not np.all(np.isfinite(mom2)):
        raise CheckpointError(f"{path}: second moment holds non-finite values")
    if _checksum(mom2) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (file modified or corrupt)")
    return Stats(mom2, int(meta["count"]), meta)
