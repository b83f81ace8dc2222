"""General ability of a model, edited vs unedited: perplexity, known facts, fluency.

An edit should change one fact and leave the rest of the model as it was. Every evaluation
(`jaxedit.eval.runner.evaluate`) measures three cheap signs of collateral damage on the
unedited model and on the edited one (a few seconds each for the embedded SmolLM2-135M on two
CPU cores):

- `wikitext_ppl`: perplexity exp(Σ NLL / N) of a fixed text, teacher forced. The text is
  tokenized once without BOS and cut to its first `max_tokens` tokens (2,048), then into
  non-overlapping windows of `window` tokens (256; stride = window, the last window may be
  shorter); every token of a window but its first is predicted from the window's earlier
  tokens (after BOS when the model uses one, after the model's context when it carries a
  context edit), and N counts those predicted tokens. The default text is the first 79 lines
  of the WikiText-2 raw test split, shipped as package data (`jaxedit/data/`, CC BY-SA 3.0,
  attribution in `WIKITEXT_LICENSE.txt`); another text file is named `ppl` in the results
  (`--ppl-corpus`), not `wikitext_ppl`.
- `known_facts_acc`: accuracy on facts the model should keep, EasyEdit's teacher-forced token
  accuracy: for each (prompt, answer) the fraction of answer tokens (`" " + answer`, the
  leading-space rule of `jaxedit.eval.scoring`) whose argmax given the prompt and the previous
  answer tokens is that token, averaged over facts (`metrics.token_accuracy`). The candidate
  facts are the records of the evaluated data file that the run does not edit (prompt ->
  target_true), or a file of known facts (ROME's `known_1000.json`: prompt -> attribute) with
  `--known-facts`, in a seeded order; `known_to` keeps the first 200 that the *unedited* model
  knows (every answer token its argmax: it completes the answer greedily), so the unedited
  accuracy is 1 and the edited one says how much of them the edit kept. (Unfiltered, as
  `jaxedit eval --known-facts-unfiltered`, SmolLM2-135M's accuracy on CounterFact records is
  ~0.09: a ratio of two small, noisy numbers.)
- `fluency`: ROME's generation entropy (`metrics.fluency`: mean over texts of (2/3 H_2 + 4/3
  H_3) / 2 of word n-grams, bits) of greedy texts from 8 fixed prompts, 48 tokens per text
  with the prompt included (about 40 new tokens). Greedy, not ROME's top-k 5 sampling, so that
  the unedited and the edited texts differ only through the edit (and in a short time);
  the numbers are therefore lower than sampled fluency and not comparable with the paper's.

Which edited model: the final model of a sequential run (every edit applied); in independent
and batch modes the model after the LAST edit (the last case or chunk edited from the
unedited model), not a mean over all edited models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from jaxedit.errors import InputError
from jaxedit.eval import metrics, prefix_cache, scoring
from jaxedit.eval.datasets import detect_format, read_records
from jaxedit.eval.generation import Decoding, generate_texts
from jaxedit.io.atomic import write_text_atomic
from jaxedit.io.text import read_text
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest
from jaxedit.stats import default_cache_dir, model_fingerprint

WIKITEXT_SLICE = "wikitext2_test_slice.txt"
PPL_WINDOW = 256
PPL_TOKENS = 2048
# Rows per scoring call: [rows, window, V] fp32 logits (4 × 256 × 49,152 × 4 B = 200 MB).
PPL_ROWS = 4
N_KNOWN_FACTS = 200
KNOWN_FACTS_SEED = 0
FLUENCY_LENGTH = 48
FLUENCY_PROMPTS = (
    "The history of the old harbour town begins",
    "My grandmother always told me that",
    "The new bridge across the river was",
    "Scientists studying the deep ocean found",
    "The best way to cook rice is",
    "After the election, the new government",
    "The museum's most famous painting shows",
    "During the long winter of that year,",
)
# Answer fields of a known-facts file, in order of preference (ROME's known_1000.json has
# `attribute`, the true object, and `prediction`, GPT-2 XL's greedy continuation).
ANSWER_KEYS = ("attribute", "answer", "target_true", "ground_truth", "prediction")

Fact = tuple[str, str]  # (prompt, answer)


def default_text() -> str:
    """The shipped WikiText-2 test slice (package data)."""
    return resources.files("jaxedit.data").joinpath(WIKITEXT_SLICE).read_text(encoding="utf-8")


@dataclass(frozen=True)
class GeneralSuite:
    """What general ability is measured on: a text, facts, fluency prompts and their sizes.

    `facts` may be empty (no `known_facts_acc`); `text_source` / `facts_source` say where they
    come from (results.json records them). With `known_n`, `facts` are candidates: the runner
    keeps the first `known_n` the unedited model knows (`with_known_facts`, cached under
    `cache_dir`, default the statistics cache) before it measures anything."""

    text: str
    text_source: str = f"jaxedit/data/{WIKITEXT_SLICE}"
    facts: tuple[Fact, ...] = ()
    facts_source: str = ""
    known_n: int | None = None
    cache_dir: str | None = field(default=None, repr=False)
    prompts: tuple[str, ...] = FLUENCY_PROMPTS
    window: int = PPL_WINDOW
    max_tokens: int = PPL_TOKENS
    fluency_length: int = FLUENCY_LENGTH
    default_corpus: bool = field(default=False, repr=False)

    def __post_init__(self):
        if self.window < 2 or self.max_tokens < 2:
            raise InputError("perplexity needs windows and a text of at least 2 tokens")
        if not self.text.strip():
            raise InputError(f"perplexity text {self.text_source} is empty")
        if not self.prompts or self.fluency_length < 2:
            raise InputError("fluency needs prompts and texts of at least 2 tokens")
        if self.known_n is not None and self.known_n <= 0:
            raise InputError(f"the number of known facts must be positive, got {self.known_n}")

    @classmethod
    def default(cls, facts: Sequence[Fact] = (), facts_source: str = "", **kw) -> GeneralSuite:
        """The shipped WikiText-2 slice, the fixed fluency prompts, these facts."""
        return cls(
            default_text(), facts=tuple(facts), facts_source=facts_source, default_corpus=True, **kw
        )

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> GeneralSuite:
        """Perplexity on another text file (UTF-8)."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"perplexity corpus not found: {p}")
        return cls(read_text(p, "perplexity corpus"), text_source=str(p), **kw)

    @property
    def ppl_name(self) -> str:
        return "wikitext_ppl" if self.default_corpus else "ppl"

    def setup(self) -> dict:
        """JSON description (results.json `general.setup`)."""
        return {
            "ppl_corpus": self.text_source,
            "ppl_max_tokens": self.max_tokens,
            "ppl_window": self.window,
            "known_facts": self.facts_source or None,
            "n_known_facts": len(self.facts),
            "fluency_prompts": len(self.prompts),
            "fluency_length": self.fluency_length,
            "fluency_decoding": "greedy",
        }


