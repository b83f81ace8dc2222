"""IKE's demonstration pool and its retrieval: which pool records are nearest to an edit.

The paper embeds facts with a sentence encoder (all-MiniLM-L6-v2; Zce1112zslx/IKE
`encode_facts.py`, `semantic_search.py`: cosine similarity, 32 nearest neighbours), which we
cannot download. The default embedder is the edited model itself: hidden states (`resid`) of
one block, mean-pooled over tokens, centred by the pool mean (mean-pooled LM states share a
large common direction) and L2-normalised. `TfidfRetriever` is the lexical alternative; any
`Embedder` (texts -> [N E] array) plugs into `EmbeddingRetriever`.

Pool embeddings are computed once (jitted, batched by length) and cached on disk, keyed by the
model fingerprint, the layer and the pool file's sha256 (`cached_embeddings`), written
atomically; a file that disagrees with its key is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.eval import datasets as data
from jaxedit.io.atomic import atomic_path
from jaxedit.io.tokenizer import bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params, forward
from jaxedit.requests import EditRequest

CACHE_ENV = "JAXEDIT_CACHE"
CACHE_VERSION = 1
EMBEDDERS = ("hidden", "tfidf")


# ----------------------------------------------------------------------------- embedders


@runtime_checkable
class Embedder(Protocol):
    """texts -> [N E] float array. `key` names the function for the on-disk cache."""

    key: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


@partial(jax.jit, static_argnums=(0, 4))
def _mean_hidden(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    layer: int,
) -> Float[Array, "B D"]:
    # Stop after block `layer`: never compute what is not read.
    out = forward(cfg, params, tokens, mask, capture=("resid",), n_layers=layer + 1)
    h = out.captured["resid"][-1]  # [B T D], output of block `layer`
    w = mask.astype(jnp.float32)[..., None]
    return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


class HiddenStateEmbedder:
    """Mean-pooled `resid` of block `layer` of the model itself (jitted, length-bucketed)."""

    def __init__(self, lm: LanguageModel, layer: int, batch_size: int = 64):
        if not 0 <= layer < lm.config.n_layers:
            raise InputError(f"embed_layer {layer} out of range 0..{lm.config.n_layers - 1}")
        self.lm, self.layer, self.batch_size = lm, layer, batch_size
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:  # hashing every param takes a second: only when a cache needs it
            self._key = f"hidden-mean/{self.lm.fingerprint()}/layer{self.layer}"
        return self._key

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        tok = self.lm.tokenizer
        ids = [tok.encode(t) for t in texts]
        if any(not i for i in ids):
            raise InputError("cannot embed an empty text")
        out = np.zeros((len(ids), self.lm.config.d_model), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # tight length buckets
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            rows = self.batch_size if len(order) > self.batch_size else bucket(len(idx))
            b = tok.batch([ids[i] for i in idx] + [ids[idx[0]]] * (rows - len(idx)))
            e = _mean_hidden(
                self.lm.config,
                self.lm.params,
                jnp.asarray(b.tokens),
                jnp.asarray(b.mask),
                self.layer,
            )
            out[idx] = np.asarray(e)[: len(idx)]
        return out


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


# ----------------------------------------------------------------------------- retrievers


class EmbeddingRetriever:
    """Cosine nearest neighbours over embedded pool texts (optionally centred by the pool mean)."""

    def __init__(
        self,
        embedder: Callable[[Sequence[str]], np.ndarray],
        pool_vectors: np.ndarray,
        *,
        center: bool = True,
    ):
        if len(pool_vectors) == 0:
            raise InputError("empty demonstration pool")
        self.embedder = embedder
        self.mean = pool_vectors.mean(0) if center else np.zeros(pool_vectors.shape[1])
        self.pool = _normalize(pool_vectors - self.mean).astype(np.float32)

    def similarity(self, texts: Sequence[str]) -> np.ndarray:
        """[Q N] cosine similarity of each query text to every pool record."""
        q = _normalize(np.asarray(self.embedder(texts), np.float32) - self.mean)
        return q @ self.pool.T


class TfidfRetriever:
    """Lexical retrieval: cosine of TF-IDF vectors (smooth idf fitted on the pool, lower-case
    word tokens), via an inverted index so no [N V] matrix is ever built."""

    def __init__(self, pool_texts: Sequence[str]):
        if not pool_texts:
            raise InputError("empty demonstration pool")
        docs = [Counter(_words(t)) for t in pool_texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
        self.n = n
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for i, d in enumerate(docs):
            vec = {w: c * self.idf[w] for w, c in d.items()}
            norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
            for w, v in vec.items():
                p = postings.setdefault(w, ([], []))
                p[0].append(i)
                p[1].append(v / norm)
        self.postings = {w: (np.array(i), np.array(v)) for w, (i, v) in postings.items()}

    def similarity(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.n), np.float32)
        for q, t in enumerate(texts):
            vec = {w: c * self.idf[w] for w, c in Counter(_words(t)).items() if w in self.idf}
            norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
            for w, v in vec.items():
                idx, val = self.postings[w]
                out[q, idx] += (v / norm) * val
        return out


_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxedit"
    )
    return Path(root) / "ike"


def cached_embeddings(
    embedder: Embedder, texts: Sequence[str], pool_digest: str, directory: Path | None = None
) -> np.ndarray:
    """Embed the pool once; reuse the file when model, embedder and pool file all match.

    The file name and its stored metadata hold sha256(embedder key, pool digest, version); a
    file whose metadata or row count disagrees is recomputed. Writes go to a temporary file
    then `os.replace`, so a crash never leaves a half-written cache.
    """
    directory = Path(directory or default_cache_dir())
    meta = {"embedder": embedder.key, "pool": pool_digest, "n": len(texts), "v": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = directory / f"pool-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) == meta and z["vectors"].shape[0] == len(texts):
                    return z["vectors"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recompute and overwrite
    vectors = np.asarray(embedder(texts), np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # 0644, as any file the user makes
        np.savez(f, vectors=vectors, meta=np.array(json.dumps(meta, sort_keys=True)))
    return vectors


# ----------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class Pool:
    """Demonstration records; `digest` identifies their source (file sha256) for caches."""

    requests: list[EditRequest]
    digest: str
    source: str = ""

    @classmethod
    def from_requests(cls, requests: Sequence[EditRequest], source: str = "") -> Pool:
        h = hashlib.sha256()
        for r in requests:
            h.update(json.dumps(_record_json(r), sort_keys=True).encode())
        return cls(list(requests), h.hexdigest(), source)

    @classmethod
    def load(cls, path: str, limit: int | None = None) -> Pool:
        """The edit records of a data file (any format `jaxedit.eval.datasets` reads)."""
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise InputError(f"cannot read demonstration pool {path}: {e}") from e
        reqs = data.load(path, n=limit, skip_bad=True).requests
        if limit is not None:
            digest = f"{digest}:{limit}"
        return cls(reqs, digest, path)

    def __len__(self) -> int:
        return len(self.requests)


def _record_json(r: EditRequest) -> dict:
    return {
        "prompt": r.prompt,
        "subject": r.subject,
        "target_new": r.target_new,
        "target_true": r.target_true,
        "para": list(r.paraphrase_prompts),
        "nb": [(n.prompt, list(n.answers)) for n in r.neighborhood],
    }


def make_retriever(
    lm: LanguageModel,
    pool: Pool,
    keys: Sequence[str],
    embedder: str,
    layer: int,
    cache_dir: str | os.PathLike | None = None,
):
    """The pool's retriever over `keys` (one text per record): "hidden" (model states, cached
    on disk under `cache_dir`) or "tfidf"."""
    if embedder == "tfidf":
        return TfidfRetriever(keys)
    if embedder != "hidden":
        raise InputError(f"unknown IKE embedder {embedder!r}; choose one of {EMBEDDERS}")
    emb = HiddenStateEmbedder(lm, layer)
    directory = Path(cache_dir) if cache_dir is not None else None
    return EmbeddingRetriever(emb, cached_embeddings(emb, keys, pool.digest, directory))
