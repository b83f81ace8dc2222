"""Loaders: every knowledge-editing data format into `jaxedit.requests.EditRequest`.

`load(path, format="auto", n=None, offset=0, skip_bad=False) -> Dataset`. Formats:

- `counterfact`: EasyEdit CounterFact (`case_id, prompt, subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth`). Paraphrase = rephrase_prompt;
  neighbourhood = locality_prompt with answer locality_ground_truth.
- `counterfact_rome`: original ROME CounterFact (`requested_rewrite{prompt, subject,
  target_new{str}, target_true{str}}, paraphrase_prompts, neighborhood_prompts,
  generation_prompts`). Neighbourhood answers = target_true (ROME's construction).
- `zsre`: MEND/ROME zsRE (`subject, src, rephrase, alt, answers, loc, loc_ans[,
  portability]`). target_new = alt, target_true = answers[0]; neighbour prompt = loc + "?"
  (as ROME); portability "New Question" / "New Answer" -> probe kind `one_hop`.
- `knowedit`: KnowEdit `ZsRE-test-all.json` and `*_cf.json`. Locality kinds
  Relation_Specificity / Forgetfulness; portability kinds Reasoning / Subject_Aliasing /
  Logical_Generalization; nested ground-truth lists are aliases of one answer.
- `mquake`: MQuAKE (`requested_rewrite[...]`, `questions`, `new_answer(+_alias)`). One request
  per rewrite, grouped by case (`extra["group"]`, edited together); the multi-hop questions are
  portability probes (kind `multi_hop`) of the group's last request.

Prompts contain the subject literally in most formats; it is replaced by "{}" at its first
occurrence. A malformed record raises `InputError` naming the file and record index, unless
`skip_bad=True`, which skips and counts it (`Dataset.n_bad`). Nothing here knows where data
lives: pass any path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxedit.errors import InputError
from jaxedit.requests import EditRequest, Probe

FORMATS = ("counterfact", "counterfact_rome", "zsre", "knowedit", "mquake")


@dataclass(frozen=True)
class Dataset:
    requests: list[EditRequest]
    format: str
    path: str
    n_bad: int = 0  # records skipped with skip_bad
    n_records: int = 0  # records read (before --n / --offset)
    bad: list[str] = field(default_factory=list)  # first few skip reasons

    def __len__(self) -> int:
        return len(self.requests)


class _Bad(Exception):
    """A record-level problem; turned into InputError with the file and index."""


def _str(rec: dict, key: str) -> str:
    if key not in rec:
        raise _Bad(f"missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"field {key!r} must be a non-empty string, got {v!r:.60}")
    return v


def _template(prompt: str, subject: str) -> str:
    """A prompt with the subject's first occurrence replaced by "{}" (other braces escaped)."""
    if "{}" in prompt and subject not in prompt:
        return prompt  # already a template (ROME / MQuAKE form)
    at = prompt.find(subject)
    if at < 0:
        raise _Bad(f"subject {subject!r} not found in prompt {prompt!r}")
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")
    return esc(prompt[:at]) + "{}" + esc(prompt[at + len(subject) :])


def _aliases(gt: Any) -> tuple[str, ...]:
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
            raise _Bad(f"ground truth must be strings or lists, got {type(x).__name__}")

    walk(gt)
    return tuple(out)


def _probes(section: Any, kind: str) -> tuple[Probe, ...]:
    if not isinstance(section, list):
        section = [section]
    probes = []
    for e in section:
        if not isinstance(e, dict) or "prompt" not in e or "ground_truth" not in e:
            raise _Bad(f"{kind}: entries need 'prompt' and 'ground_truth'")
        prompts = e["prompt"] if isinstance(e["prompt"], list) else [e["prompt"]]
        gts = e["ground_truth"] if isinstance(e["prompt"], list) else [e["ground_truth"]]
        for p, gt in zip(prompts, gts, strict=False):
            answers = _aliases(gt)
            if isinstance(p, str) and p.strip() and answers:
                probes.append(Probe(p, answers, kind))
    return tuple(probes)


def _make(rec_id, **kw) -> EditRequest:
    try:
        return EditRequest(case_id=rec_id, **kw)
    except InputError as e:
        raise _Bad(str(e)) from e


# ----------------------------------------------------------------------------- converters


