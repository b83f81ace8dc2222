"""zsRE in MEND's / ROME's form (`subject, src, rephrase, alt, answers, loc, loc_ans[,
portability]`): target_new = alt, target_true = answers[0]; the neighbour prompt is loc + "?"
(as ROME); a portability "New Question" / "New Answer" becomes a probe of kind `one_hop`."""

from __future__ import annotations

from jaxedit.eval.datasets.records import BadRecord, aliases, request, template, text
from jaxedit.requests import EditRequest, Probe


def from_record(rec: dict, i: int) -> list[EditRequest]:
    subject = text(rec, "subject")
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise BadRecord("field 'answers' must be a non-empty list of strings")
    neigh = ()
    if rec.get("loc"):
        neigh = (Probe(text(rec, "loc") + "?", (text(rec, "loc_ans"),), "nq"),)
    port = ()
    if isinstance(rec.get("portability"), dict):
        pq = rec["portability"]
        if pq.get("New Question") and pq.get("New Answer"):
            port = (Probe(pq["New Question"], aliases(pq["New Answer"]), "one_hop"),)
    return [
        request(
            rec.get("case_id", i),
            prompt=template(text(rec, "src"), subject),
            subject=subject,
            target_new=text(rec, "alt"),
            target_true=answers[0],
            paraphrase_prompts=(text(rec, "rephrase"),) if rec.get("rephrase") else (),
            neighborhood=neigh,
            portability=port,
        )
    ]
