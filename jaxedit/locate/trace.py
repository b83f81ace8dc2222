"""Causal tracing: where in the network is a fact recalled? (Meng et al. 2022, §2, "ROME").

For a prompt x whose clean run predicts the answer o (the clean top-1 next token):

    clean run:      high_score = P[o]
    corrupted runs: h_i^(0) <- h_i^(0) + eps_s,  eps_s ~ N(0, nu^2 I)  for subject tokens i only,
                    s = 1..samples;   low_score = P*[o] = mean_s p_s(o)
    restored runs:  scores[kind][i, l] = P*_{clean h_i^(l)}[o]: the corrupted runs (same eps_s:
                    a paired comparison) with one state set back to its clean value, where
                      hidden: the block output (`resid`) of token i at layer l,
                      mlp / attn: the module outputs (`mlp_out` / `attn_out`) of token i at the
                                  window of layers [l - w//2, l + ceil(w/2)) clipped to [0, L)
    indirect effect IE = scores - low_score;  average over facts per token class = AIE.

nu = 3 sigma by default, sigma the standard deviation of the token embeddings of the subject
tokens (of the data set, or of the prompt for one fact); a plain float is accepted too.
Differences from kmeng01/rome, all deliberate: sigma is taken over the subject tokens as they
occur in the prompts (ROME re-tokenizes each subject alone); the noise comes from
`numpy.random.default_rng(seed)` (ROME: `RandomState(1)`), the same draws for every cell; in
data-set mode a fact counts as correctly predicted when the clean top-1 token is the first
token of the expected answer (ROME compares the decoded token with the whole answer string).

How the grid is computed (and why it is fast): the reference implementation runs one batched
forward (samples + 1 rows, full logits) per grid cell in a Python loop, 3 * T * L forwards per
fact. Here

- the clean run and the corrupted run happen once; the corrupted run keeps every layer's input
  and every layer's keys/values;
- a cell that restores token i at layer l cannot change anything below layer l (hidden: below
  l + 1) nor any position before i (attention is causal), so each cell resumes the corrupted
  run at its first restored layer (`model.run_layers`, a dynamic-length `fori_loop`) over only
  the positions from i on (rounded up to a `tokenizer.fine_bucket`: little padding, few
  shapes), attending to the corrupted keys/values of the earlier positions;
  cells before the subject are exactly `low_score` (clean and corrupted states agree there);
- cells are batched: per-cell restore masks are patch arrays `vmap`ped over a chunk, the clean
  activations are shared by all cells, logits only at the last position; cells are grouped by
  suffix bucket and sorted by start layer, so one compiled program per
  (prompt-length bucket, suffix bucket) serves every fact.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxedit import progress as progress_bars
from jaxedit.errors import InputError
from jaxedit.io.text import read_text
from jaxedit.io.tokenizer import bucket, fine_bucket
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import KVCache, forward, forward_jit, run_layers

KINDS = ("hidden", "mlp", "attn")
SITE = {"hidden": "resid", "mlp": "mlp_out", "attn": "attn_out"}
_CODE = {"hidden": 0, "mlp": 1, "attn": 2}
TOKEN_CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


# ----------------------------------------------------------------------------- inputs


def locate_subject(tokenizer, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `prompt` and the token range [b, e) covering the first occurrence of
    `subject`, found through the tokenizer's character offsets (no decode-and-match)."""
    needle = subject.strip()
    if not needle:
        raise InputError("empty subject")
    begin = prompt.find(needle)
    if begin < 0:
        raise InputError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = begin + len(needle)
    ids, offsets = tokenizer.encode_with_offsets(prompt)
    # A token belongs to the subject when its character span overlaps the subject's: a
    # byte-level BPE token " Tower" spans the space before the word, a SentencePiece "▁Tower"
    # may or may not; both overlap.
    inside = [i for i, (s, t) in enumerate(offsets) if t > s and s < end and t > begin]
    if not inside:
        raise InputError(f"subject {subject!r} covers no token of the prompt")
    b, e = inside[0], inside[-1] + 1
    real = [i for i, (s, t) in enumerate(offsets) if t > s]  # not BOS
    if b <= real[0] and e > real[-1]:
        raise InputError(
            f"subject {subject!r} covers the whole prompt: nothing is left to predict from"
        )
    return ids, (b, e)


