"""Text corpora for key statistics: documents as token-id lists, with a fingerprint for caches.

    self        text sampled from the model itself (offline; temperature 1 from its start token)
    wikitext    WikiText-103 (`wikitext`, `wikitext-103-raw-v1`), HF `datasets`, online
    wikipedia   the maintained English Wikipedia dump (`wikimedia/wikipedia`, `20231101.en`),
                HF `datasets`, online
    PATH        a .txt / .raw / .jsonl file or a folder of them (one document per non-empty
                line, or the "text" field of each JSON line), read in order

The two hub corpora are read as kmeng01/rome's `layer_stats` reads them: a fixed pseudo-random
sample of rows, drawn by shuffling all row indices with `random.Random(seed)` (its
`FixedRandomSubsetSampler`) and taking them in that order, blank rows skipped, until the
token or document count is reached. Taking the first N articles instead would measure the
keys of a few alphabetically adjacent topics. (The reference names the legacy script data set
`wikipedia`/`20200501.en`, which current `datasets` versions no longer load.)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxedit import progress as progress_bars
from jaxedit.errors import InputError
from jaxedit.io.text import read_text
from jaxedit.models.config import ModelConfig
from jaxedit.models.generate import prefill_and_decode
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import Params

HF_CORPORA = {
    "wikitext": ("wikitext", "wikitext-103-raw-v1"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
}
# Tokens per document sampled from the model (`self`): short rows, large batches, because
# sampling costs one step per token.
SELF_SEQ_LEN = 64

# (hub name, config) -> an indexable data set of {"text": str} rows (its "train" split).
DatasetLoader = Callable[[str, str], Sequence[dict]]


@dataclass(frozen=True)
class Corpus:
    """Tokenized documents (lists of ids) and a fingerprint of where they came from."""

    name: str
    fingerprint: str
    docs: list[list[int]]


# ----------------------------------------------------------------------------- self: sampling


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


_SAMPLING_BARS: list = []  # the bar of the sampling under way, if one is shown (host side)


def _sampled_step(i) -> None:
    if _SAMPLING_BARS:
        _SAMPLING_BARS[-1].update(1)


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _sample(
    cfg: ModelConfig, params: Params, key, n: int, length: int, top_k: int, start, temperature
) -> Int[Array, "N S"]:
    """n sequences of `length` new tokens after `start`, top-k (0 = all) sampling, KV-cached."""
    prompt = jnp.full((n, 1), start, jnp.int32)

    def pick(key, logits, i):
        # Each step tells the host (a bar when one is shown; nothing otherwise): the callback is
        # in the program either way, so showing progress cannot change a sample.
        jax.debug.callback(_sampled_step, i)
        key, sub = jax.random.split(key)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return key, jax.random.categorical(sub, logits, -1).astype(jnp.int32)

    return prefill_and_decode(cfg, params, None, prompt, jnp.ones((n, 1), bool), length, pick, key)


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


def _self_docs(
    lm: LanguageModel,
    n_tokens: int | None,
    n_samples: int | None,
    max_len: int,
    seed: int,
    progress,
) -> list[list[int]]:
    length = min(max_len, SELF_SEQ_LEN) - 1
    n = n_samples if n_samples is not None else math.ceil(n_tokens / (length + 1))
    start = start_token(lm.tokenizer)
    calls = math.ceil(n / max(1, min(128, n)))  # sample_tokens' chunks, one step per token
    with progress_bars.bar(calls * length, f"sampling {n} x {length} tokens", "step",
                           enabled=bool(progress)) as bar:  # fmt: skip
        _SAMPLING_BARS.append(bar)
        try:
            rows = sample_tokens(lm, n, length, seed=seed)
        finally:
            _SAMPLING_BARS.pop()
    docs = [[start, *row.tolist()] for row in rows]
    return _trim(docs, n_tokens)


# ----------------------------------------------------------------------------- files and hub


def _text_docs(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in (".txt", ".raw", ".jsonl", ".json", "")]
    if not files:
        raise InputError(f"corpus {path}: no .txt / .raw / .jsonl files")
    for f in files:
        try:
            yield from _file_texts(f)
        except UnicodeDecodeError:
            read_text(f, "corpus")  # raises the one-line InputError naming file, line and byte
            raise


def _file_texts(f: Path) -> Iterator[str]:
    """The non-blank texts of one corpus file (lines, or JSON lines' "text"), streamed."""
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


def file_fingerprint(path: Path) -> str:
    """sha256 (16 hex digits) over the names and bytes of a file or of a folder's files."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# Where a user sets the statistics corpus: hints name exactly these.
CORPUS_FLAGS = "`--set mom2_corpus=self` for edit / eval, `--corpus self` for jaxedit stats"


def load_hf_dataset(name: str, config: str) -> Sequence[dict]:
    """The "train" split of a hub data set (downloaded once, memory-mapped by `datasets`)."""
    try:
        import datasets
    except ImportError as e:
        raise InputError(
            f"corpus {name}/{config} needs the `datasets` package and network access; use the "
            f"corpus 'self' (offline) or a local text file instead ({CORPUS_FLAGS})"
        ) from e
    try:
        return datasets.load_dataset(name, config, split="train")
    except Exception as e:  # network, auth and format errors all end here
        raise InputError(
            f"could not load {name}/{config} from the HF hub ({e}); the corpus 'self' works "
            f"offline ({CORPUS_FLAGS})"
        ) from e


def sampled_texts(dataset: Sequence[dict], seed: int) -> Iterator[str]:
    """The rows' "text" in a fixed pseudo-random order (all indices shuffled by
    `random.Random(seed)`, as the reference's `FixedRandomSubsetSampler`); blank rows skipped."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    for i in order:
        text = dataset[i]["text"]
        if text.strip():
            yield text


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


def _trim(docs: list[list[int]], n_tokens: int | None) -> list[list[int]]:
    """The documents cut to exactly `n_tokens` tokens in all (None: unchanged)."""
    if n_tokens is None:
        return docs
    out, total = [], 0
    for d in docs:
        d = d[: n_tokens - total]
        if d:
            out.append(d)
            total += len(d)
    return out


# ----------------------------------------------------------------------------- entry points


def corpus_fingerprint(corpus: str, seed: int, max_len: int) -> str:
    """Corpus identity for the statistics cache key (files are hashed, not re-tokenized)."""
    if corpus == "self":  # sampled at temperature 1 from the start token, under `seed`
        return f"self-s{seed}-t1.0-len{min(max_len, SELF_SEQ_LEN)}"
    if corpus in HF_CORPORA:
        name, config = HF_CORPORA[corpus]
        return f"hf-{name}-{config}-random-s{seed}"
    path = Path(corpus).expanduser()
    if not path.exists():
        raise InputError(
            f"corpus {corpus!r} is not 'self', {sorted(HF_CORPORA)}, or an existing path"
        )
    return f"file-{file_fingerprint(path)}"


def load_corpus(
    lm: LanguageModel,
    corpus: str,
    *,
    n_tokens: int | None = None,
    n_samples: int | None = None,
    max_len: int = 256,
    seed: int = 0,
    progress: bool = False,
    dataset_loader: DatasetLoader | None = None,
) -> Corpus:
    """Documents of `corpus` ('self', 'wikitext', 'wikipedia', or a path), each truncated to
    `max_len` tokens, until `n_tokens` tokens or `n_samples` documents (whichever first).

    `dataset_loader(name, config)` replaces the hub download (tests pass a local stand-in).
    """
    if n_tokens is None and n_samples is None:
        raise InputError("give a token count (--tokens) or a document count (--samples)")
    if (n_tokens is not None and n_tokens <= 0) or (n_samples is not None and n_samples <= 0):
        raise InputError("token / document counts must be positive")
    fp = corpus_fingerprint(corpus, seed, max_len)
    if corpus == "self":
        return Corpus("self", fp, _self_docs(lm, n_tokens, n_samples, max_len, seed, progress))
    if corpus in HF_CORPORA:
        name, config = HF_CORPORA[corpus]
        if progress:
            print(f"reading {name}/{config} (random sample, seed {seed}) ...", file=sys.stderr)
        dataset = (dataset_loader or load_hf_dataset)(name, config)
        texts = sampled_texts(dataset, seed)
        docs = _take(texts, lm.tokenizer, max_len, n_tokens, n_samples)
        return Corpus(corpus, fp, docs)
    path = Path(corpus).expanduser()
    docs = _take(_text_docs(path), lm.tokenizer, max_len, n_tokens, n_samples)
    if not docs:
        raise InputError(f"corpus {path} holds no text")
    return Corpus(str(path), fp, docs)
