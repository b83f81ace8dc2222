"""Second-moment statistics of MLP keys: C = E[k kᵀ] at `mlp_key` of a layer (ROME §3, eq. 2).

ROME's closed-form edit needs the uncentred second moment of the keys that enter the MLP
output projection of layer l, estimated over a text corpus:

    C = (1/N) Σ_n k_n k_nᵀ,      k_n = mlp_key[l] at token n,  over all non-padding tokens.

How it is computed here (and why):
- the forward stops at the key of layer l (`n_layers=l+1, stop_at="mlp_key"`): nothing above
  it, not its down projection, no logits; for several layers (MEMIT's) one pass captures
  them all, stopping at the highest;
- several documents share a row (`pack_segments`, best fit decreasing into rows as long as
  the longest document), each attending only within itself with positions restarting at its
  start (`forward(segments=...)`): its keys are those it has alone, and the only padding is
  at the ends of rows. On WikiText's 4,096 tokens: 4,288 positions in two shapes, against
  4,750 in twelve for one document per row in length buckets (`pack`, kept), which also
  runs many small, slow batches; the statistics 1.1-1.3x faster on a CPU core. Per-batch
  sums Σ k kᵀ are fp32 on device and accumulated in fp64 on the host;
- it runs on the model's mesh when its params are sharded (`jaxedit.models.sharding`: FSDP /
  tensor parallel), else on a `data` mesh of all local devices with the params replicated.
  Batches split over the mesh's batch axes (data, fsdp); the per-device partial sums
  Σ k kᵀ are reduced across them by XLA (the einsum contracts the sharded batch axis), and
  on a `tensor` axis the sum lives split along its first F axis (`mlp`, as the keys are)
  until it is read back: C is accumulated on the host, replicated there;
- `layers_stats` reads each layer from the cache (`jaxedit.stats.cache`, one file per layer)
  when a valid file exists, else loads the corpus (`jaxedit.stats.corpora`) once, computes
  the missing layers in one pass and caches each; `layer_stats` is its one-layer case.

`DEFAULT_N_TOKENS` is the one default sample size (the `jaxedit stats` command, `layer_stats`
and `ROMEHparams.mom2_n_tokens`): 16,384 tokens is about ten times the key width of a small
model (SmolLM2-135M: F = 1,536), enough for a well-conditioned C in a minute on a CPU core. The
papers use 100,000 Wikipedia articles (presets say so where they follow them).
"""

from __future__ import annotations

import bisect
import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float, Int

from jaxedit import distributed
from jaxedit.errors import CheckpointError, InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sharding import (
    batch_multiple,
    make_mesh,
    mesh_of,
    put_batch,
    shard_params,
    spec_for,
)
from jaxedit.models.transformer import Params, forward
from jaxedit.stats.cache import (
    Stats,
    cache_key,
    cache_path,
    default_cache_dir,
    load_stats,
    save_stats,
)
from jaxedit.stats.corpora import DatasetLoader, corpus_fingerprint, load_corpus

DEFAULT_N_TOKENS = 16384


# ----------------------------------------------------------------------------- packing


