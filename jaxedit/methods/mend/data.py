"""MEND's training data: edit cases (CounterFact, zsRE or KnowEdit), tokenised, and the batch
order.

A case is an edit (prompt -> target), an equivalent input (rephrase) and an unrelated locality
input with its answer, and the task it belongs to. Each is encoded as prompt + answer with the
answer tokens flagged, right-padded to `max_len`; with `Instructions` (InstructEdit) the edit
and rephrase prompts, and optionally the locality prompt, are written into the case's task
template first. The batch of a step is a pure function of (seed, step), so a resumed run sees
the same data: one task's permutation per epoch (`batch_indices`), or with several tasks a
task-balanced order (`balanced_indices`: the edits of a step go to the tasks in turn).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxedit.errors import InputError
from jaxedit.eval.datasets.records import BadRecord, aliases
from jaxedit.io.text import read_text
from jaxedit.methods.mend.inputs import encode_pair, pad_pairs
from jaxedit.methods.mend.instructions import TASK_OF_FORMAT, Instructions, instruct

FORMATS = ("counterfact", "zsre", "knowedit")


@dataclass(frozen=True)
class Case:
    """One training edit: rewrite, an equivalent input, an unrelated (locality) input."""

    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str
    task: str = ""


def detect(record: object) -> str:
    """The training format of a record from its keys."""
    if isinstance(record, dict) and "src" in record and "alt" in record:
        return "zsre"
    if isinstance(record, dict) and isinstance(record.get("locality"), dict):
        return "knowedit"
    return "counterfact"


def _knowedit(r: dict) -> Case:
    """KnowEdit (prompt, target_new, [rephrase], locality{kind: [{prompt, ground_truth}]}): the
    first Relation_Specificity probe (else the first of any kind) is the locality input; a
    record without a rephrase (train_cf.json) uses its prompt, as the reference's test does."""
    loc = r["locality"]
    kinds = sorted(loc, key=lambda k: k != "Relation_Specificity")
    probes = [p for k in kinds for p in (loc[k] if isinstance(loc[k], list) else [loc[k]])]
    if not probes:
        raise KeyError("locality")
    answers = aliases(probes[0]["ground_truth"])
    rephrase = r.get("rephrase_prompt") or r.get("rephrase") or r["prompt"]
    return Case(
        r["prompt"], r["target_new"], rephrase, probes[0]["prompt"], answers[0] if answers else ""
    )


def load_cases(
    path: str | os.PathLike, fmt: str = "auto", limit: int | None = None, task: str | None = None
) -> list[Case]:
    """CounterFact (EasyEdit: prompt, target_new, rephrase_prompt, locality_prompt, ...), zsRE
    (MEND: src, alt, rephrase, loc, loc_ans) or KnowEdit (`_knowedit`) records; each case's task
    is `task`, else the one its format names (`TASK_OF_FORMAT`)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"training data {p} not found")
    try:
        records = json.loads(read_text(p, "training data"))
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(records, list) or not records:
        raise InputError(f"{p}: empty training set (expected a non-empty JSON list)")
    if fmt == "auto":
        fmt = detect(records[0])
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} ({' | '.join(FORMATS)} | auto)")
    task = task or TASK_OF_FORMAT[fmt]
    cases = []
    for r in records[:limit]:
        try:
            if fmt == "counterfact":
                c = Case(
                    r["prompt"],
                    r["target_new"],
                    r["rephrase_prompt"],
                    r["locality_prompt"],
                    r["locality_ground_truth"],
                )
            elif fmt == "zsre":
                c = Case(r["src"], r["alt"], r["rephrase"], r["loc"], r["loc_ans"])
            else:
                c = _knowedit(r)
        except (KeyError, TypeError, IndexError, BadRecord) as e:
            raise InputError(f"{p}: a record lacks field {e} for format {fmt!r}") from e
        fields = (c.prompt, c.target, c.rephrase, c.loc_prompt, c.loc_answer)
        if all(isinstance(x, str) and x.strip() for x in fields):
            cases.append(dataclasses.replace(c, task=task))
    if not cases:
        raise InputError(f"{p}: empty training set (no usable records)")
    return cases


def load_data(spec: str, fmt: str = "auto", limit: int | None = None) -> list[Case]:
    """The cases of a comma-separated list of files, each `PATH` or `TASK=PATH` (its cases' task;
    default: the format's); `limit` applies to each file. Two files may not share a task."""
    cases, seen = [], set()
    for entry in (e.strip() for e in str(spec).split(",")):
        if not entry:
            raise InputError(f"--data {spec!r}: an empty entry")
        task, _, path = entry.partition("=") if "=" in entry else (None, "", entry)
        part = load_cases(path, fmt, limit, task or None)
        if part[0].task in seen:
            raise InputError(f"--data {spec!r}: task {part[0].task!r} comes from two files")
        seen.add(part[0].task)
        cases += part
    return cases


class EditBatch(NamedTuple):
    """Token arrays [N, 1, T] for N edits: inner (edit input), outer (rephrase), loc."""

    inner: tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, mask, labels
    outer: tuple[np.ndarray, np.ndarray, np.ndarray]
    loc: tuple[np.ndarray, np.ndarray, np.ndarray]

    def take(self, idx) -> EditBatch:
        return EditBatch(*(tuple(a[idx] for a in part) for part in self))

    def __len__(self) -> int:
        return self.inner[0].shape[0]


def case_texts(
    c: Case, instructions: Instructions | None = None, i: int = 0
) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) of the edit, rephrase and locality inputs of a case, the instruction of
    its task written in where `instructions` say (edit and rephrase; locality if asked): the
    training template of the task's i-th case (`Instructions.training_template`)."""
    inner, outer, loc = c.prompt, c.rephrase, c.loc_prompt
    if instructions is not None:
        template = instructions.training_template(c.task, i)
        inner, outer = instruct(template, inner), instruct(template, outer)
        if instructions.locality:
            loc = instruct(template, loc)
    return (inner, c.target), (outer, c.target), (loc, c.loc_answer)