def _counterfact(rec: dict, i: int) -> list[EditRequest]:
    subject = _str(rec, "subject")
    true = _str(rec, "ground_truth")
    neigh = ()
    if rec.get("locality_prompt"):
        neigh = (
            Probe(
                _str(rec, "locality_prompt"),
                (rec.get("locality_ground_truth") or true,),
                "neighborhood",
            ),
        )
    return [
        _make(
            rec.get("case_id", i),
            prompt=_template(_str(rec, "prompt"), subject),
            subject=subject,
            target_new=_str(rec, "target_new"),
            target_true=true,
            paraphrase_prompts=(_str(rec, "rephrase_prompt"),)
            if rec.get("rephrase_prompt")
            else (),
            neighborhood=neigh,
        )
    ]


def _counterfact_rome(rec: dict, i: int) -> list[EditRequest]:
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise _Bad("missing 'requested_rewrite' object")
    return [_rome_rewrite(rw, rec.get("case_id", i), rec)]


def _rome_rewrite(rw: dict, case_id, rec: dict) -> EditRequest:
    subject = _str(rw, "subject")
    try:
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    except (KeyError, TypeError) as e:
        raise _Bad("requested_rewrite needs target_new.str and target_true.str") from e
    strs = lambda k: tuple(p for p in rec.get(k, []) if isinstance(p, str) and p.strip())
    return _make(
        case_id,
        prompt=_template(_str(rw, "prompt"), subject),
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=strs("paraphrase_prompts"),
        neighborhood=tuple(Probe(p, (true,), "neighborhood") for p in strs("neighborhood_prompts")),
        generation_prompts=strs("generation_prompts"),
        extra=_rome_extra(rw, rec),
    )


def _rome_extra(rw: dict, rec: dict) -> dict:
    keys = ("relation_id", "pararel_idx")
    extra = {k: rw.get(k, rec.get(k)) for k in keys if k in rw or k in rec}
    if "attribute_prompts" in rec:
        extra["attribute_prompts"] = list(rec["attribute_prompts"])
    return extra


def _zsre(rec: dict, i: int) -> list[EditRequest]:
    subject = _str(rec, "subject")
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
        raise _Bad("field 'answers' must be a non-empty list of strings")
    neigh = ()
    if rec.get("loc"):
        neigh = (Probe(_str(rec, "loc") + "?", (_str(rec, "loc_ans"),), "nq"),)
    port = ()
    if isinstance(rec.get("portability"), dict):
        pq = rec["portability"]
        if pq.get("New Question") and pq.get("New Answer"):
            port = (Probe(pq["New Question"], _aliases(pq["New Answer"]), "one_hop"),)
    return [
        _make(
            rec.get("case_id", i),
            prompt=_template(_str(rec, "src"), subject),
            subject=subject,
            target_new=_str(rec, "alt"),
            target_true=answers[0],
            paraphrase_prompts=(_str(rec, "rephrase"),) if rec.get("rephrase") else (),
            neighborhood=neigh,
            portability=port,
        )
    ]


def _knowedit(rec: dict, i: int) -> list[EditRequest]:
    subject = _str(rec, "subject")
    true = _aliases(rec.get("ground_truth"))
    rephrase = rec.get("rephrase_prompt") or rec.get("rephrase")
    loc = rec.get("locality") or {}
    port = rec.get("portability") or {}
    if not isinstance(loc, dict) or not isinstance(port, dict):
        raise _Bad("'locality' and 'portability' must be objects")
    return [
        _make(
            rec.get("case_id", i),
            prompt=_template(_str(rec, "prompt"), subject),
            subject=subject,
            target_new=_str(rec, "target_new"),
            target_true=true[0] if true else None,
            paraphrase_prompts=(rephrase,) if isinstance(rephrase, str) and rephrase else (),
            neighborhood=tuple(p for k, v in loc.items() for p in _probes(v, k)),
            portability=tuple(p for k, v in port.items() for p in _probes(v, k)),
        )
    ]