def pack(
    docs: list[list[int]], pad_id: int, batch_tokens: int, multiple: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens [B T], mask [B T]) batches covering every document once (one per row, right
    padding), few shapes and little padding.

    Documents are taken longest first. A batch holds the documents of one length bucket
    (T = `fine_bucket` of its longest: at most a third of a row is padding), at most
    batch_tokens // T of them; its row count B is rounded up to a `fine_bucket` and to a
    multiple of `multiple` (the device count) so that few (B, T) shapes compile, and the rows
    that rounding adds take the next, shorter documents instead of staying empty. Filling
    every batch to batch_tokens // T rows instead (the original `length_collation` idea)
    pads the short documents at the end of a long bucket's batch to the long length: on
    WikiText, half of all computed positions.
    """
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    buckets = [fine_bucket(len(docs[i])) for i in order]
    i = 0
    while i < len(order):
        T = buckets[i]
        cap = max(multiple, (max(1, batch_tokens // T) // multiple) * multiple)
        n = 1
        while i + n < len(order) and n < cap and buckets[i + n] == T:
            n += 1
        B = min(cap, -(-fine_bucket(n) // multiple) * multiple)
        rows = [docs[j] for j in order[i : i + B]]
        i += len(rows)
        tokens = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), bool)
        for r, d in enumerate(rows):  # right padding; positions come from the mask
            tokens[r, : len(d)] = d
            mask[r, : len(d)] = True
        yield tokens, mask


def pack_segments(
    docs: list[list[int]], pad_id: int, batch_tokens: int, multiple: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens [B T], mask [B T], segments [B T]) batches covering every non-empty document
    once, several documents per row: padding only at the end of a row.

    Rows are T = `fine_bucket` of the longest document long, so (B, T) takes few shapes: full
    batches of batch_tokens // T rows (rounded to a multiple of `multiple`), and the last,
    its rows cut to the `fine_bucket` of its fullest. Documents go to rows by best fit decreasing
    (`_best_fit_rows`). `segments` numbers the documents of a row 1, 2, ... (0 = padding): with it
    `forward` attends within each document only and restarts positions at each, so every
    key is the one the document gives alone, while no position is spent on bucket padding
    (WikiText's 4,096 tokens: 4,288 positions, 16 rows of 256 and one of 192, against
    4,750 for `pack`).
    """
    docs = [d for d in docs if len(d)]
    if not docs:
        return
    T = fine_bucket(max(map(len, docs)))
    cap = max(multiple, (max(1, batch_tokens // T) // multiple) * multiple)
    rows = _best_fit_rows([len(d) for d in docs], T)

    it = iter(rows)
    while chunk := list(itertools.islice(it, cap)):
        B = min(cap, -(-fine_bucket(len(chunk)) // multiple) * multiple)
        # the last rows may hold only a few short documents: no longer than they need
        Tb = min(T, fine_bucket(max(sum(len(docs[i]) for i in row) for row in chunk)))
        tokens = np.full((B, Tb), pad_id, np.int32)
        mask = np.zeros((B, Tb), bool)
        segments = np.zeros((B, Tb), np.int32)
        for r, row in enumerate(chunk):
            at = 0
            for j, i in enumerate(row):
                d = docs[i]
                tokens[r, at : at + len(d)] = d
                mask[r, at : at + len(d)] = True
                segments[r, at : at + len(d)] = j + 1
                at += len(d)
        yield tokens, mask, segments


def _best_fit_rows(lengths: list[int], T: int) -> list[list[int]]:
    """Best fit decreasing: each length, longest first, goes to the row with the least room
    that still holds it (a new row of T when none does). Rows as lists of indices, fullest
    first (what is left over gathers in the last rows)."""
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # room left -> rows with that much room
    rooms: list[int] = []  # the keys of `free`, ascending
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            r = free[room].pop()
            if not free[room]:
                del free[room], rooms[k]
        else:
            r, room = len(rows), T
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            if room - n not in free:
                bisect.insort(rooms, room - n)
                free[room - n] = []
            free[room - n].append(r)
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))


# ----------------------------------------------------------------------------- statistics


@partial(jax.jit, static_argnums=(0, 1, 6))
def _moment_sums(
    cfg: ModelConfig,
    layers: tuple[int, ...],
    params: Params,
    tokens,
    mask,
    segments=None,
    kk_sharding: NamedSharding | None = None,
) -> tuple[Float[Array, "Y F F"], Int[Array, ""]]:
    """Σ k kᵀ over the real tokens of one batch, keys of each of `layers` (the forward stops
    at the highest's key), laid out as `kk_sharding` says; `segments`: packed documents."""
    out = forward(
        cfg,
        params,
        tokens,
        mask,
        capture=("mlp_key",),
        n_layers=max(layers) + 1,
        segments=segments,
        stop_at="mlp_key",
    )
    keys_ybtf = out.captured["mlp_key"][jnp.asarray(layers)].astype(jnp.float32)
    keys_ybtf = jnp.where(mask[None, :, :, None], keys_ybtf, 0.0)
    kk = jnp.einsum("ybtf,ybtg->yfg", keys_ybtf, keys_ybtf, precision=jax.lax.Precision.HIGHEST)
    if kk_sharding is not None:
        kk = jax.lax.with_sharding_constraint(kk, kk_sharding)
    return kk, jnp.sum(mask, dtype=jnp.int32)


def data_mesh(devices=None) -> Mesh:
    """A mesh with every one of `devices` (default: every local device) on its `data` axis
    (fsdp = tensor = 1): batches are split along it, params replicated. What the statistics
    run on when the model's params are not sharded."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return make_mesh({"data": len(devices)}, devices)


def stats_mesh(lm: LanguageModel, mesh: Mesh | None = None, devices=None) -> Mesh:
    """The mesh the statistics of `lm` run on: `mesh` if given, else the mesh its params are
    sharded on, else `data_mesh(devices)`."""
    if mesh is not None and devices is not None:
        raise InputError("give a mesh or devices for the statistics, not both")
    if mesh is not None:
        return mesh
    if devices is None:
        own = mesh_of(lm.params)
        if own is not None:
            return own
    return data_mesh(devices)


def _on_mesh(lm: LanguageModel, mesh: Mesh) -> Params:
    """`lm`'s params on `mesh`: as they are when they live there already (whatever rules
    sharded them), else placed by the default rules (on a data mesh: replicated)."""
    if mesh_of(lm.params) == mesh:
        return lm.params
    return shard_params(lm.config, lm.params, mesh)


def second_moments(
    lm: LanguageModel,
    layers: Sequence[int],
    docs: list[list[int]],
    *,
    batch_tokens: int = 4096,
    dtype: str = "float32",
    progress: bool = False,
    devices=None,
    mesh: Mesh | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Stream `docs` through the model once; return ({layer: C [F F]}, token count) for every
    layer in `layers`. Runs on `stats_mesh(lm, mesh, devices)`: batches split over its batch
    axes, params as sharded there; C is the same on any mesh up to float rounding."""
    cfg = lm.config
    layers = _check_layers(cfg, layers)
    if dtype not in ("float32", "float64"):
        raise InputError(f"statistics dtype must be float32 or float64, not {dtype!r}")
    mesh = stats_mesh(lm, mesh, devices)
    params = _on_mesh(lm, mesh)
    kk_spec = spec_for((None, "mlp", None), mesh, {"mlp": cfg.d_ff})
    kk_sharding = NamedSharding(mesh, kk_spec) if any(kk_spec) else None
    docs = distributed.corpus_share(docs, mesh)  # several processes: each its share
    acc = np.zeros((len(layers), cfg.d_ff, cfg.d_ff), np.float64)
    count = 0
    total = sum(len(d) for d in docs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        desc = "stats L" + ",".join(map(str, layers))
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr)
    pending = None  # overlap: dispatch batch i+1 before reading batch i back
    batches = pack_segments(docs, lm.tokenizer.pad_id, batch_tokens, batch_multiple(mesh))
    for tokens, mask, segments in batches:
        tokens, mask, segments = put_batch(mesh, tokens, mask, segments)
        step = _moment_sums(cfg, layers, params, tokens, mask, segments, kk_sharding)
        if pending is not None:
            acc, count = _accumulate(acc, count, pending, bar)
        pending = step
    if pending is not None:
        acc, count = _accumulate(acc, count, pending, bar)
    if bar is not None:
        bar.close()
    acc, count = distributed.sum_over_processes(acc, count)  # identity on one process
    if count == 0:
        raise InputError("the corpus produced no tokens")
    return {layer: (acc[y] / count).astype(dtype) for y, layer in enumerate(layers)}, count


def second_moment(
    lm: LanguageModel,
    layer: int,
    docs: list[list[int]],
    *,
    batch_tokens: int = 4096,
    dtype: str = "float32",
    progress: bool = False,
    devices=None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, int]:
    """Stream `docs` through the model; return (C [F F], token count): `second_moments` of
    one layer."""
    moms, count = second_moments(
        lm,
        (layer,),
        docs,
        batch_tokens=batch_tokens,
        dtype=dtype,
        progress=progress,
        devices=devices,
        mesh=mesh,
    )
    return moms[layer], count


def _accumulate(acc, count, step, bar):
    kk, n = step
    n = int(n)
    acc = acc + np.asarray(kk, np.float64)
    if bar is not None:
        bar.update(n)
    return acc, count + n


def _check_layers(cfg: ModelConfig, layers: Sequence[int]) -> tuple[int, ...]:
    """`layers` as a tuple of distinct ints (first occurrence kept), each a layer of `cfg`."""
    if isinstance(layers, (int, np.integer)):
        raise InputError(f"layers must be a sequence of ints, not the int {layers}")
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise InputError(f"layer {layer!r} is not an int")
        if not 0 <= layer < cfg.n_layers:
            raise InputError(f"layer {layer} out of range 0..{cfg.n_layers - 1}")
        if int(layer) not in out:
            out.append(int(layer))
    if not out:
        raise InputError("no layers given")
    return tuple(out)


def layer_stats(
    lm: LanguageModel,
    layer: int,
    corpus: str = "self",
    *,
    n_tokens: int | None = DEFAULT_N_TOKENS,
    n_samples: int | None = None,
    max_len: int = 256,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    on_bad_cache: str = "rebuild",
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = False,
    dataset_loader: DatasetLoader | None = None,
) -> Stats:
    """C = E[k kᵀ] at `mlp_key` of `layer` over `corpus`, from the cache when it is valid:
    `layers_stats` of one layer (the options are its)."""
    return layers_stats(
        lm,
        (layer,),
        corpus,
        n_tokens=n_tokens,
        n_samples=n_samples,
        max_len=max_len,
        dtype=dtype,
        cache_dir=cache_dir,
        use_cache=use_cache,
        on_bad_cache=on_bad_cache,
        batch_tokens=batch_tokens,
        seed=seed,
        progress=progress,
        dataset_loader=dataset_loader,
    )[int(layer)]


def layers_stats(
    lm: LanguageModel,
    layers: Sequence[int],
    corpus: str = "self",
    *,
    n_tokens: int | None = DEFAULT_N_TOKENS,
    n_samples: int | None = None,
    max_len: int = 256,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    on_bad_cache: str = "rebuild",
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = False,
    dataset_loader: DatasetLoader | None = None,
) -> dict[int, Stats]:
    """{layer: C = E[k kᵀ] at `mlp_key` of that layer} over `corpus` (MEMIT's layers at once).

    Each layer is cached in its own file, under the key `layer_stats` uses (either reads the
    other's files). Layers with a valid file are read; the others come from ONE pass over the
    corpus, its forward stopped at the highest of them. A file that is corrupt or does not
    match its key is rebuilt (`on_bad_cache="rebuild"`, with a warning on stderr) or refused
    (`"error"`, before anything is computed): never silently used. `seed` draws the `self`
    samples and the hub corpora's article sample; `dataset_loader` replaces the hub download
    (`jaxedit.stats.corpora.load_corpus`).
    """
    if on_bad_cache not in ("rebuild", "error"):
        raise ValueError("on_bad_cache must be 'rebuild' or 'error'")
    layers = _check_layers(lm.config, layers)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_fp = corpus_fingerprint(corpus, seed, max_len)
    keys = {
        layer: cache_key(lm, layer, corpus_fp, n_tokens, n_samples, max_len, dtype)
        for layer in layers
    }
    paths = {layer: cache_path(cache_dir, keys[layer]) for layer in layers}
    out: dict[int, Stats] = {}
    for layer in layers:
        if not (use_cache and paths[layer].exists()):
            continue
        try:
            st = load_stats(paths[layer], keys[layer])
        except CheckpointError as e:
            if on_bad_cache == "error":
                raise
            print(f"jaxedit stats: {e}; recomputing", file=sys.stderr)
            continue
        out[layer] = Stats(
            st.mom2, st.count, {**st.meta, "cache": str(paths[layer]), "from_cache": True}
        )
    missing = tuple(sorted(set(layers) - set(out)))
    if missing:
        t0 = time.perf_counter()
        c = load_corpus(
            lm,
            corpus,
            n_tokens=n_tokens,
            n_samples=n_samples,
            max_len=max_len,
            seed=seed,
            progress=progress,
            dataset_loader=dataset_loader,
        )
        t1 = time.perf_counter()
        moms, count = second_moments(
            lm, missing, c.docs, batch_tokens=batch_tokens, dtype=dtype, progress=progress
        )
        t2 = time.perf_counter()
        for layer in missing:
            meta = {
                **keys[layer],
                "corpus_name": c.name,
                "documents": len(c.docs),
                "corpus_seconds": round(t1 - t0, 3),
                "seconds": round(t2 - t1, 3),  # of the pass, shared by `pass_layers`
                "tokens_per_s": round(count / max(t2 - t1, 1e-9), 1),
                "devices": jax.local_device_count(),
                "mesh": dict(stats_mesh(lm).shape),
                "pass_layers": list(missing),
            }
            st = Stats(moms[layer], count, meta)
            if use_cache:
                save_stats(paths[layer], st)
            cache = str(paths[layer]) if use_cache else None
            out[layer] = Stats(st.mom2, count, {**meta, "cache": cache, "from_cache": False})
    return {layer: out[layer] for layer in layers}
