"""Loaders: every knowledge-editing data format into `jaxedit.requests.EditRequest`.

`load(path, format="auto", n=None, offset=0, skip_bad=False) -> Dataset`. One module per
format family, each with the field mapping in its docstring:

- `counterfact` (EasyEdit's flat CounterFact) and `counterfact_rome` (ROME's original form):
  `jaxedit.eval.datasets.counterfact`;
- `zsre` (MEND / ROME zsRE): `.zsre`;  `knowedit` (KnowEdit): `.knowedit`;
- `mquake` (MQuAKE, rewrites of one case grouped): `.mquake`.

Reference texts for the consistency metric come from an attribute-snippets file
(`.snippets.load_snippets`). Prompts contain the subject literally in most formats; it is
replaced by "{}" at its first occurrence. A malformed record raises `InputError` naming the file
and record index, unless `skip_bad=True`, which skips and counts it (`Dataset.n_bad`). Nothing
here knows where data lives: pass any path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxedit.errors import InputError
from jaxedit.eval.datasets import counterfact, knowedit, mquake, zsre
from jaxedit.eval.datasets.records import BadRecord
from jaxedit.io.text import read_text
from jaxedit.requests import EditRequest

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


_CONVERTERS: dict[str, Callable[[dict, int], list[EditRequest]]] = {
    "counterfact": counterfact.from_easyedit,
    "counterfact_rome": counterfact.from_rome,
    "zsre": zsre.from_record,
    "knowedit": knowedit.from_record,
    "mquake": mquake.from_record,
}


def detect_format(record: Any) -> str:
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
    text = read_text(p, "data file")
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
                raise BadRecord(f"expected an object, got {type(rec).__name__}")
            # each request knows the format it came from (InstructEdit reads its task from it)
            requests.extend(
                dataclasses.replace(r, extra={**r.extra, "format": format}) for r in conv(rec, i)
            )
        except BadRecord as e:
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
