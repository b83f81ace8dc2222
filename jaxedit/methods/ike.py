"""IKE: in-context knowledge editing with retrieved demonstrations (Zheng et al. 2023,
"Can We Edit Factual Knowledge by In-Context Learning?").

No weight changes: the edit is a context (`jaxedit.edits.ContextEdit`). For an edit
(s, r, o -> o*) with fact f = "{rewrite prompt} {o*}", a query x is scored as

    P(y | c, x),   c = d_1 d_2 … d_k  [d_f]  "New Fact: {f}\\nPrompt: "

where every demonstration d_i comes from a pool of other edit records (a training split), in
one of three kinds, one per evaluation axis (Zce1112zslx/IKE `icl.py`,
`construct_icl_examples`, lines 42-49; EasyEdit `easyeditor/models/ike/util.py` writes the same
strings):

    copy     (reliability)    "New Fact: {f'}\\nPrompt: {f'}\\n\\n"
    update   (generalization) "New Fact: {f'}\\nPrompt: {paraphrase'} {o*'}\\n\\n"
    retain   (locality)       "New Fact: {f'}\\nPrompt: {neighbour prompt'} {its true answer}\\n\\n"

and d_f = "New Fact: {f}\\nPrompt: {f}\\n\\n" is the edited fact's own copy demonstration,
which the paper's code appends after the retrieved ones (`icl.py` line 129, in its main loop;
`copy_own_fact`, default True as the paper).

Selection and order follow the paper's code: the k pool records nearest to the edit's fact
(`jaxedit.methods.ike_retrieval`) each give one demonstration; the kinds are a seeded shuffle
of the mix (k = 32: 4 copy, 12 update, 16 retain; `icl.py` line 31), the paraphrase or
neighbour of a record is a seeded choice, and the demonstrations are ordered least similar
first (`icl.py` line 50 reverses the nearest-first list), so the nearest sits right before
the new fact. The own copy has similarity 1 (the fact with itself): it is last, and the last
demonstration a tight context drops.

A context edit renders as demonstrations + one "New Fact: {f}\\n" line per fact + "Prompt: ";
`jaxedit.apply` puts it in front of every query of the model (scoring and generation run it
once into a KV cache). Sequential edits compose (`ContextEdit.compose`): all facts so far, the
demonstrations merged, re-fitted to the model's length when rendered.

Deliberate differences from the paper's code:
- Retrieval embeds with the edited model's own hidden states (or TF-IDF) instead of
  all-MiniLM-L6-v2, which we cannot download (`ike_retrieval`).
- Kinds and choices come from a per-edit seed (crc32 of the fact), not the global RNG, so an
  edit always gets the same context whatever ran before it.
- Pool records with the edit's own prompt and subject are skipped (no leakage when the pool
  is the test set); a record without the assigned kind's material gives a copy.
- The smollm2-135m preset uses k = 8 (mix 1 : 3 : 4 of the same 4 : 12 : 16), a ~250-token
  context for CPU speed; k = 32 is the paper's (~1000 tokens on SmolLM2).
- Contexts longer than `max_context` (default: the model's length) lose their least similar
  demonstrations, never a fact or the query (`ContextEdit.fit`). `zero_demo` is the ablation
  with no demonstration at all (not even the own copy): only "New Fact: {f}\\nPrompt: ".
"""

from __future__ import annotations

import dataclasses
import random
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxedit.edits import ContextEdit, Demonstration
from jaxedit.errors import ConfigError, InputError
from jaxedit.io.tokenizer import TextTokenizer
from jaxedit.methods.base import EditMethod, PrepareOptions
from jaxedit.methods.ike_retrieval import EMBEDDERS, Pool, make_retriever
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

COPY, UPDATE, RETAIN = "copy", "update", "retain"
KINDS = (COPY, UPDATE, RETAIN)
PAPER_K = 32
PAPER_MIX = (4, 12, 16)  # copy, update, retain for k = 32 (Zheng et al. 2023, §3.2)
# JSON and --set give integer weights ([4, 12, 16]): a weight is an int or a float.
Mix = tuple[float | int, float | int, float | int]
OWN_SIMILARITY = 1.0  # the cosine of the edited fact with itself: the nearest demonstration


