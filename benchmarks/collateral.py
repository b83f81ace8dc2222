"""Where the collateral damage of many edits lands, on the models that sequential runs left in
their last checkpoint (`runs/many/<name>/lifelong/round-*/`).

Perplexity is one number; this splits it. For the general block's text (the shipped WikiText-2
slice, its 2,048 tokens in 256-token windows, as `general.perplexity`) it takes the increase in
each token's NLL, edited − unedited, and reports how concentrated the increase is (the share
of the total carried by the top 1 / 5 / 10 % of tokens), the share carried by tokens that follow
a capitalised word (the position whose key the MLP reads is then inside a name: where an edit's
subject keys live) and by tokens that follow the last token of an edited subject (at early
layers a key is mostly its own token), each against those tokens' share of the text, and the
largest increases with their context. For the known facts (the 200 records the unedited model
completes greedily, `general.cached_known_to`, as `jaxedit eval` picks them) it reports how
many the edited model no longer completes, and what it predicts first instead: the new object
of an edit of the same relation (prompt template), a function word, or something else (mostly
another entity); and, by how firmly the unedited model knew each fact (the probability of the
answer's first token, in bands), the share lost and the geometric-mean change of that
probability.

    uv run python benchmarks/collateral.py alphaedit-mpes-wiki-ns1e-2-2000 \\
        [--data ../shared/data/counterfact/counterfact-edit.json --n 2960] [--top 20] \\
        [--out benchmarks/results/many_edits_2000.json]

`--n` must be the run's (the candidates exclude the records it read). Writes the key
`collateral` (one entry per run, merged) into the output file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import run_checkpoints
from machine import machine

import jaxedit as je
from jaxedit.eval import general, scoring
from jaxedit.eval.generation import greedy_ids
from jaxedit.methods.mend.checkpoint import write_json_atomic

OUT = Path(__file__).parent / "results" / "many_edits_2000.json"
BANDS = ((0.0, 0.2), (0.2, 0.35), (0.35, 0.5), (0.5, 0.7), (0.7, 1.01))
FUNCTION_WORDS = {"the", "a", "an", "of", "in", "to", "and", "is", "that", "it", "this", "its"}


def capitalised(tok, ids: list[int]) -> list[bool]:
    """Per token: does it belong to a word that starts with a capital letter?"""
    out, cap = [], False
    for p in (tok.decode([i]) for i in ids):
        if p[:1].isspace() or not out:  # a token that starts a word
            cap = p.strip()[:1].isupper()
        out.append(cap)
    return out


def predicted_positions(n: int, window: int) -> list[int]:
    """Where in the n ids each token `general.token_nll` scores sits, in its order (every
    window's tokens but the first)."""
    return [k for s in range(0, n, window) for k in range(s + 1, min(s + window, n))]


def subject_last_tokens(tok, subjects) -> set[int]:
    """The last token of each subject, as it reads mid-sentence and at the start of a prompt."""
    return {tok.encode_continuation(t)[-1] for s in subjects for t in (" " + s, s)}


def text_damage(
    edited, ids: list[int], nll0: np.ndarray, window: int, top: int, subject_ends: set[int]
) -> dict:
    """`ids`: the text's tokens; `nll0`: the unedited model's `general.token_nll` of them."""
    tok = edited.tokenizer
    delta = general.token_nll(edited, ids, window=window) - nll0
    pos = predicted_positions(len(ids), window)
    # the flag of the token before each scored one: the position whose MLP key predicts it
    caps_of = capitalised(tok, ids)
    caps = np.array([caps_of[k - 1] for k in pos])
    ends = np.array([ids[k - 1] in subject_ends for k in pos])
    total = delta.sum()
    ranked = np.sort(delta)[::-1]
    largest = [
        {
            "dnll": round(float(delta[i]), 3),
            "context": tok.decode(ids[max(0, pos[i] - 8) : pos[i]]),
            "token": tok.decode([ids[pos[i]]]),
        }
        for i in np.argsort(-delta)[:top]
    ]
    return {
        "tokens": int(delta.size),
        "ppl_ratio": float(np.exp(delta.mean())),
        "share_of_increase_in_top": {
            f"{q:.0%}": float(ranked[: max(1, int(q * delta.size))].sum() / total)
            for q in (0.01, 0.05, 0.10)
        },
        # tokens whose key position is X: their share of the text, their share of the increase
        "after": {
            name: {"tokens": float(f.mean()), "share_of_increase": float(delta[f].sum() / total)}
            for name, f in (("capitalised_word", caps), ("edited_subject_last_token", ends))
        },
        "largest": largest,
    }


def fact_damage(
    edited, facts, before: scoring.TargetScores, template_of: dict[str, str], new_objects: dict
) -> dict:
    """`before`: the unedited model's scores of the facts; `template_of`: fact prompt -> its
    record's prompt template (the relation, as CounterFact words it); `new_objects`: template
    -> the new objects the run's edits of it wrote."""
    prompts, answers = [p for p, _ in facts], [a for _, a in facts]
    after = scoring.score_targets(edited, prompts, answers)
    acc = after.token_acc
    # how firmly the unedited model knew each fact: p of the answer's first token
    p0 = np.exp([lp[0] for lp in before.logprobs])
    p1 = np.exp([lp[0] for lp in after.logprobs])
    bands = []
    for lo, hi in BANDS:
        m = (p0 >= lo) & (p0 < hi)
        if m.any():
            bands.append(
                {
                    "p_unedited": [lo, min(hi, 1.0)],
                    "facts": int(m.sum()),
                    "lost": float((acc[m] < 1).mean()),
                    "p_ratio_geomean": float(np.exp(np.mean(np.log(p1[m] / p0[m])))),
                }
            )
    firsts = [
        edited.tokenizer.decode(g).strip() for g in greedy_ids(edited, prompts, [1] * len(facts))
    ]
    lost = [(f, w) for f, a, w in zip(facts, acc, firsts, strict=True) if a < 1]
    is_new = [
        w
        for (p, _), w in lost
        if w and any(o.startswith(w) for o in new_objects.get(template_of.get(p), ()))
    ]
    is_function = [w for _, w in lost if w.lower() in FUNCTION_WORDS]
    return {
        "facts": len(facts),
        "accuracy": float(acc.mean()),
        "no_longer_completed": len(lost),
        "first_token_a_new_object_of_the_relation": len(is_new),
        "first_token_a_function_word": len(is_function),
        "p_first_token_unedited_median": float(np.median(p0)),
        "p_ratio_geomean": float(np.exp(np.mean(np.log(p1 / p0)))),
        "by_confidence": bands,
        "examples": [{"prompt": p, "answer": a, "now": w} for (p, a), w in lost[:12]],
    }


def main() -> None:
    ap = run_checkpoints.arguments(__doc__.splitlines()[0], OUT)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    lm = je.load("smollm2-135m")
    every, facts, _ = run_checkpoints.known_facts(lm, args.data, args.n)
    by_id = {r.case_id: r for r in every}
    template_of = {r.prompt.format(r.subject): r.prompt for r in every}
    # the unedited model's side, once for every run
    ids = lm.tokenizer.encode_continuation(general.default_text())[: general.PPL_TOKENS]
    nll0 = general.token_nll(lm, ids, window=general.PPL_WINDOW)
    before = scoring.score_targets(lm, [p for p, _ in facts], [a for _, a in facts])
    result = {"machine": machine(), "runs": {}}
    for name in args.runs:
        edited, case_ids = run_checkpoints.last_edited(lm, name)
        new_objects: dict[str, set[str]] = {}
        for i in case_ids:
            new_objects.setdefault(by_id[i].prompt, set()).add(by_id[i].target_new.strip())
        entry = {
            "edits": len(case_ids),
            "text": text_damage(
                edited,
                ids,
                nll0,
                general.PPL_WINDOW,
                args.top,
                subject_last_tokens(lm.tokenizer, (by_id[i].subject for i in case_ids)),
            ),
            "known_facts": fact_damage(edited, facts, before, template_of, new_objects),
        }
        result["runs"][name] = entry
        t, k = entry["text"], entry["known_facts"]
        a = t["after"]
        print(
            f"{name}: {len(case_ids)} edits; ppl ×{t['ppl_ratio']:.3f}, top 1 % of tokens carry "
            f"{t['share_of_increase_in_top']['1%']:.2f} of the increase, tokens after a "
            f"capitalised word ({a['capitalised_word']['tokens']:.2f} of the text) "
            f"{a['capitalised_word']['share_of_increase']:.2f}, after an edited subject's last "
            f"token ({a['edited_subject_last_token']['tokens']:.2f}) "
            f"{a['edited_subject_last_token']['share_of_increase']:.2f}; "
            f"known facts {k['accuracy']:.3f}, "
            f"{k['no_longer_completed']} lost (now: a new object of the relation "
            f"{k['first_token_a_new_object_of_the_relation']}, a function word "
            f"{k['first_token_a_function_word']}), answer p ×{k['p_ratio_geomean']:.2f}",
            flush=True,
        )
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out.setdefault("collateral", {"runs": {}})
    out["collateral"]["machine"] = result["machine"]
    out["collateral"]["runs"].update(result["runs"])
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