# ----------------------------------------------------------------------------- known facts


def facts_from_requests(
    requests: Sequence[EditRequest],
    edited: Sequence[EditRequest] = (),
    *,
    n: int | None = N_KNOWN_FACTS,
    seed: int = KNOWN_FACTS_SEED,
) -> list[Fact]:
    """(rewrite prompt, target_true) of up to `n` requests (a seeded sample, in file order;
    `n=None`: all of them in a seeded order) that have a target_true and are not `edited`:
    neither their case_id nor their rewrite prompt is one of the edited requests' (an edit is
    meant to change that prompt's answer)."""
    skip_ids = {str(r.case_id) for r in edited}
    seen = {r.rewrite_prompt for r in edited}
    pool = []
    for r in requests:
        if r.target_true and str(r.case_id) not in skip_ids and r.rewrite_prompt not in seen:
            seen.add(r.rewrite_prompt)
            pool.append((r.rewrite_prompt, r.target_true))
    return _sample(pool, n, seed)


def load_known_facts(
    path: str | Path, *, n: int | None = N_KNOWN_FACTS, seed: int = KNOWN_FACTS_SEED
) -> list[Fact]:
    """Up to `n` facts (seeded sample, in file order; `n=None`: every fact, in a seeded order)
    of a known-facts file: records with `prompt` and an answer field (`ANSWER_KEYS`, e.g.
    ROME's known_1000.json: attribute), or any editing data set (`jaxedit.eval.datasets`:
    rewrite prompt -> target_true)."""
    records = read_records(path)
    first = records[0]
    if isinstance(first, dict) and "prompt" in first and any(k in first for k in ANSWER_KEYS):
        pool = []
        for i, rec in enumerate(records):
            answer = next((rec[k] for k in ANSWER_KEYS if isinstance(rec.get(k), str)), "")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise InputError(f"{path}: record {i} has no prompt")
            if not answer.strip():
                raise InputError(f"{path}: record {i} has none of {', '.join(ANSWER_KEYS)}")
            pool.append((rec["prompt"], answer))
        return _sample(pool, n, seed)
    from jaxedit.eval import datasets

    detect_format(first)  # a clear error for files of neither kind
    return facts_from_requests(datasets.load(path, skip_bad=True).requests, n=n, seed=seed)


