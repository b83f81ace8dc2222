"""Field readers every loader shares: a bad record raises `BadRecord` with what is wrong, and
`jaxedit.eval.datasets.load` names the file and the record index."""

from __future__ import annotations

from typing import Any

from jaxedit.errors import InputError
from jaxedit.requests import EditRequest, Probe


class BadRecord(Exception):
    """A record-level problem; turned into InputError with the file and index."""


def text(rec: dict, key: str) -> str:
    """The non-empty string field `key`."""
    if key not in rec:
        raise BadRecord(f"missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise BadRecord(f"field {key!r} must be a non-empty string, got {v!r:.60}")
    return v


def template(prompt: str, subject: str) -> str:
    """A prompt with the subject's first occurrence replaced by "{}" (other braces escaped)."""
    if "{}" in prompt and subject not in prompt:
        return prompt  # already a template (ROME / MQuAKE form)
    at = prompt.find(subject)
    if at < 0:
        raise BadRecord(f"subject {subject!r} not found in prompt {prompt!r}")
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")
    return esc(prompt[:at]) + "{}" + esc(prompt[at + len(subject) :])


def aliases(gt: Any) -> tuple[str, ...]:
    """A ground truth that may be a string, a list of aliases or a list of alias lists."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, str):
            if x.strip() and x not in out:
                out.append(x)
        elif isinstance(x, list):
            for y in x:
                walk(y)
        elif x is not None:
            raise BadRecord(f"ground truth must be strings or lists, got {type(x).__name__}")

    walk(gt)
    return tuple(out)


def probes(section: Any, kind: str) -> tuple[Probe, ...]:
    """Probes from a KnowEdit-style section: entries {prompt, ground_truth}, either scalars or
    parallel lists."""
    if not isinstance(section, list):
        section = [section]
    out = []
    for e in section:
        if not isinstance(e, dict) or "prompt" not in e or "ground_truth" not in e:
            raise BadRecord(f"{kind}: entries need 'prompt' and 'ground_truth'")
        prompts = e["prompt"] if isinstance(e["prompt"], list) else [e["prompt"]]
        gts = e["ground_truth"] if isinstance(e["prompt"], list) else [e["ground_truth"]]
        for p, gt in zip(prompts, gts, strict=False):
            answers = aliases(gt)
            if isinstance(p, str) and p.strip() and answers:
                out.append(Probe(p, answers, kind))
    return tuple(out)


def strings(rec: dict, key: str) -> tuple[str, ...]:
    """The non-empty strings of the list field `key` (absent: none)."""
    return tuple(p for p in rec.get(key, []) if isinstance(p, str) and p.strip())


def request(case_id: Any, **kw: Any) -> EditRequest:
    """An EditRequest, its validation errors reported as a bad record."""
    try:
        return EditRequest(case_id=case_id, **kw)
    except InputError as e:
        raise BadRecord(str(e)) from e