def embedding_std(params, ids: Sequence[int]) -> float:
    """sigma: std over all entries of the token embeddings of `ids` (ROME's noise unit)."""
    # Rows gathered where the table lives: a sharded embedding is never pulled whole to host.
    emb = np.asarray(jnp.take(params["embed"], jnp.asarray(list(ids), jnp.int32), axis=0))
    emb = emb.astype(np.float32)
    return float(emb.std())


def noise_level(noise: str | float, params, subject_ids: Sequence[int]) -> float:
    """nu from "3s" / "s3" (multiples of sigma over `subject_ids`) or a plain float."""
    if isinstance(noise, str):
        text = noise.strip().lower()
        if text.endswith("s") or text.startswith("s"):
            factor = text.strip("s") or "1"
            try:
                return float(factor) * embedding_std(params, subject_ids)
            except ValueError:
                pass
        try:
            noise = float(text)
        except ValueError:
            raise InputError(
                f"noise must be a float or a multiple of sigma like '3s': {noise!r}"
            ) from None
    if not math.isfinite(noise) or noise < 0:
        raise InputError(f"noise must be a finite number >= 0, got {noise}")
    return float(noise)


def check_options(samples: int, window: int, kinds: Iterable[str]) -> tuple[str, ...]:
    """The kinds as a tuple, after checking samples >= 1, window >= 1 and the kind names."""
    if samples <= 0:
        raise InputError(f"samples must be >= 1, got {samples}")
    if window <= 0:
        raise InputError(f"window must be >= 1, got {window}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InputError(f"kinds must be among {', '.join(KINDS)}, got {', '.join(kinds)}")
    return kinds


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """[lo, hi): the `window` layers centred on `layer`, clipped to [0, L).

    As in ROME: lo = l - w//2, hi = l + ceil(w/2)."""
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


def subject_noise(rng_seed: int, samples: int, T: int, D: int, rows: Sequence[int], scale: float):
    """eps [S T D]: scale * N(0, 1) at the subject positions `rows`, 0 elsewhere. The draws
    depend on the seed and the subject length only (not on padding)."""
    draws = np.random.default_rng(rng_seed).standard_normal((samples, len(rows), D))
    eps = np.zeros((samples, T, D), np.float32)
    eps[:, list(rows)] = scale * draws
    return eps


# ----------------------------------------------------------------------------- clean + corrupted


@functools.partial(jax.jit, static_argnums=0)
def _prepare(cfg, params, tokens: Int[Array, "1 T"], mask: Bool[Array, "1 T"], subj, eps):
    """The clean run and the corrupted run, once each.

    Returns answer, high_score, low_score, clean {site: [L 1 T D]}, corrupted layer inputs
    [L+1 S T D] (embeddings + noise, then each block's output) and corrupted keys/values.
    """
    S, T = eps.shape[0], tokens.shape[1]
    clean = forward(
        cfg,
        params,
        tokens,
        mask,
        capture=("resid", "mlp_out", "attn_out"),
        logit_positions=jnp.full((1, 1), T - 1),
    )
    p_clean = jax.nn.softmax(clean.logits[0, 0])
    answer = jnp.argmax(p_clean)
    tok_s, mask_s = jnp.broadcast_to(tokens, (S, T)), jnp.broadcast_to(mask, (S, T))
    corrupt = SitePatch(jnp.broadcast_to(subj[None], (S, T)), eps, jnp.asarray(True))
    cor = forward(
        cfg,
        params,
        tok_s,
        mask_s,
        patch={"embed": corrupt},
        capture=("embed", "resid"),
        logit_positions=jnp.full((S, 1), T - 1),
        return_kv=True,
    )
    low = jnp.mean(jax.nn.softmax(cor.logits[:, 0])[:, answer])
    inputs = jnp.concatenate([cor.captured["embed"][None], cor.captured["resid"]], 0)
    return answer, p_clean[answer], low, clean.captured, inputs, cor.kv


# ----------------------------------------------------------------------------- the grid


@functools.partial(jax.jit, static_argnums=0, static_argnames=("suffix",))
def _grid_chunk(
    cfg,
    params,
    inputs: Float[Array, "L1 S T D"],
    kv: tuple[Array, Array],
    mask: Bool[Array, "1 T"],
    clean: dict[str, Float[Array, "L 1 T D"]],
    answer: Int[Array, ""],
    start: Int[Array, ""],
    kind: Int[Array, " C"],
    token: Int[Array, " C"],
    lo: Int[Array, " C"],
    hi: Int[Array, " C"],
    *,
    suffix: int,
) -> Float[Array, " C"]:
    """p(answer) for a chunk of C cells, all starting at layer `start` on the last `suffix`
    positions (tokens `token` are given in suffix coordinates)."""
    L, S, T = cfg.n_layers, inputs.shape[1], inputs.shape[2]
    P = T - suffix  # prefix positions: unchanged by every cell of this chunk
    mask_s = jnp.broadcast_to(mask, (S, T))
    positions = jnp.maximum(jnp.cumsum(mask_s.astype(jnp.int32), axis=-1) - 1, 0)[:, P:]
    cache = KVCache(kv[0][:, :, :P], kv[1][:, :, :P], mask_s[:, :P])
    h_start = jax.lax.dynamic_index_in_dim(inputs, start, keepdims=False)[:, P:]
    values = {site: clean[site][:, :, P:] for site in ("resid", "mlp_out", "attn_out")}
    prev = jax.lax.dynamic_index_in_dim(values["resid"], jnp.maximum(start - 1, 0), keepdims=False)
    layers = jnp.arange(L)
    no = jnp.asarray(False)
    last = jnp.full((S, 1), suffix - 1)

    def cell(kind, t, lo, hi):
        at_t = jnp.arange(suffix) == t
        in_win = (layers >= lo) & (layers < hi)
        m = lambda code: ((kind == code) & in_win)[:, None, None] & at_t[None, None, :]
        patch = {site: SitePatch(m(_CODE[k]), values[site], no) for k, site in SITE.items()}
        # Restoring the block output of layer start-1 is restoring the input of block `start`.
        restore_input = (kind == _CODE["hidden"]) & (lo == start - 1) & at_t
        h0 = jnp.where(restore_input[None, :, None], prev, h_start)
        logits = run_layers(
            cfg,
            params,
            h0,
            mask_s[:, P:],
            start,
            patch=patch,
            logit_positions=last,
            positions=positions,
            cache=cache,
        )
        return jnp.mean(jax.nn.softmax(logits[:, 0])[:, answer])

    return jax.vmap(cell)(kind, token, lo, hi)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_cells(
    n_layers: int, kinds: Sequence[str], positions: Sequence[int], T: int, window: int
) -> dict[int, np.ndarray]:
    """The cells to compute, grouped by suffix bucket and sorted by start layer.

    Returns {suffix: int array [N, 7] of (kind, position, layer, lo, hi, start, index)}; a
    hidden cell restores [l, l+1) and starts at block l + 1, a window cell starts at its first
    layer; `index` numbers the cells in (kind, position, layer) order.
    """
    cells = [(_CODE[k], p, layer) for k in kinds for p in positions for layer in range(n_layers)]
    return group_cells(cells, n_layers, T, window)


def group_cells(
    cells: Sequence[tuple[int, int, int]], n_layers: int, T: int, window: int
) -> dict[int, np.ndarray]:
    """`plan_cells` for an explicit list of (kind code, padded position, layer) cells; the
    `index` column is the cell's place in `cells`."""
    groups: dict[int, list] = {}
    for index, (code, p, layer) in enumerate(cells):
        suffix = min(T, fine_bucket(T - p))
        if code == _CODE["hidden"]:
            lo, hi, start = layer, layer + 1, layer + 1
        else:
            lo, hi = window_layers(layer, window, n_layers)
            start = lo
        groups.setdefault(suffix, []).append((code, p, layer, lo, hi, start, index))
    out = {}
    for suffix, group in groups.items():
        arr = np.asarray(group, np.int32)
        out[suffix] = arr[np.argsort(arr[:, 5], kind="stable")]
    return out


def chunk_plan(groups: dict[int, np.ndarray], n_layers: int, samples: int, chunk_tokens: int):
    """Yield (suffix, cells [C, 7], n real) for each compiled call of the grid: the chunks
    `_run_cells` dispatches (public so that benchmarks count the work actually done).

    Chunk size: a token budget per chunk, at most the group (rounded up to a power of two so
    that few shapes compile), at most 64 cells (the [C S V] logits), and a few start layers'
    worth of cells: a chunk runs from the lowest start layer among its cells. A short last
    chunk is padded with copies of its last cell (results dropped)."""
    for suffix, cells in groups.items():
        per_start = max(1, len(cells) // n_layers)
        budget = max(1, chunk_tokens // (samples * suffix))
        C = min(64, _pow2(len(cells)), budget, max(8, 4 * _pow2(per_start)))
        for i in range(0, len(cells), C):
            part = cells[i : i + C]
            n = len(part)
            if n < C:
                part = np.concatenate([part, np.repeat(part[-1:], C - n, 0)])
            yield suffix, part, n


def _run_cells(cfg, params, prep, mask, groups, T, samples, chunk_tokens) -> np.ndarray:
    """p(answer) of every cell of `groups` (see `group_cells`), in `index` order."""
    answer, _, _, clean, inputs, kv = prep
    pending = []
    plan = list(chunk_plan(groups, cfg.n_layers, samples, chunk_tokens))
    # Cells on a bar when the command line shows progress: chunks run in dispatch order, so
    # reading them back one by one follows the work as it completes.
    bar = progress_bars.bar(sum(n for *_, n in plan), "trace cells", "cell", leave=False)
    for suffix, part, n in plan:
        probs = _grid_chunk(
            cfg,
            params,
            inputs,
            kv,
            mask,
            clean,
            answer,
            jnp.int32(part[:, 5].min()),
            jnp.asarray(part[:, 0]),
            jnp.asarray(part[:, 1] - (T - suffix)),
            jnp.asarray(part[:, 3]),
            jnp.asarray(part[:, 4]),
            suffix=suffix,
        )
        pending.append((part[:n], probs))
    out = np.full(sum(len(c) for c in groups.values()), np.nan, np.float32)
    for part, probs in pending:  # read back only after everything is dispatched
        out[part[:, 6]] = np.asarray(probs)[: len(part)]
        bar.update(len(part))
    bar.close()
    return out


def _grid(cfg, params, prep, mask, kinds, positions, T, window, samples, chunk_tokens):
    """scores [K T L] (NaN where not computed) from the prepared clean/corrupted runs."""
    L = cfg.n_layers
    scores = np.full((len(kinds), T, L), np.nan, np.float32)
    groups = plan_cells(L, kinds, positions, T, window)
    probs = _run_cells(cfg, params, prep, mask, groups, T, samples, chunk_tokens)
    kind_index = {_CODE[k]: i for i, k in enumerate(kinds)}
    cells = np.concatenate(list(groups.values())) if groups else np.zeros((0, 7), np.int32)
    scores[[kind_index[c] for c in cells[:, 0]], cells[:, 1], cells[:, 2]] = probs[cells[:, 6]]
    return scores


# ----------------------------------------------------------------------------- one fact


def encode_fact(lm, prompt: str, subject: str):
    """(ids, (b, e) subject token range, T padded length, pad, left-padded batch of one)."""
    ids, (b, e) = locate_subject(lm.tokenizer, prompt, subject)
    n = len(ids)
    T = bucket(n)
    pad = T - n
    batch = lm.tokenizer.batch([ids], padding="left", length=T)
    return ids, (b, e), T, pad, batch


def trace(
    lm,
    prompt: str,
    subject: str,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: str | float = "3s",
    window: int = 10,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    expect: str | None = None,
    chunk_tokens: int = 4096,
) -> dict[str, Any] | None:
    """Causal trace of one fact: the trace.json structure with numpy arrays.

    Arguments:
        lm: a `LanguageModel`; prompt: the text before the answer; subject: a substring of it.
        kinds: any of "hidden", "mlp", "attn"; samples: corrupted runs; noise: "3s" (3 sigma of
        the subject tokens' embeddings) or a float; window: restored layers for mlp/attn.
        rows: token indices whose rows to compute (default: every token; rows before the
        subject are `low_score` exactly, other rows not asked for are NaN).
        expect: the expected answer; when given and the clean top-1 token is not its first
        token, returns None (data-set mode skips such facts).
    Returns:
        {"model", "prompt", "subject", "tokens", "subject_range", "answer", "answer_id",
         "high_score", "low_score", "noise", "samples", "window",
         "kinds": {kind: {"scores": float32 [tokens, layers]}}, "seconds"}
    """
    t0 = time.perf_counter()
    kinds = check_options(samples, window, kinds)
    encoded = encode_fact(lm, prompt, subject)
    ids, (b, e) = encoded[0], encoded[1]
    nu = noise_level(noise, lm.params, ids[b:e])
    return trace_encoded(
        lm, prompt, subject, encoded, nu, kinds=kinds, samples=samples, window=window,
        seed=seed, rows=rows, expect=expect, chunk_tokens=chunk_tokens, t0=t0,
    )  # fmt: skip


def trace_encoded(
    lm,
    prompt: str,
    subject: str,
    encoded,
    nu: float,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    expect: str | None = None,
    chunk_tokens: int = 4096,
    t0: float | None = None,
) -> dict[str, Any] | None:
    """`trace` on a prompt already encoded by `encode_fact`, with the noise level `nu` given
    (data-set mode: one nu for every fact)."""
    t0 = time.perf_counter() if t0 is None else t0
    cfg, params = lm.config, lm.params
    ids, be, T, pad, batch = encoded
    b, e = be
    n = len(ids)
    subj, eps = corruption(cfg, T, pad, be, nu, samples, seed)
    mask = jnp.asarray(batch.mask)
    prep = _prepare(cfg, params, jnp.asarray(batch.tokens), mask, jnp.asarray(subj), eps)
    answer_id = int(prep[0])
    if expect is not None and not answer_matches(lm.tokenizer, answer_id, expect):
        return None
    wanted = range(n) if rows is None else sorted(set(int(r) % n for r in rows))
    positions = [pad + r for r in wanted if r >= b]
    grid = _grid(cfg, params, prep, mask, kinds, positions, T, window, samples, chunk_tokens)
    low = float(prep[2])
    grid = grid[:, pad:]
    grid[:, [r for r in wanted if r < b]] = low  # clean == corrupted before the subject
    return {
        "model": lm.name,
        "method": "exact",
        "prompt": prompt,
        "subject": subject,
        "tokens": lm.tokenizer.token_strings(ids),
        "subject_range": [b, e],
        "answer": lm.tokenizer.decode([answer_id]),
        "answer_id": answer_id,
        "high_score": float(prep[1]),
        "low_score": low,
        "noise": nu,
        "samples": samples,
        "window": window,
        "kinds": {k: {"scores": grid[i]} for i, k in enumerate(kinds)},
        "seconds": time.perf_counter() - t0,
    }


def corruption(cfg, T: int, pad: int, subject_range, nu: float, samples: int, seed: int):
    """(subject mask [T], noise eps [S T D]) of a left-padded prompt of padded length T."""
    b, e = subject_range
    subj = np.zeros((T,), bool)
    subj[pad + b : pad + e] = True
    return subj, subject_noise(seed, samples, T, cfg.d_model, range(pad + b, pad + e), nu)


def exact_cells(
    lm,
    prompt: str,
    subject: str,
    cells: Sequence[tuple[str, int, int]],
    *,
    samples: int = 10,
    noise: str | float = "3s",
    window: int = 10,
    seed: int = 0,
    chunk_tokens: int = 4096,
) -> np.ndarray:
    """The exact restored p(answer) of a few cells (kind, token, layer), in order: what `trace`
    computes for them (same noise draws, same batched kernel), without the rest of the grid."""
    check_options(samples, window, [c[0] for c in cells] or KINDS)
    cfg, params = lm.config, lm.params
    ids, (b, e), T, pad, batch = encode_fact(lm, prompt, subject)
    nu = noise_level(noise, params, ids[b:e])
    subj, eps = corruption(cfg, T, pad, (b, e), nu, samples, seed)
    mask = jnp.asarray(batch.mask)
    prep = _prepare(cfg, params, jnp.asarray(batch.tokens), mask, jnp.asarray(subj), eps)
    for cell in cells:
        if not 0 <= cell[1] < len(ids) or not 0 <= cell[2] < cfg.n_layers:
            raise InputError(f"cell {cell} outside the {len(ids)} x {cfg.n_layers} grid")
    out = np.full(len(cells), float(prep[2]), np.float32)  # before the subject: low_score
    todo = [i for i, (_, t, _) in enumerate(cells) if t >= b]
    coded = [(_CODE[cells[i][0]], pad + cells[i][1], cells[i][2]) for i in todo]
    groups = group_cells(coded, cfg.n_layers, T, window)
    if coded:
        out[todo] = _run_cells(cfg, params, prep, mask, groups, T, samples, chunk_tokens)
    return out


def answer_matches(tokenizer, answer_id: int, expect: str) -> bool:
    """Is the clean top-1 token the first token of the expected answer (with or without a
    leading space)? ROME compares the decoded token to the whole answer; comparing first tokens
    keeps facts whose answers are several tokens long under other tokenizers."""
    expect = expect.strip()
    firsts = {
        ids[0] for text in (" " + expect, expect) if (ids := tokenizer.encode_continuation(text))
    }
    return answer_id in firsts


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """trace.json: arrays as nested lists (NaN, for rows not computed, as null)."""

    def clean(x):
        if isinstance(x, np.ndarray):
            return [clean(v) for v in x.tolist()]
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    out = {k: v for k, v in result.items() if k != "kinds"}
    out["kinds"] = {k: {"scores": clean(v["scores"])} for k, v in result["kinds"].items()}
    return out


# ----------------------------------------------------------------------------- reference loop


def trace_loop(
    lm,
    prompt: str,
    subject: str,
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: str | float = "3s",
    window: int = 10,
    seed: int = 0,
    cells: Iterable[tuple[str, int, int]] | None = None,
    clean_row: bool = False,
    full_logits: bool = False,
    pad_to_bucket: bool = True,
) -> dict[tuple[str, int, int], float]:
    """The original procedure, cell by cell: one `forward` per (kind, token, layer) with the
    noise at the embeddings and the clean states written back, scored at the last position.

    The reference for tests (same noise draws as `trace`) and the benchmark baseline
    (`clean_row=True, full_logits=True, pad_to_bucket=False` mirror the original: samples + 1
    rows per forward, row 0 clean, logits at every position).
    """
    kinds = check_options(samples, window, kinds)
    cfg, params = lm.config, lm.params
    ids, (b, e), T, pad, batch = encode_fact(lm, prompt, subject)
    nu = noise_level(noise, params, ids[b:e])
    subj = np.zeros((T,), bool)
    subj[pad + b : pad + e] = True
    eps = subject_noise(seed, samples, T, cfg.d_model, range(pad + b, pad + e), nu)
    prep = _prepare(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask), subj, eps)
    answer, clean = int(prep[0]), prep[3]
    n = len(ids)
    if not pad_to_bucket:  # the original's exact length: drop the padding columns
        T, sl = n, slice(pad, None)
        tokens, mask, eps, subj = batch.tokens[:, sl], batch.mask[:, sl], eps[:, sl], subj[sl]
        clean = {k: v[:, :, sl] for k, v in clean.items()}
        pad = 0
    else:
        tokens, mask = batch.tokens, batch.mask
    R = samples + int(clean_row)
    corrupted = np.arange(R) >= int(clean_row)  # rows that get noise and restored states
    tokens_r = jnp.asarray(np.broadcast_to(tokens, (R, T)))
    mask_r = jnp.asarray(np.broadcast_to(mask, (R, T)))
    eps_r = np.zeros((R, T, cfg.d_model), np.float32)
    eps_r[corrupted] = eps
    embed = SitePatch(
        jnp.asarray(corrupted[:, None] & subj[None]), jnp.asarray(eps_r), jnp.asarray(True)
    )
    if cells is None:
        cells = [(k, i, layer) for k in kinds for i in range(n) for layer in range(cfg.n_layers)]
    out = {}
    for kind, i, layer in cells:
        lo, hi = (
            (layer, layer + 1) if kind == "hidden" else window_layers(layer, window, cfg.n_layers)
        )
        lmask = (np.arange(cfg.n_layers) >= lo) & (np.arange(cfg.n_layers) < hi)
        pmask = lmask[:, None, None] & corrupted[None, :, None] & (np.arange(T) == pad + i)
        site = SITE[kind]
        restore = SitePatch(jnp.asarray(pmask), clean[site], jnp.asarray(False))
        patch = {"embed": embed, site: restore}
        logits = forward_jit(
            cfg,
            params,
            tokens_r,
            mask_r,
            patch=patch,
            logit_positions=None if full_logits else jnp.full((R, 1), T - 1),
        ).logits
        probs = jax.nn.softmax(logits[int(clean_row) :, -1], axis=-1)[:, answer]
        out[(kind, i, layer)] = float(jnp.mean(probs))
    return out


# ----------------------------------------------------------------------------- data sets


def load_facts(path: str, n: int | None = None) -> list[dict[str, str | None]]:
    """Facts {"prompt", "subject", "expect"} from a JSON list of ROME "known facts" records
    (prompt, subject, attribute), EasyEdit CounterFact records (prompt, subject, ground_truth)
    or original CounterFact records (requested_rewrite: prompt with "{}", subject, target_true).
    """
    try:
        records = json.loads(read_text(path, "facts"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read facts from {path}: {err}") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records")
    facts = []
    for r in records[: n if n is not None else len(records)]:
        r = r.get("requested_rewrite", r) if isinstance(r, dict) else {}
        if isinstance(r, list):
            r = r[0]
        subject, prompt = r.get("subject"), r.get("prompt")
        if not subject or not prompt:
            raise InputError(f"{path}: a record without prompt and subject: {str(r)[:120]}")
        if "{}" in prompt:
            prompt = prompt.format(subject)
        expect = r.get("attribute") or r.get("ground_truth") or r.get("target_true")
        if isinstance(expect, dict):
            expect = expect.get("str")
        if isinstance(expect, list):
            expect = expect[0] if expect else None
        facts.append({"prompt": prompt, "subject": subject, "expect": expect})
    return facts


def token_classes(n_tokens: int, subject_range: Sequence[int]) -> dict[str, list[int]]:
    """Token rows of each class of the paper's averages (ROME's notebook): the first, middle
    and last subject tokens, the first subsequent token, further tokens and the last token.
    With a one-token subject the first and last subject tokens coincide; with the subject right
    before the last token the first subsequent token is the last token."""
    b, e = subject_range
    last = n_tokens - 1
    return {
        "first subject token": [b],
        "middle subject tokens": list(range(b + 1, e - 1)),
        "last subject token": [e - 1],
        "first subsequent token": [e] if e <= last else [],
        "further tokens": list(range(e + 1, last)),
        "last token": [last],
    }


def average_effects(
    results: Sequence[dict[str, Any]], classes: Sequence[str] = TOKEN_CLASSES
) -> dict[str, Any]:
    """Average indirect effect (score - low_score) per layer and token class, with the 95%
    confidence half-width 1.96 * std / sqrt(n) over the rows pooled from every fact."""
    kinds = list(results[0]["kinds"]) if results else []
    out: dict[str, Any] = {}
    for kind in kinds:
        out[kind] = {}
        for cls in classes:
            rows = []
            for r in results:
                scores = r["kinds"][kind]["scores"]
                idx = token_classes(len(scores), r["subject_range"])[cls]
                rows.extend(scores[i] - r["low_score"] for i in idx)
            if not rows:
                continue
            rows = np.asarray(rows, np.float64)
            mean, std = rows.mean(0), rows.std(0)
            out[kind][cls] = {
                "mean": mean.tolist(),
                "ci95": (1.96 * std / math.sqrt(len(rows))).tolist(),
                "n": len(rows),
            }
    return out


# Estimators built on this module register here (`jaxedit.locate.atp` adds "atp" when it is
# imported), so the data-set loop dispatches to them without importing them: no import cycle.
TRACERS: dict[str, Callable[..., Any]] = {}


def trace_dataset(
    lm,
    facts: Sequence[dict[str, Any]],
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise: str | float = "3s",
    window: int = 10,
    seed: int = 0,
    classes: Sequence[str] = TOKEN_CLASSES,
    progress: bool = True,
    limit: int | None = None,
    chunk_tokens: int = 4096,
    method: str = "exact",
    atp_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trace every fact whose clean prediction is right; average the effects per token class.

    The noise unit sigma is taken over the subject tokens of all the facts. Only the rows of
    the requested `classes` are computed (exact method; AtP estimates every row at once);
    `limit` stops after that many traced facts. `method`: "exact" (the grid, `trace`) or
    "atp" (attribution patching, `jaxedit.locate.atp`, with `atp_options` such as graddrop or
    verify_top). Returns (summary, per-fact results).
    """
    kinds = check_options(samples, window, kinds)
    if method == "exact":
        tracer = functools.partial(trace_encoded, chunk_tokens=chunk_tokens)
    elif method in TRACERS:
        tracer = functools.partial(TRACERS[method], **(atp_options or {}))
    else:
        known = ["exact", *TRACERS]
        raise InputError(f"method must be one of {known}, got {method!r}")
    bad = [c for c in classes if c not in TOKEN_CLASSES]
    if bad:
        raise InputError(f"unknown token classes {bad}; known: {list(TOKEN_CLASSES)}")
    t0 = time.perf_counter()
    encoded, invalid = [], 0
    for fact in facts:
        try:
            encoded.append((fact, encode_fact(lm, fact["prompt"], fact["subject"])))
        except InputError:
            invalid += 1
    if not encoded:
        raise InputError("no fact could be traced (subjects not found in the prompts)")
    subject_ids = [i for _, (ids, (b, e), *_) in encoded for i in ids[b:e]]
    nu = noise_level(noise, lm.params, subject_ids)
    # One batched clean run first: facts the model gets wrong cost nothing more.
    top1 = clean_top1(lm, [ids for _, (ids, *_) in encoded])
    results, skipped = [], 0
    # One bar over the facts (no per-fact cell bars), with an estimate after the first fact.
    total = len(encoded) if limit is None else min(limit, len(encoded))
    bar = progress_bars.bar(total, "tracing", "fact", enabled=progress, estimate=True)
    bar.restart_clock()
    for (fact, (ids, be, T, pad, batch)), answer_id in zip(encoded, top1, strict=True):
        if limit is not None and len(results) >= limit:
            break
        expect = fact.get("expect")
        if expect is not None and not answer_matches(lm.tokenizer, answer_id, expect):
            skipped += 1
            bar.set_postfix(skipped=skipped)
            continue
        cls_rows = token_classes(len(ids), be)
        rows = sorted({i for c in classes for i in cls_rows[c]})
        with progress_bars.scope(False):
            r = tracer(
                lm, fact["prompt"], fact["subject"], (ids, be, T, pad, batch), nu, kinds=kinds,
                samples=samples, window=window, seed=seed, rows=rows, expect=fact.get("expect"),
            )  # fmt: skip
        if r is None:
            skipped += 1
        else:
            results.append(r)
            bar.update(1)
        bar.set_postfix(skipped=skipped)
    bar.close()
    summary = {
        "model": lm.name,
        "method": method,
        "n_facts": len(results),
        "n_skipped": skipped,
        "n_invalid": invalid,
        "layers": lm.config.n_layers,
        "noise": nu,
        "samples": samples,
        "window": window,
        "avg_high_score": float(np.mean([r["high_score"] for r in results])) if results else None,
        "avg_low_score": float(np.mean([r["low_score"] for r in results])) if results else None,
        "kinds": average_effects(results, classes),
        "seconds": time.perf_counter() - t0,
    }
    return summary, results


def clean_top1(lm, id_lists: Sequence[Sequence[int]], batch_size: int = 32) -> list[int]:
    """The clean top-1 next token of each prompt (batched, logits at the last token only)."""
    out = []
    for i in range(0, len(id_lists), batch_size):
        part = [list(ids) for ids in id_lists[i : i + batch_size]]
        part += [part[-1]] * (_pow2(len(part)) - len(part))  # few shapes per length bucket
        batch = lm.tokenizer.batch(part, padding="left")
        logits = forward_jit(
            lm.config,
            lm.params,
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.mask),
            logit_positions=jnp.asarray(batch.last[:, None]),
        ).logits
        out.extend(np.asarray(jnp.argmax(logits[:, 0], -1)).tolist())
    return out[: len(id_lists)]


def peak_layer(summary: dict[str, Any], kind: str = "mlp", cls: str = "last subject token"):
    """The layer where the average indirect effect of `kind` at `cls` is largest."""
    return int(np.argmax(summary["kinds"][kind][cls]["mean"]))