def _sample(pool: list[Fact], n: int | None, seed: int) -> list[Fact]:
    if n is None:  # every fact, in a seeded order (candidates for `known_to`)
        return [pool[i] for i in random.Random(seed).sample(range(len(pool)), len(pool))]
    if n <= 0:
        raise InputError(f"the number of known facts must be positive, got {n}")
    if len(pool) <= n:
        return pool
    keep = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in keep]


def known_to(
    lm: LanguageModel,
    candidates: Sequence[Fact],
    n: int = N_KNOWN_FACTS,
    *,
    chunk: int = 512,
    max_scored: int | None = None,
) -> tuple[list[Fact], int]:
    """The first `n` candidate facts that `lm` knows, in the candidates' order, and how many
    candidates were scored to find them.

    Known: teacher-forced token accuracy 1, every answer token the argmax after the prompt and
    the answer so far (so `lm`'s greedy continuation starts with the answer). Candidates are
    scored `chunk` at a time until `n` are found or `max_scored` (default 40 n: SmolLM2-135M
    knows ~1 in 26 CounterFact records) have been scored; fewer than `n` (possibly none, for a
    model that knows nothing, such as a random one) when they run out."""
    if n <= 0:
        raise InputError(f"the number of known facts must be positive, got {n}")
    limit = min(len(candidates), 40 * n if max_scored is None else max_scored)
    kept: list[Fact] = []
    scored = 0
    while len(kept) < n and scored < limit:
        part = list(candidates[scored : min(scored + chunk, limit)])
        scored += len(part)
        # a fact longer than the model's context cannot be one it knows
        p_ids, t_ids = scoring.encode_queries(lm.tokenizer, *zip(*part, strict=True))
        sizes = [len(p) + len(t) for p, t in zip(p_ids, t_ids, strict=True)]
        part = [f for f, k in zip(part, sizes, strict=True) if k <= lm.config.max_positions]
        if part:
            s = scoring.score_targets(lm, [p for p, _ in part], [a for _, a in part])
            kept += [f for f, acc in zip(part, s.token_acc, strict=True) if acc == 1.0]
    return kept[:n], scored


