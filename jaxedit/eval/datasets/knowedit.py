"""KnowEdit (`ZsRE-test-all.json`, `*_cf.json`): locality kinds Relation_Specificity /
Forgetfulness; portability kinds Reasoning / Subject_Aliasing / Logical_Generalization; nested
ground-truth lists are aliases of one answer; a reverse probe where the prompt's relation has
one (`jaxedit.eval.reverse.question_reverse`)."""

from __future__ import annotations

from jaxedit.eval.datasets.records import BadRecord, aliases, probes, request, template, text
from jaxedit.eval.reverse import question_reverse
from jaxedit.requests import EditRequest


def from_record(rec: dict, i: int) -> list[EditRequest]:
    subject = text(rec, "subject")
    true = aliases(rec.get("ground_truth"))
    rephrase = rec.get("rephrase_prompt") or rec.get("rephrase")
    loc = rec.get("locality") or {}
    port = rec.get("portability") or {}
    if not isinstance(loc, dict) or not isinstance(port, dict):
        raise BadRecord("'locality' and 'portability' must be objects")
    prompt, new = template(text(rec, "prompt"), subject), text(rec, "target_new")
    return [
        request(
            rec.get("case_id", i),
            prompt=prompt,
            subject=subject,
            target_new=new,
            target_true=true[0] if true else None,
            paraphrase_prompts=(rephrase,) if isinstance(rephrase, str) and rephrase else (),
            neighborhood=tuple(p for k, v in loc.items() for p in probes(v, k)),
            portability=tuple(p for k, v in port.items() for p in probes(v, k)),
            reverse=question_reverse(prompt, subject, new),
        )
    ]
