"""zsRE in MEND's / ROME's form (`subject, src, rephrase, alt, answers, loc, loc_ans[,
portability]`): target_new = alt, target_true = answers[0]; the neighbour prompt is loc + "?"
(as ROME); a portability "New Question" / "New Answer" becomes a probe of kind `one_hop`; a
reverse probe where the question's relation has one (`jaxedit.eval.reverse.question_reverse`)."""

from __future__ import annotations

from jaxedit.eval.datasets.records import BadRecord, aliases, request, template, text
from jaxedit.eval.reverse import question_reverse
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
    prompt, new = template(text(rec, "src"), subject), text(rec, "alt")
    return [
        request(
            rec.get("case_id", i),
            prompt=prompt,
            subject=subject,
            target_new=new,
            target_true=answers[0],
            paraphrase_prompts=(text(rec, "rephrase"),) if rec.get("rephrase") else (),
            neighborhood=neigh,
            portability=port,
            reverse=question_reverse(prompt, subject, new),
        )
    ]