@dataclass(frozen=True)
class IKEHparams:
    """IKE settings (defaults: the paper's, where it has one; presets in jaxedit/hparams/ike).

    demos: the demonstration pool, a file of edit records (any format jaxedit reads).
    k: retrieved demonstrations per edit. mix: copy, update, retain proportions.
    seed: seeds the kinds and the paraphrase / neighbour choices (per edit).
    zero_demo: the ablation: no demonstration at all, only the new fact.
    embedder: "hidden" (the model's mean-pooled states of block `embed_layer`) or "tfidf".
    pool_size: use only the first N pool records. max_context: token limit of context + query
    (default: the model's). copy_own_fact: append the edited fact's own copy demonstration.
    """

    demos: str | None = None
    k: int = PAPER_K
    mix: Mix = PAPER_MIX
    seed: int = 0
    zero_demo: bool = False
    embedder: str = "hidden"
    embed_layer: int = 4
    pool_size: int | None = None
    max_context: int | None = None
    copy_own_fact: bool = True

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError(f"ike: k must be ≥ 0, got {self.k}")
        try:
            mix_counts(self.k, self.mix)  # three non-negative weights
        except InputError as e:
            raise ConfigError(f"ike: {e}") from None
        if self.embedder not in EMBEDDERS:
            raise ConfigError(f"ike: embedder {self.embedder!r}; choose one of {EMBEDDERS}")
        for name in ("pool_size", "max_context"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"ike: {name} must be positive, got {value}")


@dataclass(frozen=True)
class IKEState:
    """What `prepare` builds: the pool and its retriever (None for zero_demo / k = 0)."""

    hp: IKEHparams
    pool: Pool | None
    retriever: Any


@dataclass(frozen=True)
class Pick:
    """One chosen demonstration: pool record, kind, which paraphrase / neighbour, similarity."""

    source: int
    kind: str
    option: int
    similarity: float


# ----------------------------------------------------------------------------- format


def join(prompt: str, answer: str) -> str:
    """`"{prompt} {answer}"` with exactly one space between them."""
    return f"{prompt.rstrip()} {answer.strip()}"


def fact(r: EditRequest) -> str:
    """The new fact as a sentence: rewrite prompt + target_new."""
    return join(r.rewrite_prompt, r.target_new)


def demo(new_fact: str, prompt: str) -> str:
    return f"New Fact: {new_fact}\nPrompt: {prompt}\n\n"


def demonstrations(r: EditRequest) -> dict[str, list[str]]:
    """All demonstrations a pool record can give, by kind (copy / update / retain)."""
    f = fact(r)
    return {
        COPY: [demo(f, f)],
        UPDATE: [demo(f, join(p, r.target_new)) for p in r.paraphrase_prompts],
        RETAIN: [demo(f, join(n.prompt, n.answers[0])) for n in r.neighborhood if n.answers],
    }


def own_copy(r: EditRequest) -> Demonstration:
    """The edited fact's own copy demonstration (`icl.py` line 129)."""
    f = fact(r)
    return Demonstration(COPY, demo(f, f), OWN_SIMILARITY, -1)


def mix_counts(k: int, mix: Sequence[float | int] = PAPER_MIX) -> tuple[int, int, int]:
    """Split k demonstrations by the mix ratios (largest remainder; (4,12,16) for k = 32)."""
    if k < 0:
        raise InputError(f"k must be ≥ 0, got {k}")
    w = np.asarray(mix, np.float64)
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"mix needs three non-negative weights (copy,update,retain), got {mix}")
    exact = k * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: k - counts.sum()]:
        counts[i] += 1
    return tuple(int(c) for c in counts)


def query_tokens(tok: TextTokenizer, r: EditRequest) -> int:
    """Tokens of the longest query + answer of a request (what must fit after the context)."""
    texts = [join(r.rewrite_prompt, r.target_new)]
    answers = [a for a in (r.target_new, r.target_true) if a]
    for p in r.paraphrase_prompts:
        texts += [join(p, a) for a in answers]
    for probe in (*r.neighborhood, *r.portability, *r.reverse):
        texts += [join(probe.prompt, a) for a in (*probe.answers, r.target_new)]
    return max(len(tok.encode_continuation(" " + t)) for t in texts)


# ----------------------------------------------------------------------------- selection


def nearest(r: EditRequest, pool: Pool, similarity: np.ndarray, k: int) -> list[int]:
    """The k pool records most similar to the edit, nearest first; records with the edit's
    own prompt and subject are skipped (no leakage when the pool is the test set)."""
    own = (r.prompt, r.subject)
    ranked = [int(i) for i in np.argsort(-similarity, kind="stable")]
    return [i for i in ranked if (pool.requests[i].prompt, pool.requests[i].subject) != own][:k]


