"""KnowEdit (`ZsRE-test-all.json`, `*_cf.json`): locality kinds Relation_Specificity /
Forgetfulness; portability kinds Reasoning / Subject_Aliasing / Logical_Generalization; nested
ground-truth lists are aliases of one answer."""

from __future__ import annotations

from jaxedit.eval.datasets.records import BadRecord, aliases, probes, request, template, text
from jaxedit.requests import EditRequest


def from_record(rec: dict, i: int) -> list[EditRequest]:
    subject = text(rec, "subject")
    true = aliases(rec.get("ground_truth"))
    rephrase = rec.get("rephrase_prompt") or rec.get("rephrase")
    loc = rec.get("locality") or {}
    port = rec.get("portability") or {}
    if not isinstance(loc, dict) or not isinstance(port, dict):
        raise BadRecord("'locality' and 'portability' must be objects")
    return [
        request(
            rec.get("case_id", i),
            prompt=template(text(rec, "prompt"), subject),
            subject=subject,
            target_new=text(rec, "target_new"),
            target_true=true[0] if true else None,
            paraphrase_prompts=(rephrase,) if isinstance(rephrase, str) and rephrase else (),
            neighborhood=tuple(p for k, v in loc.items() for p in probes(v, k)),
            portability=tuple(p for k, v in port.items() for p in probes(v, k)),
        )
    ]
