"""IKE: in-context knowledge editing with retrieved demonstrations (Zheng et al. 2023,
"Can We Edit Factual Knowledge by In-Context Learning?").

No weight changes: the edit is a text prefix. For an edit (s, r, o -> o*) with fact
f = "{rewrite prompt} {o*}", a query x is scored as

    P(y | c, x),   c = d_1 d_2 … d_k  "New Fact: {f}\\nPrompt: "

where every demonstration d_i comes from a pool of other edit records (a training split),
in one of three kinds, one per evaluation axis (reference code: Zce1112zslx/IKE `icl.py`;
EasyEdit `easyeditor/models/ike/util.py` writes the same three strings):

    copy     (reliability)    "New Fact: {f'}\\nPrompt: {f'}\\n\\n"
    update   (generalization) "New Fact: {f'}\\nPrompt: {paraphrase'} {o*'}\\n\\n"
    retain   (locality)       "New Fact: {f'}\\nPrompt: {neighbour prompt'} {its true answer}\\n\\n"

Selection and order follow the paper's code: the k pool records nearest to the edit (cosine
similarity of embeddings) each give one demonstration; the kinds are a seeded shuffle of the
mix (k = 32: 4 copy, 12 update, 16 retain), and the demonstrations are ordered by similarity,
least similar first, so the nearest sits right before the new fact.

Retrieval embeds the record's fact f' (and the edit's fact f). The paper used a sentence
encoder (all-MiniLM-L6-v2), which we cannot download, so the default embedder is the edited
model itself: hidden states (`resid`) at one layer, mean-pooled over tokens, centred by the
pool mean (mean-pooled LM states share a large common direction) and L2-normalised.
`TfidfRetriever` is the lexical alternative; any `Embedder` (texts -> [N E] array) plugs in.
Pool embeddings are computed once (jitted, batched by length) and cached on disk, keyed by
the model fingerprint, the layer and the pool file's sha256, written atomically.

Defaults: k = 8 (mix 1 : 3 : 4 -> 1 copy, 3 update, 4 retain) keeps the prefix ~250 tokens
for CPU speed; `--k 32` is the paper's setting (~1000 tokens on SmolLM2). Contexts longer than
`max_tokens` lose their least similar demonstrations (with a warning), never the fact or the
query. `--zero-demo` is the ablation: only "New Fact: {f}\\nPrompt: ".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit.errors import InputError
from jaxedit.io.tokenizer import bucket
from jaxedit.methods.legacy import EditResult, Method, register
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params, forward
from jaxedit.requests import EditRequest

COPY, UPDATE, RETAIN = "copy", "update", "retain"
KINDS = (COPY, UPDATE, RETAIN)
PAPER_K = 32
PAPER_MIX = (4, 12, 16)  # copy, update, retain for k = 32 (Zheng et al. 2023, §3.2)
DEFAULT_K = 8
DEFAULT_LAYER = 4  # embedding layer: early enough to be cheap on CPU for a 10k-record pool
CACHE_ENV = "JAXEDIT_CACHE"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- format


def join(prompt: str, answer: str) -> str:
    """`"{prompt} {answer}"` with exactly one space between them."""
    return f"{prompt.rstrip()} {answer.strip()}"


def fact(r: EditRequest) -> str:
    """The new fact as a sentence: rewrite prompt + target_new."""
    return join(r.rewrite_prompt, r.target_new)


def demo(new_fact: str, prompt: str) -> str:
    return f"New Fact: {new_fact}\nPrompt: {prompt}\n\n"


def query_head(requests: Sequence[EditRequest]) -> str:
    """What precedes every query: "New Fact: {f}\\nPrompt: " (one line per fact if several)."""
    lines = "".join(f"New Fact: {fact(r)}\n" for r in requests)
    return f"{lines}Prompt: "


def demonstrations(r: EditRequest) -> dict[str, list[str]]:
    """All demonstrations a pool record can give, by kind (copy / update / retain)."""
    f = fact(r)
    return {
        COPY: [demo(f, f)],
        UPDATE: [demo(f, join(p, r.target_new)) for p in r.paraphrase_prompts],
        RETAIN: [demo(f, join(n.prompt, n.answers[0])) for n in r.neighborhood if n.answers],
    }


def mix_counts(k: int, mix: Sequence[float] = PAPER_MIX) -> tuple[int, int, int]:
    """Split k demonstrations by the mix ratios (largest remainder; (4,12,16) for k = 32)."""
    if k < 0:
        raise InputError(f"--k must be ≥ 0, got {k}")
    w = np.asarray(mix, np.float64)
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"--mix needs three non-negative weights (copy,update,retain), got {mix}")
    exact = k * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: k - counts.sum()]:
        counts[i] += 1
    return tuple(int(c) for c in counts)


# ----------------------------------------------------------------------------- retrieval


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

    def __init__(self, lm: LanguageModel, layer: int = DEFAULT_LAYER, batch_size: int = 64):
        if not 0 <= layer < lm.config.n_layers:
            raise InputError(f"--embed-layer {layer} out of range 0..{lm.config.n_layers - 1}")
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


class EmbeddingRetriever:
    """Cosine nearest neighbours over embedded pool texts (optionally centred by the pool mean)."""

    def __init__(self, embedder: Embedder, pool_vectors: np.ndarray, *, center: bool = True):
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


def cache_dir() -> Path:
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
    directory = Path(directory or cache_dir())
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
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, vectors=vectors, meta=np.array(json.dumps(meta, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
        from jaxedit.eval import datasets as data

        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise InputError(f"cannot read demonstration pool {path}: {e}") from e
        reqs = data.load(path, n=limit, skip_bad=True).requests
        if limit is not None:
            digest = f"{digest}:{limit}"
        return cls(reqs, digest, path)

    def keys(self) -> list[str]:
        """The text retrieval embeds for each record: its new fact."""
        return [fact(r) for r in self.requests]

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


# ----------------------------------------------------------------------------- IKE


@dataclass(frozen=True)
class IKEParams:
    k: int = DEFAULT_K
    mix: tuple[float, float, float] = PAPER_MIX
    seed: int = 0
    zero_demo: bool = False
    max_tokens: int | None = None  # context + longest query; default: the model's maximum


@dataclass(frozen=True)
class Selected:
    """One chosen demonstration."""

    kind: str
    text: str
    source: int  # index into the pool
    similarity: float


def select(
    r: EditRequest,
    pool: Pool,
    similarity: np.ndarray,
    hp: IKEParams,
) -> list[Selected]:
    """The k nearest pool records, kinds from a seeded shuffle of the mix, ordered least
    similar first (the nearest demonstration sits next to the new fact).

    A record that cannot give its assigned kind (no paraphrase / no neighbour) gives a copy.
    Records with the edit's own rewrite prompt are skipped (no leakage when pool = test set).
    """
    k = min(hp.k, len(pool))
    if hp.k > len(pool):
        warnings.warn(f"IKE: k={hp.k} > pool size {len(pool)}; using all {len(pool)}", stacklevel=2)
    own = (r.prompt, r.subject)
    ranked = [int(i) for i in np.argsort(-similarity, kind="stable")]
    chosen = [i for i in ranked if (pool.requests[i].prompt, pool.requests[i].subject) != own][:k]
    c, u, t = mix_counts(len(chosen), hp.mix)
    kinds = [COPY] * c + [UPDATE] * u + [RETAIN] * t
    # Per-edit seed: the same edit always gets the same demonstrations.
    rng = random.Random(hp.seed * 1_000_003 + zlib.crc32(fact(r).encode()))
    rng.shuffle(kinds)
    out = []
    for i, kind in zip(chosen, kinds, strict=True):
        options = demonstrations(pool.requests[i])
        if not options[kind]:
            kind = COPY
        out.append(Selected(kind, rng.choice(options[kind]), i, float(similarity[i])))
    return out[::-1]


def build_context(demos: Sequence[str], requests: Sequence[EditRequest]) -> str:
    """The prefix every query of the edit follows: demonstrations, then the new fact."""
    return "".join(demos) + query_head(requests)


def _query_tokens(lm: LanguageModel, r: EditRequest) -> int:
    """Tokens of the longest query + answer of a request (what must fit after the context)."""
    tok = lm.tokenizer
    texts = [join(r.rewrite_prompt, r.target_new)]
    answers = [a for a in (r.target_new, r.target_true) if a]
    for p in r.paraphrase_prompts:
        texts += [join(p, a) for a in answers]
    for probe in (*r.neighborhood, *r.portability, *r.reverse):
        texts += [join(probe.prompt, a) for a in (*probe.answers, r.target_new)]
    return max(len(tok.encode_continuation(" " + t)) for t in texts)


def fit_context(
    lm: LanguageModel, demos: list[Selected], requests: Sequence[EditRequest], max_tokens: int
) -> tuple[list[Selected], int]:
    """Drop the least similar demonstrations until context + longest query fit `max_tokens`.

    Returns (kept demonstrations, number dropped). Never cuts the fact or a query: if those
    alone do not fit, that is an error.
    """
    tok = lm.tokenizer
    need = max(_query_tokens(lm, r) for r in requests)
    head = len(tok.encode(query_head(requests)))
    if head + need > max_tokens:
        raise InputError(
            f"the new fact and query need {head + need} tokens, more than the {max_tokens} "
            "the model accepts"
        )
    dropped = 0
    # Demonstrations are ordered least similar first: cut from the front.
    while dropped < len(demos):
        context = build_context([d.text for d in demos[dropped:]], requests)
        if len(tok.encode(context)) + need <= max_tokens:
            break
        dropped += 1
    if dropped:
        warnings.warn(
            f"IKE: context too long for {max_tokens} tokens; dropped the {dropped} least "
            f"similar of {len(demos)} demonstrations",
            stacklevel=2,
        )
    return demos[dropped:], dropped


class IKE:
    """Prepared IKE editor: `IKE(lm, pool, retriever, hp)(lm, requests) -> EditResult`."""

    def __init__(self, pool: Pool | None, retriever, hp: IKEParams):
        if not hp.zero_demo and (pool is None or len(pool) == 0):
            raise InputError("IKE needs a non-empty demonstration pool (--demos PATH)")
        self.pool, self.retriever, self.hp = pool, retriever, hp

    def __call__(self, lm: LanguageModel, requests: Sequence[EditRequest]) -> EditResult:
        requests = list(requests)
        if not requests:
            raise InputError("no edit requests")
        hp = self.hp
        chosen: list[Selected] = []
        if not hp.zero_demo and hp.k > 0:
            sim = self.retriever.similarity([fact(requests[0])])[0]
            chosen = select(requests[0], self.pool, sim, hp)
        limit = min(hp.max_tokens or lm.config.max_positions, lm.config.max_positions)
        chosen, dropped = fit_context(lm, chosen, requests, limit)
        context = build_context([d.text for d in chosen], requests)
        record = {
            "facts": [fact(r) for r in requests],
            "demonstrations": [
                {"kind": d.kind, "text": d.text, "pool_index": d.source, "similarity": d.similarity}
                for d in chosen
            ],
        }
        kinds = Counter(d.kind for d in chosen)
        summary = {
            "k": len(chosen),
            **{f"n_{kd}": kinds.get(kd, 0) for kd in KINDS},
            "dropped": dropped,
            "context_tokens": len(lm.tokenizer.encode(context)),
            "zero_demo": hp.zero_demo,
        }
        return EditResult(model=lm, record=record, context=context, summary=summary)


def make_retriever(
    lm: LanguageModel, pool: Pool, embedder: str = "hidden", layer: int = DEFAULT_LAYER
):
    """The pool's retriever: "hidden" (model states, cached on disk) or "tfidf"."""
    if embedder == "tfidf":
        return TfidfRetriever(pool.keys())
    if embedder != "hidden":
        raise InputError(f"unknown --embedder {embedder!r}; choose hidden or tfidf")
    emb = HiddenStateEmbedder(lm, layer)
    return EmbeddingRetriever(emb, cached_embeddings(emb, pool.keys(), pool.digest))