def draw(
    r: EditRequest, pool: Pool, chosen: Sequence[int], similarity: np.ndarray, hp: IKEHparams
) -> list[Pick]:
    """Kinds for the chosen records (a seeded shuffle of the mix) and a seeded paraphrase /
    neighbour for each; in the order of `chosen` (nearest first)."""
    c, u, t = mix_counts(len(chosen), hp.mix)
    kinds = [COPY] * c + [UPDATE] * u + [RETAIN] * t
    # Per-edit seed: the same edit always gets the same demonstrations.
    rng = random.Random(hp.seed * 1_000_003 + zlib.crc32(fact(r).encode()))
    rng.shuffle(kinds)
    picks = []
    for i, kind in zip(chosen, kinds, strict=True):
        options = demonstrations(pool.requests[i])
        if not options[kind]:
            kind = COPY
        option = rng.randrange(len(options[kind]))
        picks.append(Pick(i, kind, option, float(similarity[i])))
    return picks


def demonstration(pool: Pool, pick: Pick) -> Demonstration:
    text = demonstrations(pool.requests[pick.source])[pick.kind][pick.option]
    return Demonstration(pick.kind, text, pick.similarity, pick.source)


def context_edit(
    tok: TextTokenizer,
    requests: Sequence[EditRequest],
    picks: Sequence[Pick],
    pool: Pool | None,
    *,
    copy_own_fact: bool,
    meta: dict | None = None,
) -> ContextEdit:
    """The context edit of `requests` from picks given nearest first: demonstrations least
    similar first (the paper reverses its nearest-first list), then each fact's own copy."""
    demos = [demonstration(pool, p) for p in reversed(picks)] if picks else []
    if copy_own_fact:
        demos += [own_copy(r) for r in requests]
    return ContextEdit(
        facts=tuple(fact(r) for r in requests),
        demonstrations=tuple(demos),
        reserve_tokens=max(query_tokens(tok, r) for r in requests),
        meta=meta or {},
    )


# ----------------------------------------------------------------------------- the method


def prepare(lm: LanguageModel, hp: IKEHparams, opts: PrepareOptions) -> IKEState:
    """Load the pool and its retriever (pool embeddings cached under `opts.cache_dir`)."""
    if hp.zero_demo or hp.k == 0:
        return IKEState(hp, None, None)
    if not hp.demos:
        raise InputError(
            "ike needs a demonstration pool: demos=PATH (a file of edit records), or zero_demo=true"
        )
    pool = Pool.load(hp.demos, hp.pool_size)
    if hp.k > len(pool):
        warnings.warn(f"IKE: k={hp.k} > pool size {len(pool)}; using all {len(pool)}", stacklevel=2)
    keys = [fact(r) for r in pool.requests]  # retrieval embeds each record's new fact
    retriever = make_retriever(lm, pool, keys, hp.embedder, hp.embed_layer, opts.cache_dir)
    return IKEState(hp, pool, retriever)


def compute(
    lm: LanguageModel, state: IKEState, requests: list[EditRequest]
) -> tuple[ContextEdit, dict]:
    """The context edit of `requests`: retrieval for the first request's fact, one new-fact
    line per request, fitted to `max_context`; and an info dict."""
    hp, tok = state.hp, lm.tokenizer
    picks: list[Pick] = []
    if state.pool is not None and not hp.zero_demo and hp.k > 0:
        sim = state.retriever.similarity([fact(requests[0])])[0]
        chosen = nearest(requests[0], state.pool, sim, hp.k)
        picks = draw(requests[0], state.pool, chosen, sim, hp)
    meta = {"method": "ike", "hparams": dataclasses.asdict(hp)}
    edit = context_edit(
        tok,
        requests,
        picks,
        state.pool,
        copy_own_fact=hp.copy_own_fact and not hp.zero_demo,
        meta=meta,
    )
    limit = min(hp.max_context or lm.config.max_positions, lm.config.max_positions)
    kept, dropped = edit.fit(tok, limit)
    edit = dataclasses.replace(edit, demonstrations=kept)
    kinds = Counter(d.kind for d in kept)
    info = {
        "k": len(kept),
        **{f"n_{kind}": kinds.get(kind, 0) for kind in KINDS},
        "own_copy": any(d.source < 0 for d in kept),
        "dropped": dropped,
        "context_tokens": len(tok.encode(edit.text())),  # `kept` already fits `limit`
        "reserve_tokens": edit.reserve_tokens,
        "zero_demo": hp.zero_demo,
    }
    return edit, info


METHOD = EditMethod(
    name="ike",
    hparams_cls=IKEHparams,
    prepare_fn=prepare,
    compute_fn=compute,
    summary="in-context editing: retrieved demonstrations + the new fact before every query",
)
