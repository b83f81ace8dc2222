"""Attribute snippets: the reference texts of ROME's consistency metric.

ROME's `attribute_snippets.json` (kmeng01/rome `dsets/attr_snippets.py`) is a list of

    {"relation_id": "P27", "target_id": "Q31", "samples": [{"name": "...", "text": "..."}, ...]}

where the samples are Wikipedia passages about subjects s' for which (s', relation, target)
holds. A CounterFact case's references are the samples of (its relation_id, its target_new's
Wikidata id): text about other things that have the new object, which an edited model's
generations about the subject should resemble. Only ROME-form records (and MQuAKE) carry those
ids (`extra["relation_id"]`, `extra["target_new_id"]`); EasyEdit's flat CounterFact does not.

ROME fits its TF-IDF statistics on the texts of all snippets (`dsets/tfidf_stats.collect_stats`);
`texts` holds exactly those texts for `jaxedit.eval.metrics.TfIdf.fit`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jaxedit.errors import InputError
from jaxedit.io.text import read_text
from jaxedit.requests import EditRequest


@dataclass(frozen=True)
class Snippet:
    name: str  # the Wikipedia article's subject
    text: str


@dataclass(frozen=True)
class AttributeSnippets:
    """Snippets by (relation id, target id)."""

    by_attribute: dict[tuple[str, str], tuple[Snippet, ...]]
    texts: tuple[str, ...]  # every snippet text, in file order: ROME's TF-IDF corpus
    path: str = ""

    def references(self, r: EditRequest) -> list[str]:
        """The reference texts of `r` (ROME: snips[relation_id][target_new id]); [] if none."""
        key = (r.extra.get("relation_id"), r.extra.get("target_new_id"))
        return [s.text for s in self.by_attribute.get(key, ())]


def load_snippets(path: str | Path) -> AttributeSnippets:
    """Read an attribute-snippets file (ROME's form, above); malformed entries are refused."""
    p = Path(path)
    try:
        entries = json.loads(read_text(p, "snippets file"))
    except OSError as e:
        raise InputError(f"cannot read snippets file {p}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not JSON ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{p}: expected a non-empty list of {{relation_id, target_id, samples}}")
    by: dict[tuple[str, str], list[Snippet]] = {}
    docs: list[str] = []
    for i, e in enumerate(entries):
        samples = e.get("samples") if isinstance(e, dict) else None
        if not (
            isinstance(samples, list)
            and isinstance(e.get("relation_id"), str)
            and isinstance(e.get("target_id"), str)
        ):
            raise InputError(f"{p}: entry {i} needs relation_id, target_id and a samples list")
        for s in samples:
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise InputError(f"{p}: entry {i}: every sample needs a 'text' string")
            by.setdefault((e["relation_id"], e["target_id"]), []).append(
                Snippet(str(s.get("name", "")), s["text"])
            )
            docs.append(s["text"])
    return AttributeSnippets({k: tuple(v) for k, v in by.items()}, tuple(docs), str(p))