def cached_known_to(
    lm: LanguageModel,
    candidates: Sequence[Fact],
    n: int = N_KNOWN_FACTS,
    cache_dir: str | Path | None = None,
) -> tuple[list[Fact], int]:
    """`known_to`, remembered in `<cache_dir>/known_facts/` (default: the statistics cache
    directory), one JSON file per (model fingerprint, candidates, n): finding 200 facts
    SmolLM2-135M knows scores ~5,000 candidates, a minute or more on two CPU cores, for every
    run otherwise. A file that does not parse, names another key or holds facts that are not
    candidates is ignored and rewritten (atomically)."""
    key = {"version": 1, "model": model_fingerprint(lm), "n": n, "candidates": candidates}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()) / "known_facts" / f"{digest}.json"
    try:
        hit = json.loads(path.read_text(encoding="utf-8"))
        facts = [(p, a) for p, a in hit["facts"]]
        if hit["key"] == digest and len(facts) <= n and set(facts) <= set(candidates):
            return facts, int(hit["scored"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: compute it again
    facts, scored = known_to(lm, candidates, n)
    record = {"key": digest, "facts": facts, "scored": scored}
    write_text_atomic(path, json.dumps(record))
    return facts, scored


# The words `with_known_facts` adds to a suite's facts source, by which a run's results say
# their known-facts accuracy is over facts the unedited model knows (1.0 unedited).
KNOWN_FILTER_NOTE = "known to the unedited model"


def with_known_facts(suite: GeneralSuite, lm: LanguageModel) -> GeneralSuite:
    """`suite` with only the first `known_n` candidate facts that the unedited `lm` knows
    (unchanged without `known_n`); fewer, with a line on stderr, when the candidates run out."""
    if suite.known_n is None or not suite.facts:
        return suite
    facts, scored = cached_known_to(lm, suite.facts, suite.known_n, suite.cache_dir)
    if len(facts) < suite.known_n:
        lack = "; known_facts_acc is not measured" if not facts else ""
        print(
            f"jaxedit: the unedited model knows {len(facts)} of {scored} candidate facts "
            f"({suite.known_n} asked){lack}",
            file=sys.stderr,
        )
    source = f"{suite.facts_source}: {len(facts)} {KNOWN_FILTER_NOTE} of {scored} scored"
    return dataclasses.replace(suite, facts=tuple(facts), facts_source=source, known_n=None)


# ----------------------------------------------------------------------------- measures


def perplexity(
    lm: LanguageModel, text: str, *, window: int = PPL_WINDOW, max_tokens: int = PPL_TOKENS
) -> float:
    """exp(mean NLL) of the text's tokens (windows as in the module docstring)."""
    ids = lm.tokenizer.encode_continuation(text)[:max_tokens]
    return float(np.exp(token_nll(lm, ids, window=window).mean()))


def token_nll(lm: LanguageModel, ids: Sequence[int], *, window: int = PPL_WINDOW) -> np.ndarray:
    """NLL of every predicted token of `ids`, float64 [N]: non-overlapping windows of `window`
    tokens, each token but a window's first predicted from the window's earlier tokens (after
    the model's prefix), in order."""
    ids = list(ids)
    windows = [w for w in (ids[i : i + window] for i in range(0, len(ids), window)) if len(w) > 1]
    if not windows:
        raise InputError("perplexity needs a text of at least 2 tokens")
    prefix, cached = _prefix(lm, window)
    logprobs, _ = prefix_cache.score_continuations(
        lm,
        prefix,
        [w[:1] for w in windows],
        [w[1:] for w in windows],
        use_cache=cached,
        max_rows=PPL_ROWS,
    )
    return -np.concatenate(logprobs).astype(np.float64)


def _prefix(lm: LanguageModel, window: int) -> tuple[list[int], bool]:
    """(ids every window follows, whether to cache them): the model's context (a context
    edit, fitted so that a window follows it), else BOS when the model uses one."""
    tok = lm.tokenizer
    context = prefix_cache.fitted_context(lm, window)
    if context is None:
        return ([tok.bos_id] if tok.add_bos else []), False
    head, _ = prefix_cache.split_context(tok, context, ["."])
    return head, bool(head)


def known_facts_accuracy(lm: LanguageModel, facts: Sequence[Fact]) -> float:
    """Mean teacher-forced token accuracy of each answer after its prompt (one batched call)."""
    if not facts:
        raise InputError("no known facts to measure")
    s = scoring.score_targets(lm, [p for p, _ in facts], [a for _, a in facts])
    return float(np.mean(s.token_acc))


def fluency(lm: LanguageModel, prompts: Sequence[str], length: int = FLUENCY_LENGTH) -> float:
    """ROME's n-gram entropy of greedy texts of `length` tokens (prompt included)."""
    return metrics.fluency(generate_texts(lm, prompts, Decoding(top_k=1, max_out_len=length)))


def measure_general(lm: LanguageModel, suite: GeneralSuite) -> dict[str, float]:
    """{ppl name: perplexity, known_facts_acc (when the suite has facts), fluency} of `lm`."""
    ppl = perplexity(lm, suite.text, window=suite.window, max_tokens=suite.max_tokens)
    out = {suite.ppl_name: ppl}
    if suite.facts:
        out["known_facts_acc"] = known_facts_accuracy(lm, suite.facts)
    out["fluency"] = fluency(lm, suite.prompts, suite.fluency_length)
    return out