def tokenize_cases(
    tok,
    cases: list[Case],
    max_len: int,
    max_target: int = 8,
    instructions: Instructions | None = None,
) -> EditBatch:
    """Encode every case (instructed: `case_texts`, the i-th case with the task's i-th training
    template, so pass one task's cases), skipping those with a sequence longer than `max_len`
    tokens or an answer longer than `max_target` tokens."""
    keep = {"inner": [], "outer": [], "loc": []}
    for i, c in enumerate(cases):
        parts = tuple(encode_pair(tok, p, a) for p, a in case_texts(c, instructions, i))
        if max(len(p[0]) for p in parts) <= max_len and max(sum(p[1]) for p in parts) <= max_target:
            for k, p in zip(keep, parts, strict=True):
                keep[k].append(p)
    if not keep["inner"]:
        raise InputError(f"empty training set: no case fits in {max_len} tokens")
    arrs = {k: tuple(a[:, None] for a in pad_pairs(tok, v, max_len)) for k, v in keep.items()}
    return EditBatch(arrs["inner"], arrs["outer"], arrs["loc"])


def concat(batches: list[EditBatch]) -> EditBatch:
    """The edits of several batches, one after the other."""
    if len(batches) == 1:
        return batches[0]
    fields = zip(*batches, strict=True)  # (every batch's inner, every batch's outer, ...)
    return EditBatch(
        *(tuple(np.concatenate(a) for a in zip(*parts, strict=True)) for parts in fields)
    )


def batch_indices(n: int, step: int, batch: int, seed: int) -> np.ndarray:
    """Edits of `step`: a fresh permutation per epoch, a pure function of (seed, step)."""
    g = step * batch + np.arange(batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(g // n):
        sel = g // n == epoch
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[sel] = perm[g[sel] % n]
    return out


def balanced_indices(sizes: tuple[int, ...], step: int, batch: int, seed: int) -> np.ndarray:
    """Edits of `step` drawn from K tasks of `sizes` edits each, stored one task after another:
    edit slot g = step · batch + j goes to task g mod K, as that task's (g div K)-th draw, taken
    from its own fresh permutation per epoch. Every task gets the same number of draws whatever
    its size (InstructEdit's task balance), and the order is a pure function of (seed, step).
    One task: `batch_indices` exactly (a single-task run keeps MEND's data order)."""
    if len(sizes) == 1:
        return batch_indices(sizes[0], step, batch, seed)
    k = len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    g = step * batch + np.arange(batch)
    out = np.empty(batch, np.int64)
    for j, (task, draw) in enumerate(zip(g % k, g // k, strict=True)):
        n = sizes[task]
        perm = np.random.default_rng([seed, int(task), int(draw // n)]).permutation(n)
        out[j] = offsets[task] + perm[draw % n]
    return out
