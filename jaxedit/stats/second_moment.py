"""Second-moment statistics of MLP keys: C = E[k kᵀ] at `mlp_key` of one layer (ROME §3, eq. 2).

ROME's closed-form edit needs the uncentred second moment of the keys that enter the MLP
output projection of layer l, estimated over a text corpus:

    C = (1/N) Σ_n k_n k_nᵀ,      k_n = mlp_key[l] at token n,  over all non-padding tokens.

How it is computed here (and why):
- the forward stops at layer l (`n_layers=l+1`): nothing above it and no logits are computed;
- documents are packed by length into shape buckets, so the jitted step compiles once per
  bucket; per-batch sums Σ k kᵀ are fp32 on device and accumulated in fp64 on the host;
- batches are sharded over a 1-D mesh ("data") of all local devices; params are replicated.
  The per-device partial sums are reduced by XLA (the einsum contracts the sharded axis);
- the result is cached on disk, keyed by the model fingerprint, layer, corpus fingerprint,
  token / document counts and dtype; written atomically (temp file + `os.replace`) and
  validated on load (key, shape, finiteness, checksum).

Corpora: a text / JSONL file or a folder of them (one document per non-empty line, or the
"text" field of each JSON line); `wikitext` / `wikipedia` through HF `datasets` when installed
and online; `self`, text sampled from the model itself (the offline default).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from jaxedit.errors import CheckpointError, InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params, forward

CACHE_ENV = "JAXEDIT_CACHE"
HF_CORPORA = {
    "wikitext": ("wikitext", "wikitext-103-raw-v1"),
    "wikipedia": ("wikipedia", "20220301.en"),
}
SELF_SEQ_LEN = 64  # tokens per document sampled from the model (`self` corpus): short rows,
# large batches, because sampling is one step per token
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- fingerprints

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
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxedit"
    )
    return Path(root) / "stats"


# ----------------------------------------------------------------------------- sampling


def start_token(tok) -> int:
    """The document separator the model saw in pre-training (GPT-2's and SmolLM's
    "<|endoftext|>"), else its BOS, else EOS: what generated text is conditioned on."""
    eot = tok.tok.token_to_id("<|endoftext|>")
    if eot is not None:
        return int(eot)
    if tok.bos_id is not None:
        return int(tok.bos_id)
    if tok.eos_id is not None:
        return int(tok.eos_id)
    raise InputError("the tokenizer has no BOS / EOS token to start sampling from")


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _sample(
    cfg: ModelConfig, params: Params, key, n: int, length: int, top_k: int, start, temperature
) -> Int[Array, "N S"]:
    """n sequences of `length` new tokens after `start`, top-k (0 = all) sampling, KV-cached."""
    prompt = jnp.full((n, 1), start, jnp.int32)
    mask = jnp.ones((n, 1), bool)
    pre = forward(
        cfg, params, prompt, mask, logit_positions=jnp.zeros((n, 1), jnp.int32), return_kv=True
    )
    k, v = pre.kv
    pad = ((0, 0), (0, 0), (0, length), (0, 0), (0, 0))
    cache = KVCache(jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(mask, ((0, 0), (0, length))))

    def pick(logits, key):
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, -1).astype(jnp.int32)

    def step(carry, i):
        cache, logits, key = carry
        key, sub = jax.random.split(key)
        tok = pick(logits, sub)
        out = forward(
            cfg, params, tok[:, None], jnp.ones((n, 1), bool), cache=cache, return_kv=True
        )
        nk, nv = out.kv
        cache = KVCache(
            jax.lax.dynamic_update_slice_in_dim(cache.k, nk.astype(cache.k.dtype), 1 + i, 2),
            jax.lax.dynamic_update_slice_in_dim(cache.v, nv.astype(cache.v.dtype), 1 + i, 2),
            cache.mask.at[:, 1 + i].set(True),
        )
        return (cache, out.logits[:, 0], key), tok

    _, toks = jax.lax.scan(step, (cache, pre.logits[:, 0], key), jnp.arange(length))
    return toks.T


def sample_tokens(
    lm: LanguageModel,
    n: int,
    length: int,
    *,
    seed: int = 0,
    top_k: int = 0,
    temperature: float = 1.0,
    chunk: int = 128,
) -> np.ndarray:
    """[n, length] token ids sampled from the model after its start token (deterministic in
    `seed`; `top_k=0` samples the full distribution)."""
    start = start_token(lm.tokenizer)
    out = []
    chunk = max(1, min(chunk, n))
    for i, lo in enumerate(range(0, n, chunk)):
        m = min(chunk, n - lo)
        key = jax.random.fold_in(jax.random.key(seed), i)
        toks = _sample(
            lm.config,
            lm.params,
            key,
            chunk,
            length,
            int(top_k),
            jnp.int32(start),
            jnp.float32(temperature),
        )
        out.append(np.asarray(toks)[:m])
    return np.concatenate(out, 0) if out else np.zeros((0, length), np.int32)


# ----------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Tokenized documents (lists of ids) and a fingerprint of where they came from."""

    name: str
    fingerprint: str
    docs: list[list[int]]