# ----------------------------------------------------------------------------- CLI method


def _parse_mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.replace(":", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise InputError(
            f"--mix takes three numbers copy,update,retain (e.g. 4,12,16), got {text!r}"
        )
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demos", default=None, help="IKE: demonstration pool (edit records file)")
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"IKE: demonstrations per edit (default {DEFAULT_K}; the paper uses {PAPER_K})",
    )
    p.add_argument(
        "--mix",
        default="4,12,16",
        help="IKE: copy,update,retain proportions (default the paper's 4,12,16)",
    )
    p.add_argument("--zero-demo", action="store_true", help="IKE ablation: only the new fact")
    p.add_argument(
        "--embedder", default="hidden", choices=["hidden", "tfidf"], help="IKE retrieval"
    )
    p.add_argument("--embed-layer", type=int, default=DEFAULT_LAYER, help="IKE: embedding layer")
    p.add_argument("--pool-size", type=int, default=None, help="IKE: first N pool records only")
    p.add_argument(
        "--max-context", type=int, default=None, help="IKE: token limit (default: model)"
    )


def prepare(lm: LanguageModel, args: argparse.Namespace) -> IKE:
    hp = IKEParams(
        k=getattr(args, "k", DEFAULT_K),
        mix=_parse_mix(getattr(args, "mix", "4,12,16")),
        seed=getattr(args, "seed", 0) or 0,
        zero_demo=bool(getattr(args, "zero_demo", False)),
        max_tokens=getattr(args, "max_context", None),
    )
    mix_counts(hp.k, hp.mix)  # validate early
    if hp.zero_demo or hp.k == 0:
        return IKE(None, None, hp)
    path = getattr(args, "demos", None)
    if not path:
        raise InputError("--method ike needs --demos PATH (a pool of edit records), or --zero-demo")
    pool = Pool.load(path, getattr(args, "pool_size", None))
    retriever = make_retriever(
        lm, pool, getattr(args, "embedder", "hidden"), getattr(args, "embed_layer", DEFAULT_LAYER)
    )
    return IKE(pool, retriever, hp)


register(Method("ike", add_arguments, prepare))
