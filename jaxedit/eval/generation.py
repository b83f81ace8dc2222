"""Generation-based metrics: what the edited model actually says (fluency, consistency, and
the greedy continuations the `*_gen` metrics read: `greedy_ids`).

ROME's decoding (kmeng01/rome `util/generate.py` `generate_fast`, called by
`experiments/py/eval_utils_counterfact.test_generation` with `max_out_len=100` and its default
`top_k=5`): one text per CounterFact generation prompt, each next token **sampled** from the 5
most likely tokens with their probabilities renormalised (temperature 1), until the text holds
100 tokens, prompt included; the text returned is prompt + continuation, NFKD-normalised, with
"\\n\\n" replaced by " ". Fluency is the n-gram entropy of those texts and consistency their
TF-IDF similarity to the case's attribute snippets (`jaxedit.eval.metrics`).

`Decoding` makes the choice explicit; `DECODINGS` names the two we offer:

- `sample_top_k5_100` (the default, ROME's): top-k 5 sampling, 100 tokens, seeded;
- `greedy`: the argmax at every step (top-k 1), same length: deterministic, but greedy text
  repeats itself more, so its fluency is lower and not comparable with the paper's.

Deliberate differences from `generate_fast`: sampling is seeded (`Decoding.seed`: the same seed
gives the same texts, so the unedited and the edited model are compared on the same random
stream); a text ends at the end-of-sequence token (ROME keeps decoding past GPT-2's
`<|endoftext|>` and deletes the marker, gluing an unrelated document to the text); a model's
context edit (IKE) is read before every prompt and is not counted in the 100 tokens, nor is BOS.

Decoding runs all prompts of a case as one batch: the prompts are pre-filled into a KV cache
once, then one `lax.scan` step per token (one compile per (rows, prompt bucket, length bucket)).

`greedy_ids(lm, prompts, n_new)` is the short, greedy decoding of the answer metrics
(`jaxedit.eval.measure.measure_generated`): a few tokens after each of many prompts (all
prompts of many cases), sorted by length and run in chunks of up to `GREEDY_ROWS` rows, one
jitted prefill + scan per chunk.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from jaxedit.errors import InputError
from jaxedit.eval import metrics
from jaxedit.eval.prefix_cache import PrefixCache, broadcast_cache
from jaxedit.models.config import ModelConfig
from jaxedit.models.generate import context_rows, prefill_and_decode
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import KVCache, Params
from jaxedit.requests import EditRequest

LENGTH_STEP = 16  # generated lengths are padded to a multiple of this: few compiled shapes
GREEDY_STEP = 8  # the same for the short greedy continuations of the answer metrics
GREEDY_ROWS = 64  # rows per greedy call (a power of two)


@dataclass(frozen=True)
class Decoding:
    """How texts are generated for fluency and consistency.

    top_k: sample each next token from the k most likely ones, probabilities renormalised
        (temperature 1); top_k = 1 is greedy decoding.
    max_out_len: tokens per text, prompt included (ROME's `max_out_len`); a prompt of that
        length or longer gets no continuation.
    seed: the PRNG seed of the sampling.
    """

    top_k: int = 5
    max_out_len: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.top_k < 1:
            raise InputError(f"decoding top_k must be >= 1, got {self.top_k}")
        if self.max_out_len < 1:
            raise InputError(f"decoding length must be >= 1, got {self.max_out_len}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


DECODINGS = {
    "sample_top_k5_100": Decoding(top_k=5, max_out_len=100),  # ROME's generate_fast (default)
    "greedy": Decoding(top_k=1, max_out_len=100),
}
DEFAULT_DECODING = "sample_top_k5_100"


# ----------------------------------------------------------------------------- decoding


@partial(jax.jit, static_argnums=(0, 5, 6))
def _decode(
    cfg: ModelConfig,
    params: Params,
    context: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    n_new: int,
    top_k: int,
    key: Array,
) -> Int[Array, "B N"]:
    """n_new tokens after each left-padded row (following `context`, a batch-1 prefix cache):
    top-k sampling, top_k = 1 the argmax."""
    shared = None if context is None else broadcast_cache(context, tokens.shape[0])

    def pick(state, logits, i):
        top_logits, top_ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)
        # softmax over the k best logits = their probabilities renormalised (ROME's top-k step)
        choice = jax.random.categorical(jax.random.fold_in(key, i), top_logits, axis=-1)
        return state, jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return prefill_and_decode(cfg, params, shared, tokens, mask, n_new, pick, None)


@partial(jax.jit, static_argnums=(0, 5))
def _greedy(
    cfg: ModelConfig,
    params: Params,
    context: KVCache | None,
    tokens: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
    n_new: int,
) -> Int[Array, "B N"]:
    """n_new argmax tokens after each left-padded row (following `context`, a batch-1 cache)."""
    shared = None if context is None else broadcast_cache(context, tokens.shape[0])

    def pick(state, logits, i):
        return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return prefill_and_decode(cfg, params, shared, tokens, mask, n_new, pick, None)


def greedy_ids(lm: LanguageModel, prompts: Sequence[str], n_new: Sequence[int]) -> list[list[int]]:
    """The first `n_new[i]` greedy token ids after `[context +] prompts[i]` (not cut at
    end-of-sequence), all prompts in as few jitted calls as their lengths allow.

    A prompt's trailing spaces / tabs are removed first (the leading-space rule of
    `jaxedit.eval.scoring`: the answer's first token carries its space). Rows are sorted by
    length and cut into chunks of `GREEDY_ROWS`, each padded to a power of two rows (copies of
    its first row) and a multiple of `GREEDY_STEP` tokens; greedy decoding is deterministic,
    so a row's tokens do not depend on the others in its chunk.
    """
    if len(prompts) != len(n_new):
        raise InputError(f"{len(prompts)} prompts but {len(n_new)} lengths")
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("generation needs non-empty prompts")
    if min(n_new) < 1:
        raise InputError("each prompt needs at least one token to generate")
    bare = [p.rstrip(" \t") for p in prompts]
    longest = -(-max(n_new) // GREEDY_STEP) * GREEDY_STEP
    context, rows = context_rows(lm, bare, longest)
    kv = None if context is None else context.kv
    room = lm.config.max_positions - (context.n_tokens if context else 0)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for lo in range(0, len(order), GREEDY_ROWS):
        idx = order[lo : lo + GREEDY_ROWS]
        n = -(-max(n_new[i] for i in idx) // GREEDY_STEP) * GREEDY_STEP
        B = 1 << (len(idx) - 1).bit_length()
        padded = [rows[idx[j] if j < len(idx) else idx[0]] for j in range(B)]
        b = lm.tokenizer.batch(padded, padding="left")
        if b.tokens.shape[1] + n > room:
            raise InputError(
                f"a prompt of {b.tokens.shape[1]} tokens and {n} generated ones need more than "
                f"the model's {lm.config.max_positions} positions"
            )
        toks = np.asarray(
            _greedy(lm.config, lm.params, kv, jnp.asarray(b.tokens), jnp.asarray(b.mask), n)
        )
        for j, i in enumerate(idx):
            out[i] = toks[j, : n_new[i]].tolist()
    return out


def _rows(
    lm: LanguageModel, prompts: Sequence[str], max_out_len: int
) -> tuple[PrefixCache | None, list[list[int]], list[int]]:
    """(the model's context as a prefix cache or None, each row's ids, the prompt's own token
    count: BOS and the context not included)."""
    prefix, rows = context_rows(lm, prompts, max_out_len)
    # A prefix cache holds BOS when the model uses one; only rows without one start with it.
    n_bos = 1 if prefix is None and lm.tokenizer.add_bos else 0
    return prefix, rows, [len(r) - n_bos for r in rows]


def generate_ids(
    lm: LanguageModel, prompts: Sequence[str], decoding: Decoding = DECODINGS[DEFAULT_DECODING]
) -> list[list[int]]:
    """The generated token ids after each prompt, max_out_len minus the prompt's own tokens
    each (not cut at end-of-sequence), in one batch."""
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("generation needs non-empty prompts")
    context, rows, own = _rows(lm, prompts, decoding.max_out_len)
    want = [max(0, decoding.max_out_len - n) for n in own]
    if max(want) == 0:
        return [[] for _ in prompts]
    room = lm.config.max_positions - max(map(len, rows)) - (context.n_tokens if context else 0)
    if max(want) > room:
        raise InputError(
            f"generating {max(want)} tokens after the prompt needs more than the model's "
            f"{lm.config.max_positions} positions"
        )
    n_new = min(-(-max(want) // LENGTH_STEP) * LENGTH_STEP, room)  # few compiled lengths
    B = 1 << (len(rows) - 1).bit_length()  # rows padded to a power of two (repeats of row 0)
    b = lm.tokenizer.batch([rows[i if i < len(rows) else 0] for i in range(B)], padding="left")
    out = _decode(
        lm.config,
        lm.params,
        None if context is None else context.kv,
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        n_new,
        decoding.top_k,
        jax.random.key(decoding.seed),
    )
    out = np.asarray(out)
    return [out[i, : want[i]].tolist() for i in range(len(prompts))]


def generate_texts(
    lm: LanguageModel, prompts: Sequence[str], decoding: Decoding = DECODINGS[DEFAULT_DECODING]
) -> list[str]:
    """prompt + continuation (cut at end-of-sequence) for each prompt: what ROME measures."""
    eos = lm.tokenizer.eos_id
    ids = generate_ids(lm, prompts, decoding)
    return [
        _clean(p + lm.tokenizer.decode(_until_eos(new, eos)))
        for p, new in zip(prompts, ids, strict=True)
    ]


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def _clean(text: str) -> str:
    """ROME's post-processing of a generated text."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


# ----------------------------------------------------------------------------- metrics


def generation_prompts(r: EditRequest) -> list[str]:
    """CounterFact's generation prompts, or the rewrite prompt when a data set has none."""
    return list(r.generation_prompts) or [r.rewrite_prompt]


def generation_metrics(
    lm: LanguageModel,
    r: EditRequest,
    decoding: Decoding,
    *,
    references: Sequence[str] = (),
    tfidf: metrics.TfIdf | None = None,
) -> tuple[dict[str, float], list[str]]:
    """({fluency[, consistency]}, the generated texts) of one request on `lm`.

    Consistency needs the request's reference texts (attribute snippets) and the TF-IDF
    statistics fitted on all snippets; without them only fluency is measured.
    """
    texts = generate_texts(lm, generation_prompts(r), decoding)
    m = {"fluency": metrics.fluency(texts)}
    if references and tfidf is not None:
        m["consistency"] = metrics.consistency(tfidf, texts, references)
    return m, texts