def _text_docs(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".txt", ".raw", ".jsonl", ".json", "")]
    if not files:
        raise InputError(f"corpus {path}: no .txt / .raw / .jsonl files")
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if f.suffix in (".jsonl", ".json"):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{f}:{i + 1}: not a JSON line ({e})") from e
                    text = rec.get("text") if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise InputError(f"{f}:{i + 1}: JSON line without a string 'text' field")
                else:
                    text = line.rstrip("\n")
                if text.strip():
                    yield text


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _take(
    texts: Iterator[str], tok, max_len: int, n_tokens: int | None, n_samples: int | None
) -> list[list[int]]:
    docs, total = [], 0
    for text in texts:
        ids = tok.encode(text)[:max_len]
        if n_tokens is not None:
            ids = ids[: n_tokens - total]
        if ids:
            docs.append(ids)
            total += len(ids)
        if (n_tokens is not None and total >= n_tokens) or (
            n_samples is not None and len(docs) >= n_samples
        ):
            break
    return docs


def load_corpus(
    lm: LanguageModel,
    corpus: str,
    *,
    n_tokens: int | None = None,
    n_samples: int | None = None,
    max_len: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> Corpus:
    """Documents of `corpus` ('self', 'wikitext', 'wikipedia', or a path), truncated to
    `max_len` tokens each, until `n_tokens` tokens or `n_samples` documents."""
    if n_tokens is None and n_samples is None:
        raise InputError("give a token count (--tokens) or a document count (--samples)")
    if (n_tokens is not None and n_tokens <= 0) or (n_samples is not None and n_samples <= 0):
        raise InputError("token / document counts must be positive")
    tok = lm.tokenizer
    if corpus == "self":
        length = min(max_len, SELF_SEQ_LEN) - 1
        n = n_samples if n_samples is not None else math.ceil(n_tokens / (length + 1))
        if progress:
            print(f"sampling {n} x {length} tokens from the model ...", file=sys.stderr)
        toks = sample_tokens(lm, n, length, seed=seed)
        start = start_token(tok)
        docs = [[start, *row.tolist()] for row in toks]
        if n_tokens is not None:  # trim to exactly n_tokens
            out, total = [], 0
            for d in docs:
                d = d[: n_tokens - total]
                if d:
                    out.append(d)
                    total += len(d)
            docs = out
        return Corpus("self", _corpus_fingerprint("self", seed, max_len), docs)
    if corpus in HF_CORPORA:
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            raise InputError(
                f"corpus {corpus!r} needs the `datasets` package and network access; "
                "use --corpus self (offline) or a local text file"
            ) from e
        name, config = HF_CORPORA[corpus]
        try:
            ds = datasets.load_dataset(name, config, split="train", streaming=True)
        except Exception as e:
            raise InputError(f"could not load {name}/{config} from the HF hub: {e}") from e
        texts = (r["text"] for r in ds if r["text"].strip())
        return Corpus(
            corpus, f"hf-{name}-{config}", _take(texts, tok, max_len, n_tokens, n_samples)
        )
    path = Path(corpus).expanduser()
    if not path.exists():
        raise InputError(
            f"corpus {corpus!r} is not 'self', {sorted(HF_CORPORA)}, or an existing path"
        )
    docs = _take(_text_docs(path), tok, max_len, n_tokens, n_samples)
    if not docs:
        raise InputError(f"corpus {path} holds no text")
    return Corpus(str(path), f"file-{_file_fingerprint(path)}", docs)


# ----------------------------------------------------------------------------- packing


def pack(
    docs: list[list[int]], pad_id: int, batch_tokens: int, multiple: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens [B T], mask [B T]) batches of documents sorted by length, T a `fine_bucket` and
    B = batch_tokens // T rounded to a multiple of the device count: one compile per bucket."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    i = 0
    while i < len(order):
        T = fine_bucket(len(docs[order[i]]))  # ≤ 1/3 padding
        B = max(multiple, (max(1, batch_tokens // T) // multiple) * multiple)
        rows = [docs[j] for j in order[i : i + B]]
        i += len(rows)
        tokens = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), bool)
        for r, d in enumerate(rows):  # right padding; positions come from the mask
            tokens[r, : len(d)] = d
            mask[r, : len(d)] = True
        yield tokens, mask


# ----------------------------------------------------------------------------- statistics


@partial(jax.jit, static_argnums=(0, 1))
def _moment_sum(
    cfg: ModelConfig, layer: int, params: Params, tokens, mask
) -> tuple[Float[Array, "F F"], Int[Array, ""]]:
    """Σ k kᵀ over the real tokens of one batch, keys of `layer` (forward stops there)."""
    out = forward(cfg, params, tokens, mask, capture=("mlp_key",), n_layers=layer + 1)
    keys_btf = out.captured["mlp_key"][layer].astype(jnp.float32)
    keys_btf = jnp.where(mask[..., None], keys_btf, 0.0)
    kk = jnp.einsum("btf,btg->fg", keys_btf, keys_btf, precision=jax.lax.Precision.HIGHEST)
    return kk, jnp.sum(mask, dtype=jnp.int32)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every local device), axis "data" (batches are
    split along it)."""
    return Mesh(np.array(list(devices) if devices is not None else jax.local_devices()), ("data",))


@dataclass(frozen=True)
class Stats:
    """C = E[k kᵀ] of one layer, with what it was computed from."""

    mom2: np.ndarray  # [F F] float32 / float64
    count: int  # tokens seen
    meta: dict  # cache key fields + corpus / timing info

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])


def second_moment(
    lm: LanguageModel,
    layer: int,
    docs: list[list[int]],
    *,
    batch_tokens: int = 4096,
    dtype: str = "float32",
    progress: bool = False,
    devices=None,
) -> tuple[np.ndarray, int]:
    """Stream `docs` through the model; return (C [F F], token count). Data-parallel."""
    cfg = lm.config
    if not 0 <= layer < cfg.n_layers:
        raise InputError(f"layer {layer} out of range 0..{cfg.n_layers - 1}")
    if dtype not in ("float32", "float64"):
        raise InputError(f"statistics dtype must be float32 or float64, not {dtype!r}")
    mesh = data_mesh(devices)
    n_dev = mesh.devices.size
    replicated = NamedSharding(mesh, PartitionSpec())
    by_batch = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(lm.params, replicated)
    acc = np.zeros((cfg.d_ff, cfg.d_ff), np.float64)
    count = 0
    total = sum(len(d) for d in docs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total, unit="tok", unit_scale=True, desc=f"stats L{layer}", file=sys.stderr
        )
    pending = None  # overlap: dispatch batch i+1 before reading batch i back
    for tokens, mask in pack(docs, lm.tokenizer.pad_id, batch_tokens, n_dev):
        step = _moment_sum(
            cfg, layer, params, jax.device_put(tokens, by_batch), jax.device_put(mask, by_batch)
        )
        if pending is not None:
            acc, count = _accumulate(acc, count, pending, bar)
        pending = step
    if pending is not None:
        acc, count = _accumulate(acc, count, pending, bar)
    if bar is not None:
        bar.close()
    if count == 0:
        raise InputError("the corpus produced no tokens")
    mom2 = acc / count
    return mom2.astype(dtype), count


def _accumulate(acc, count, step, bar):
    kk, n = step
    n = int(n)
    acc = acc + np.asarray(kk, np.float64)
    if bar is not None:
        bar.update(n)
    return acc, count + n


# ----------------------------------------------------------------------------- cache


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


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model']}_L{key['layer']}_{digest}.npz"


def _checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def save_stats(path: Path, stats: Stats) -> None:
    """Atomically: write a temp file beside `path`, then `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**stats.meta, "count": stats.count, "sha256": _checksum(stats.mom2)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, mom2=stats.mom2, meta=np.array(json.dumps(meta, sort_keys=True)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_stats(path: Path, key: dict | None = None) -> Stats:
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


def layer_stats(
    lm: LanguageModel,
    layer: int,
    corpus: str = "self",
    *,
    n_tokens: int | None = 16384,
    n_samples: int | None = None,
    max_len: int = 256,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    on_bad_cache: str = "rebuild",
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> Stats:
    """C = E[k kᵀ] at `mlp_key` of `layer` over `corpus`, from the cache when it is valid.

    A cache file that is corrupt or does not match the key is rebuilt (`on_bad_cache=
    "rebuild"`, with a warning on stderr) or refused (`"error"`): never silently used.
    """
    if on_bad_cache not in ("rebuild", "error"):
        raise ValueError("on_bad_cache must be 'rebuild' or 'error'")
    if not 0 <= layer < lm.config.n_layers:
        raise InputError(f"layer {layer} out of range 0..{lm.config.n_layers - 1}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_fp = _corpus_fingerprint(corpus, seed, max_len)
    key = cache_key(lm, layer, corpus_fp, n_tokens, n_samples, max_len, dtype)
    path = cache_path(cache_dir, key)
    if use_cache and path.exists():
        try:
            st = load_stats(path, key)
            return Stats(st.mom2, st.count, {**st.meta, "cache": str(path), "from_cache": True})
        except CheckpointError as e:
            if on_bad_cache == "error":
                raise
            print(f"jaxedit stats: {e}; recomputing", file=sys.stderr)
    t0 = time.perf_counter()
    c = load_corpus(
        lm,
        corpus,
        n_tokens=n_tokens,
        n_samples=n_samples,
        max_len=max_len,
        seed=seed,
        progress=progress,
    )
    t1 = time.perf_counter()
    mom2, count = second_moment(
        lm, layer, c.docs, batch_tokens=batch_tokens, dtype=dtype, progress=progress
    )
    t2 = time.perf_counter()
    meta = {
        **key,
        "corpus_name": c.name,
        "documents": len(c.docs),
        "corpus_seconds": round(t1 - t0, 3),
        "seconds": round(t2 - t1, 3),
        "tokens_per_s": round(count / max(t2 - t1, 1e-9), 1),
        "devices": jax.local_device_count(),
    }
    st = Stats(mom2, count, meta)
    if use_cache:
        save_stats(path, st)
    return Stats(
        mom2, count, {**meta, "cache": str(path) if use_cache else None, "from_cache": False}
    )


def _corpus_fingerprint(corpus: str, seed: int, max_len: int) -> str:
    """Cheap corpus identity for the cache key (file contents are hashed, not re-tokenized)."""
    if corpus == "self":  # sampled at temperature 1 from the start token, under `seed`
        return f"self-s{seed}-t1.0-len{min(max_len, SELF_SEQ_LEN)}"
    if corpus in HF_CORPORA:
        name, config = HF_CORPORA[corpus]
        return f"hf-{name}-{config}"
    path = Path(corpus).expanduser()
    if not path.exists():
        raise InputError(
            f"corpus {corpus!r} is not 'self', {sorted(HF_CORPORA)}, or an existing path"
        )
    return f"file-{_file_fingerprint(path)}"
