"""MEND's training data: edit cases (CounterFact or zsRE), tokenised, and the batch order.

A case is an edit (prompt -> target), an equivalent input (rephrase) and an unrelated locality
input with its answer. Each is encoded as prompt + answer with the answer tokens flagged, right-
padded to `max_len`; the batch of a step is a pure function of (seed, step), so a resumed run
sees the same data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxedit.errors import InputError
from jaxedit.methods.mend.inputs import encode_pair, pad_pairs


@dataclass(frozen=True)
class Case:
    """One training edit: rewrite, an equivalent input, an unrelated (locality) input."""

    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str


def load_cases(path: str | os.PathLike, fmt: str = "auto", limit: int | None = None) -> list[Case]:
    """CounterFact (EasyEdit: prompt, target_new, rephrase_prompt, locality_prompt, ...) or
    zsRE (MEND: src, alt, rephrase, loc, loc_ans)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"training data {p} not found")
    try:
        records = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(records, list) or not records:
        raise InputError(f"{p}: empty training set (expected a non-empty JSON list)")
    if fmt == "auto":
        first = records[0]
        fmt = "zsre" if "src" in first and "alt" in first else "counterfact"
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
                raise InputError(f"unknown format {fmt!r} (counterfact | zsre | auto)")
        except (KeyError, TypeError) as e:
            raise InputError(f"{p}: a record lacks field {e} for format {fmt!r}") from e
        fields = (c.prompt, c.target, c.rephrase, c.loc_prompt, c.loc_answer)
        if all(isinstance(x, str) and x.strip() for x in fields):
            cases.append(c)
    if not cases:
        raise InputError(f"{p}: empty training set (no usable records)")
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


def tokenize_cases(tok, cases: list[Case], max_len: int, max_target: int = 8) -> EditBatch:
    """Encode every case, skipping those with a sequence longer than `max_len` tokens or an
    answer longer than `max_target` tokens."""
    keep = {"inner": [], "outer": [], "loc": []}
    for c in cases:
        parts = (
            encode_pair(tok, c.prompt, c.target),
            encode_pair(tok, c.rephrase, c.target),
            encode_pair(tok, c.loc_prompt, c.loc_answer),
        )
        if max(len(p[0]) for p in parts) <= max_len and max(sum(p[1]) for p in parts) <= max_target:
            for k, p in zip(keep, parts, strict=True):
                keep[k].append(p)
    if not keep["inner"]:
        raise InputError(f"empty training set: no case fits in {max_len} tokens")
    arrs = {k: tuple(a[:, None] for a in pad_pairs(tok, v, max_len)) for k, v in keep.items()}
    return EditBatch(arrs["inner"], arrs["outer"], arrs["loc"])


def batch_indices(n: int, step: int, batch: int, seed: int) -> np.ndarray:
    """Edits of `step`: a fresh permutation per epoch, a pure function of (seed, step)."""
    g = step * batch + np.arange(batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(g // n):
        sel = g // n == epoch
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[sel] = perm[g[sel] % n]
    return out
