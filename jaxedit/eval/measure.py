"""What a request is measured on, and its per-case metrics.

`queries(r)` lists every (prompt, target) pair an `EditRequest` is scored on; `measure(lm,
requests)` scores all of them in one batched call (`jaxedit.eval.scoring.score_targets`, which
reads a context edit the model carries); `case_metrics(r, post, pre)` turns the raw scores into
the named metrics of `jaxedit.eval.metrics`:

- rewrite / paraphrase prompts, target_new vs target_true: efficacy_* / paraphrase_*;
- CounterFact neighbours (they share the case's true object): neighborhood_* (new vs true);
- any neighbour: specificity_acc (its own answer) and, against the unedited model, locality;
- reliability / generalization: token accuracy of target_new on rewrite / paraphrase prompts;
- portability (per kind too) and reverse: token accuracy of the best alias.

The generated form of the same questions: `gen_queries(r)` lists every (prompt, answers) whose
greedy continuation is read, `measure_generated(lm, requests)` decodes all of them in a few
batched calls (`jaxedit.eval.generation.greedy_ids`, `GEN_MARGIN` tokens beyond the longest
answer), and `gen_case_metrics(r, post, pre)` gives the `*_gen` metrics: the fraction of
prompts whose continuation begins with an accepted answer (`metrics.generated_match`):

- `efficacy_gen` / `paraphrase_gen`: rewrite / paraphrase prompts continue with target_new;
- `neighborhood_gen`: CounterFact neighbours continue with their true object (the case's
  target_true); `specificity_gen`: any neighbour continues with its own answer;
  `locality_gen` (against the unedited model): the neighbour's continuation is unchanged;
- `portability_gen` (and `portability/<kind>_gen`), `reverse_gen`: any alias.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxedit.eval import metrics
from jaxedit.eval.generation import greedy_ids
from jaxedit.eval.scoring import continuation, score_targets
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest, Probe

Key = tuple  # (kind, index, which): ("rw", 0, "new"), ("nb", 2, "ans"), ("port", 0, 1), ...


class QueryScore(NamedTuple):
    """The raw teacher-forced result of one (prompt, target) query."""

    nll: float  # mean token NLL
    acc: float  # token accuracy
    exact: bool  # every token is the argmax
    argmax: np.ndarray  # [n] the argmax at each target position


Scores = dict[Key, QueryScore]


def counterfact_neighbour(r: EditRequest, probe: Probe) -> bool:
    """CounterFact neighbours share the case's true object: ROME's NS compares new vs true."""
    return bool(r.target_true) and probe.answers[0] == r.target_true


def queries(r: EditRequest) -> list[tuple[Key, str, str]]:
    """Every (key, prompt, target) a request is scored on; keys say what each one is for."""
    q: list[tuple[Key, str, str]] = []
    prompts = [("rw", 0, r.rewrite_prompt)]
    prompts += [("pp", i, p) for i, p in enumerate(r.paraphrase_prompts)]
    for kind, i, p in prompts:
        q.append(((kind, i, "new"), p, r.target_new))
        if r.target_true:
            q.append(((kind, i, "true"), p, r.target_true))
    for i, probe in enumerate(r.neighborhood):
        q.append((("nb", i, "ans"), probe.prompt, probe.answers[0]))
        if counterfact_neighbour(r, probe):
            q.append((("nb", i, "new"), probe.prompt, r.target_new))
    for name, probes in (("port", r.portability), ("rev", r.reverse)):
        for i, probe in enumerate(probes):
            for j, a in enumerate(probe.answers):
                q.append(((name, i, j), probe.prompt, a))
    return q


def measure(lm: LanguageModel, requests: Sequence[EditRequest]) -> list[Scores]:
    """Raw scores of every query of every request, in one batched scoring call."""
    uniq: dict[tuple[str, str], int] = {}
    per_req = [
        [(key, uniq.setdefault((p, t), len(uniq))) for key, p, t in queries(r)] for r in requests
    ]
    pairs = list(uniq)
    s = score_targets(lm, [p for p, _ in pairs], [t for _, t in pairs])
    nll, acc, exact = s.nll, s.token_acc, s.exact
    raw = [
        QueryScore(float(nll[i]), float(acc[i]), bool(exact[i]), s.argmax[i])
        for i in range(len(pairs))
    ]
    return [{key: raw[i] for key, i in rows} for rows in per_req]


def is_known(r: EditRequest, pre: Scores) -> bool:
    """The unedited model prefers target_true to target_new on the rewrite prompt (lower mean
    token NLL): the fact is one it knows. False when the request has no target_true."""
    if not r.target_true:
        return False
    return pre[("rw", 0, "true")].nll < pre[("rw", 0, "new")].nll


# ----------------------------------------------------------------------------- metrics


def case_metrics(r: EditRequest, post: Scores, pre: Scores | None = None) -> dict[str, float]:
    """The metrics of one request from its raw scores after the edit (`pre`: before, for
    locality)."""
    m = _counterfact(r, post)
    m["reliability"] = post[("rw", 0, "new")].acc
    if r.paraphrase_prompts:
        pp = range(len(r.paraphrase_prompts))
        m["generalization"] = float(np.mean([post[("pp", i, "new")].acc for i in pp]))
    if r.neighborhood:
        nb = range(len(r.neighborhood))
        m["specificity_acc"] = float(np.mean([post[("nb", i, "ans")].acc for i in nb]))
        if pre is not None:
            agree = [
                metrics.locality_agreement(
                    pre[("nb", i, "ans")].argmax, post[("nb", i, "ans")].argmax
                )
                for i in nb
            ]
            m["locality"] = float(np.mean(agree))
    return m | _probes(r, post)


def _counterfact(r: EditRequest, post: Scores) -> dict[str, float]:
    """ROME's probability comparisons (new vs true) and MEMIT's exact-match accuracies."""
    m: dict[str, float] = {}
    if r.target_true:
        for kind, name, n in (
            ("rw", "efficacy", 1),
            ("pp", "paraphrase", len(r.paraphrase_prompts)),
        ):
            if n == 0:
                continue
            new = np.array([post[(kind, i, "new")].nll for i in range(n)])
            true = np.array([post[(kind, i, "true")].nll for i in range(n)])
            m[f"{name}_score"] = metrics.efficacy_score(new, true)
            m[f"{name}_magnitude"] = metrics.efficacy_magnitude(new, true)
            m[f"{name}_acc"] = float(np.mean([post[(kind, i, "new")].exact for i in range(n)]))
    cf = [i for i, p in enumerate(r.neighborhood) if counterfact_neighbour(r, p)]
    if cf:
        new = np.array([post[("nb", i, "new")].nll for i in cf])
        true = np.array([post[("nb", i, "ans")].nll for i in cf])
        m["neighborhood_score"] = metrics.neighborhood_score(new, true)
        m["neighborhood_magnitude"] = metrics.neighborhood_magnitude(new, true)
        m["neighborhood_acc"] = float(np.mean([post[("nb", i, "ans")].exact for i in cf]))
    return m


def _probes(r: EditRequest, post: Scores) -> dict[str, float]:
    """portability (overall and per kind) and reverse: a probe counts as its best alias."""
    m: dict[str, float] = {}
    for name, probes in (("port", r.portability), ("rev", r.reverse)):
        best = [
            max(post[(name, i, j)].acc for j in range(len(p.answers))) for i, p in enumerate(probes)
        ]
        if not best:
            continue
        if name == "rev":
            m["reverse"] = float(np.mean(best))
            continue
        m["portability"] = float(np.mean(best))
        by_kind: dict[str, list[float]] = defaultdict(list)
        for p, b in zip(probes, best, strict=True):
            by_kind[p.kind or "portability"].append(b)
        m |= {f"portability/{kind}": float(np.mean(v)) for kind, v in by_kind.items()}
    return m


# ----------------------------------------------------------------------------- generated

GEN_MARGIN = 4  # tokens generated beyond the answer's own: room for "the", a space, a comma


class GenScore(NamedTuple):
    """The greedy continuation of one prompt and whether it begins with an accepted answer."""

    text: str  # decoded, cut at end-of-sequence
    match: bool


GenScores = dict[Key, GenScore]


def gen_queries(r: EditRequest) -> list[tuple[Key, str, tuple[str, ...]]]:
    """Every (key, prompt, accepted answers) whose continuation a request is judged on."""
    q: list[tuple[Key, str, tuple[str, ...]]] = [(("rw", 0), r.rewrite_prompt, (r.target_new,))]
    q += [(("pp", i), p, (r.target_new,)) for i, p in enumerate(r.paraphrase_prompts)]
    for name, probes in (("nb", r.neighborhood), ("port", r.portability), ("rev", r.reverse)):
        q += [((name, i), p.prompt, p.answers) for i, p in enumerate(probes)]
    return q


def measure_generated(lm: LanguageModel, requests: Sequence[EditRequest]) -> list[GenScores]:
    """The greedy continuation of every `gen_queries` prompt of every request.

    A prompt gets (tokens of its longest accepted answer, `" " + answer`) + `GEN_MARGIN`
    tokens; a prompt asked by several queries is decoded once, and each query reads its own
    length of it, so the result of a request does not depend on what it is batched with.
    """
    tok = lm.tokenizer
    per_req = [gen_queries(r) for r in requests]
    want: dict[str, int] = {}
    n_of: dict[tuple[Key, int], int] = {}
    for k, qs in enumerate(per_req):
        for key, prompt, answers in qs:
            n = max(len(tok.encode_continuation(continuation(a))) for a in answers) + GEN_MARGIN
            n_of[(key, k)] = n
            want[prompt] = max(want.get(prompt, 0), n)
    prompts = list(want)
    ids = dict(zip(prompts, greedy_ids(lm, prompts, [want[p] for p in prompts]), strict=True))
    eos = tok.eos_id
    out = []
    for k, qs in enumerate(per_req):
        scores = {}
        for key, prompt, answers in qs:
            new = ids[prompt][: n_of[(key, k)]]
            text = tok.decode(new[: new.index(eos)] if eos is not None and eos in new else new)
            scores[key] = GenScore(text, metrics.generated_match(text, answers))
        out.append(scores)
    return out


def gen_case_metrics(
    r: EditRequest, post: GenScores, pre: GenScores | None = None
) -> dict[str, float]:
    """The `*_gen` metrics of one request from its continuations after the edit (`pre`: the
    unedited model's, for `locality_gen`)."""
    mean = lambda xs: float(np.mean(xs))
    hits = lambda name, n: [post[(name, i)].match for i in range(n)]
    m = {"efficacy_gen": float(post[("rw", 0)].match)}
    if r.paraphrase_prompts:
        m["paraphrase_gen"] = mean(hits("pp", len(r.paraphrase_prompts)))
    if r.neighborhood:
        nb = range(len(r.neighborhood))
        m["specificity_gen"] = mean(hits("nb", len(r.neighborhood)))
        cf = [i for i, p in enumerate(r.neighborhood) if counterfact_neighbour(r, p)]
        if cf:
            m["neighborhood_gen"] = mean([post[("nb", i)].match for i in cf])
        if pre is not None:
            same = [
                metrics.normalize_answer(post[("nb", i)].text)
                == metrics.normalize_answer(pre[("nb", i)].text)
                for i in nb
            ]
            m["locality_gen"] = mean(same)
    if r.portability:
        m["portability_gen"] = mean(hits("port", len(r.portability)))
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for i, p in enumerate(r.portability):
            by_kind[p.kind or "portability"].append(post[("port", i)].match)
        m |= {f"portability/{kind}_gen": mean(v) for kind, v in by_kind.items()}
    if r.reverse:
        m["reverse_gen"] = mean(hits("rev", len(r.reverse)))
    return m
