"""MQuAKE (`requested_rewrite[...]`, `questions`, `new_answer(+_alias)`): one request per
rewrite, grouped by case (`extra["group"]`: edited together); the multi-hop questions are
portability probes (kind `multi_hop`) of the group's last request."""

from __future__ import annotations

from dataclasses import replace

from jaxedit.eval.datasets.counterfact import rome_rewrite
from jaxedit.eval.datasets.records import BadRecord, aliases
from jaxedit.requests import EditRequest, Probe


def from_record(rec: dict, i: int) -> list[EditRequest]:
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise BadRecord("'requested_rewrite' must be a non-empty list")
    case_id = rec.get("case_id", i)
    answers = aliases([rec.get("new_answer"), rec.get("new_answer_alias") or []])
    questions = [q for q in rec.get("questions", []) if isinstance(q, str) and q.strip()]
    if not answers or not questions:
        raise BadRecord("MQuAKE record needs 'questions' and 'new_answer'")
    out = []
    for j, rw in enumerate(rws):
        r = rome_rewrite(rw, f"{case_id}.{j}", {})
        last = j == len(rws) - 1
        out.append(
            replace(
                r,
                paraphrase_prompts=(rw["question"],) if rw.get("question") else (),
                portability=tuple(Probe(q, answers, "multi_hop") for q in questions)
                if last
                else (),
                extra={**r.extra, "group": case_id},
            )
        )
    return out
