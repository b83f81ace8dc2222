"""CounterFact, in EasyEdit's flat form and in ROME's original form.

- EasyEdit (`counterfact-edit.json`: `case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth`). Paraphrase = rephrase_prompt;
  neighbourhood = locality_prompt with answer locality_ground_truth.
- ROME (`requested_rewrite{prompt, subject, relation_id, target_new{str, id},
  target_true{str, id}}, paraphrase_prompts, neighborhood_prompts, generation_prompts`).
  Neighbourhood answers = target_true (ROME's construction). `extra` keeps relation_id and the
  Wikidata ids of both targets: they select the case's attribute snippets (consistency).

Both forms get a reverse probe where the relation has one (`jaxedit.eval.reverse`: by the
record's relation_id, else by the prompt's ParaRel template): "{target_new} is the capital of"
answered by the subject.
"""

from __future__ import annotations

from typing import Any

from jaxedit.eval.datasets.records import BadRecord, request, strings, template, text
from jaxedit.eval.reverse import counterfact_reverse
from jaxedit.requests import EditRequest, Probe


def from_easyedit(rec: dict, i: int) -> list[EditRequest]:
    subject = text(rec, "subject")
    true = text(rec, "ground_truth")
    prompt = template(text(rec, "prompt"), subject)
    new = text(rec, "target_new")
    neigh = ()
    if rec.get("locality_prompt"):
        answer = rec.get("locality_ground_truth") or true
        neigh = (Probe(text(rec, "locality_prompt"), (answer,), "neighborhood"),)
    return [
        request(
            rec.get("case_id", i),
            prompt=prompt,
            subject=subject,
            target_new=new,
            target_true=true,
            paraphrase_prompts=(text(rec, "rephrase_prompt"),)
            if rec.get("rephrase_prompt")
            else (),
            neighborhood=neigh,
            reverse=counterfact_reverse(prompt, subject, new),
        )
    ]


def from_rome(rec: dict, i: int) -> list[EditRequest]:
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise BadRecord("missing 'requested_rewrite' object")
    return [rome_rewrite(rw, rec.get("case_id", i), rec)]


def rome_rewrite(rw: dict, case_id: Any, rec: dict) -> EditRequest:
    """One ROME-form `requested_rewrite` (CounterFact, MQuAKE) with the record's prompt lists."""
    subject = text(rw, "subject")
    try:
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    except (KeyError, TypeError) as e:
        raise BadRecord("requested_rewrite needs target_new.str and target_true.str") from e
    prompt = template(text(rw, "prompt"), subject)
    return request(
        case_id,
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=strings(rec, "paraphrase_prompts"),
        neighborhood=tuple(
            Probe(p, (true,), "neighborhood") for p in strings(rec, "neighborhood_prompts")
        ),
        generation_prompts=strings(rec, "generation_prompts"),
        reverse=counterfact_reverse(prompt, subject, new, rw.get("relation_id")),
        extra=rome_ids(rw, rec),
    )


def rome_ids(rw: dict, rec: dict) -> dict:
    """relation_id, pararel_idx and the targets' Wikidata ids, where the record has them."""
    keys = ("relation_id", "pararel_idx")
    extra = {k: rw.get(k, rec.get(k)) for k in keys if k in rw or k in rec}
    for side in ("target_new", "target_true"):
        if isinstance(rw.get(side), dict) and rw[side].get("id"):
            extra[f"{side}_id"] = rw[side]["id"]
    if "attribute_prompts" in rec:
        extra["attribute_prompts"] = list(rec["attribute_prompts"])
    return extra
