"""jaxedit stats: second-moment statistics C = E[k kᵀ] of one layer's MLP keys (cached).

`--dtype` is the loaded params' dtype, as for every command; the accumulation dtype of C is
`--stats-dtype` (float32, or float64 as the papers solve in; ROME's `mom2_dtype`). Statistics
accumulate in fp32 or fp64 whatever the params are (bf16 params give bf16 keys, summed in fp32).
"""

from __future__ import annotations

import time

import numpy as np

from jaxedit import progress, stats
from jaxedit.cli.shared import load_model
from jaxedit.errors import InputError

NAME = "stats"
HELP = "compute (or load from the cache) the key second moment C = E[k kᵀ] of a layer"


def add_arguments(p):
    p.add_argument("--layer", type=int, required=True, help="layer whose mlp_key is measured")
    p.add_argument(
        "--corpus",
        default="self",
        help="self (text sampled from the model, offline), wikitext or wikipedia (a seeded random "
        "sample of WikiText-103 / wikimedia/wikipedia 20231101.en rows; HF datasets, online), "
        "or a text / JSONL file or folder (default: self)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=stats.DEFAULT_N_TOKENS,
        help=f"number of tokens (default {stats.DEFAULT_N_TOKENS})",
    )
    p.add_argument("--samples", type=int, default=None, help="at most this many documents")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens per document (truncation; default 256, or the model's positions if fewer)",
    )
    p.add_argument(
        "--stats-dtype",
        default="float32",
        choices=("float32", "float64"),
        help="dtype C is accumulated in (ROME's mom2_dtype; default float32); the params' "
        "dtype is --dtype, as for every command",
    )
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--cache", default=None, help="cache directory (default ~/.cache/jaxedit)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--strict-cache",
        action="store_true",
        help="refuse (instead of rebuild) a corrupt or mismatched cache file",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the `self` samples and of the wikitext / wikipedia article sample",
    )


DEFAULT_MAX_LEN = 256
MAX_TOKENS = 10**9  # a billion keys: days on a CPU, and far past what C = E[k kᵀ] needs
MAX_BATCH_TOKENS = 1 << 20  # keys [batch, F] in fp32: 1M tokens × 8192 wide is 32 GiB


def _check(args, max_positions: int | None = None) -> None:
    if not 1 <= args.tokens <= MAX_TOKENS:
        raise InputError(f"--tokens must be 1..{MAX_TOKENS:,}, got {args.tokens}")
    if not 1 <= args.batch_tokens <= MAX_BATCH_TOKENS:
        raise InputError(f"--batch-tokens must be 1..{MAX_BATCH_TOKENS:,}, got {args.batch_tokens}")
    if args.samples is not None and args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")
    if args.max_len is None:
        return
    top = max_positions or args.max_len
    if not 1 <= args.max_len <= top:
        raise InputError(f"--max-len must be 1..{top} (the model's positions), got {args.max_len}")


def run(args) -> dict:
    _check(args)  # before the model loads
    lm = load_model(args)
    _check(args, lm.config.max_positions)
    if args.max_len is None:
        args.max_len = min(DEFAULT_MAX_LEN, lm.config.max_positions)
    t0 = time.perf_counter()
    st = stats.layer_stats(
        lm,
        args.layer,
        args.corpus,
        n_tokens=args.tokens,
        n_samples=args.samples,
        max_len=args.max_len,
        dtype=args.stats_dtype,
        cache_dir=args.cache,
        use_cache=not args.no_cache,
        on_bad_cache="error" if args.strict_cache else "rebuild",
        batch_tokens=args.batch_tokens,
        seed=args.seed,
        progress=progress.shown(),
    )
    eig = np.linalg.eigvalsh(np.asarray(st.mom2, np.float64))
    return {
        "model": lm.name,
        "layer": args.layer,
        "corpus": args.corpus,
        "tokens": st.count,
        "documents": st.meta.get("documents"),
        "stats_dtype": args.stats_dtype,
        "model_dtype": args.model_dtype,
        "from_cache": st.meta.get("from_cache"),
        "cache": st.meta.get("cache"),
        "seconds": round(time.perf_counter() - t0, 3),
        "tokens_per_s": st.meta.get("tokens_per_s"),
        "trace": float(np.trace(st.mom2)),
        "eig_min": float(eig[0]),
        "eig_max": float(eig[-1]),
        "condition": float(eig[-1] / eig[0]) if eig[0] > 0 else None,
    }


def render(r: dict) -> str:
    src = "cache" if r["from_cache"] else f"{r['tokens_per_s']} tok/s"
    cond = "singular" if r["condition"] is None else f"{r['condition']:.3g}"
    return (
        f"C = E[k kᵀ] of {r['model']} layer {r['layer']}: {r['tokens']} tokens of {r['corpus']} "
        f"({src}, {r['seconds']} s)\n  trace {r['trace']:.4g}, eigenvalues "
        f"[{r['eig_min']:.3g}, {r['eig_max']:.3g}], condition {cond}\n  cache: {r['cache']}"
    )