def _mquake(rec: dict, i: int) -> list[EditRequest]:
    rws = rec.get("requested_rewrite")
    if not isinstance(rws, list) or not rws:
        raise _Bad("'requested_rewrite' must be a non-empty list")
    case_id = rec.get("case_id", i)
    answers = _aliases([rec.get("new_answer"), rec.get("new_answer_alias") or []])
    questions = [q for q in rec.get("questions", []) if isinstance(q, str) and q.strip()]
    if not answers or not questions:
        raise _Bad("MQuAKE record needs 'questions' and 'new_answer'")
    out = []
    for j, rw in enumerate(rws):
        r = _rome_rewrite(rw, f"{case_id}.{j}", {})
        last = j == len(rws) - 1
        out.append(
            EditRequest(
                prompt=r.prompt,
                subject=r.subject,
                target_new=r.target_new,
                target_true=r.target_true,
                case_id=r.case_id,
                paraphrase_prompts=(rw["question"],) if rw.get("question") else (),
                portability=tuple(Probe(q, answers, "multi_hop") for q in questions)
                if last
                else (),
                extra={"group": case_id, "relation_id": rw.get("relation_id")},
            )
        )
    return out


_CONVERTERS: dict[str, Callable[[dict, int], list[EditRequest]]] = {
    "counterfact": _counterfact,
    "counterfact_rome": _counterfact_rome,
    "zsre": _zsre,
    "knowedit": _knowedit,
    "mquake": _mquake,
}


def detect_format(record: dict) -> str:
    """Guess the format from the first record's keys."""
    if not isinstance(record, dict):
        raise InputError("records must be JSON objects")
    keys = set(record)
    if "requested_rewrite" in keys:
        rw = record["requested_rewrite"]
        return "mquake" if isinstance(rw, list) else "counterfact_rome"
    if {"src", "alt", "answers"} <= keys:
        return "zsre"
    if "locality_prompt" in keys or ("rephrase_prompt" in keys and "locality" not in keys):
        return "counterfact"
    if "locality" in keys or "portability" in keys:
        return "knowedit"
    if "known_id" in keys:
        raise InputError(
            "this looks like ROME's known_1000.json (facts without a new target): it is a "
            "causal-tracing set, not an editing data set"
        )
    raise InputError(f"cannot tell the data format from the record keys {sorted(keys)}")


def read_records(path: str | Path) -> list:
    """A JSON list (or JSON-lines) file of records."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            data = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError:
            raise InputError(f"{p}: not JSON: {e}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise InputError(f"{p}: expected a list of records, got {type(data).__name__}")
    if not data:
        raise InputError(f"{p}: empty data set")
    return data


def load(
    path: str | Path,
    *,
    format: str = "auto",
    n: int | None = None,
    offset: int = 0,
    skip_bad: bool = False,
) -> Dataset:
    """Load records `offset .. offset + n` of `path` as EditRequests.

    `n` counts records (an MQuAKE record gives several grouped requests).
    """
    if n is not None and n <= 0:
        raise InputError(f"--n must be positive, got {n}")
    if offset < 0:
        raise InputError(f"--offset must be >= 0, got {offset}")
    records = read_records(path)
    if format == "auto":
        format = detect_format(records[0])
    if format not in _CONVERTERS:
        raise InputError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")
    conv = _CONVERTERS[format]
    chosen = records[offset : None if n is None else offset + n]
    if not chosen:
        raise InputError(f"{path}: no records at offset {offset} (file has {len(records)})")
    requests, bad = [], []
    for i, rec in enumerate(chosen, start=offset):
        try:
            if not isinstance(rec, dict):
                raise _Bad(f"expected an object, got {type(rec).__name__}")
            requests.extend(conv(rec, i))
        except _Bad as e:
            if not skip_bad:
                raise InputError(f"{path}: record {i}: {e} (use --skip-bad to skip)") from None
            bad.append(f"record {i}: {e}")
    if not requests:
        raise InputError(f"{path}: no usable records ({len(bad)} malformed)")
    return Dataset(requests, format, str(path), len(bad), len(records), bad[:10])


def group_cases(requests: list[EditRequest]) -> list[list[EditRequest]]:
    """Requests edited together: MQuAKE's rewrites of one case share `extra["group"]`."""
    groups: dict[Any, list[EditRequest]] = {}
    order = []
    for k, r in enumerate(requests):
        g = r.extra.get("group", ("__single__", k))
        if g not in groups:
            groups[g] = []
            order.append(g)
        groups[g].append(r)
    return [groups[g] for g in order]
