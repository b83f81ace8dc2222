"""IKE parity: jaxedit's context + query equals the text the IKE repository's code builds.

The goldens (`tests/goldens/methods/ike/*.json`, written by `scripts/goldens_ike.py` from a
checkout of Zce1112zslx/IKE) hold CounterFact records, fixed demonstration choices (the
nearest-first records, each one's kind and paraphrase / neighbour) and every text the
reference's `icl.py` feeds its model for the rewrite prompt, the paraphrases and the
neighbours, each with target_new and target_true. jaxedit reads the records with its own
loader, orders them with its own retrieval step (`ike.nearest` on similarities that rank
them as the golden does), builds the context edit with `ike.context_edit` (the own copy
demonstration on, as the paper) and renders it; the model then reads context + query and
the continuation " " + target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxedit.methods import ike
from jaxedit.methods.ike_retrieval import Pool

GOLDENS = sorted((Path(__file__).parent / "goldens" / "methods" / "ike").glob("*.json"))


def _pool(tmp_path, records) -> Pool:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    return Pool.load(str(path))


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_context_and_queries_equal_the_reference(smollm, tmp_path, path):
    g = json.loads(path.read_text())
    pool = _pool(tmp_path, g["records"])
    assert len(pool) == len(g["records"])  # one request per CounterFact record
    edit_req = pool.requests[g["edit"]]
    # Similarities that rank the golden's records first, nearest first; the edit's own record
    # is the most similar of all and must be skipped.
    sim = np.full(len(pool), -1.0)
    for rank, i in enumerate(g["nearest"]):
        sim[i] = 0.9 - 0.05 * rank
    sim[g["edit"]] = 1.0
    chosen = ike.nearest(edit_req, pool, sim, len(g["nearest"]))
    assert chosen == g["nearest"]
    picks = [
        ike.Pick(i, kind, option or 0, float(sim[i]))
        for i, kind, option in zip(chosen, g["kinds"], g["options"], strict=True)
    ]
    edit = ike.context_edit(smollm.tokenizer, [edit_req], picks, pool, copy_own_fact=True)
    assert [d.text for d in edit.demonstrations] == g["demonstrations"]
    context = edit.render(smollm.tokenizer, smollm.config.max_positions)

    queries = {"rewrite": [edit_req.rewrite_prompt]}
    queries["paraphrase"] = list(edit_req.paraphrase_prompts)
    queries["neighborhood"] = [n.prompt for n in edit_req.neighborhood]
    answers = {"new": edit_req.target_new, "true": edit_req.target_true}
    want = {(t["kind"], t["query"], t["target"]): t["text"] for t in g["texts"]}
    ours = {
        (kind, q, a): context + q + " " + a
        for kind, qs in queries.items()
        for q in qs
        for a in answers.values()
    }
    assert ours == want


def test_without_the_own_copy_the_reference_minus_its_last_demonstration(smollm, tmp_path):
    """copy_own_fact=False leaves out exactly icl.py line 129's demonstration."""
    g = json.loads(GOLDENS[0].read_text())
    pool = _pool(tmp_path, g["records"])
    sim = np.zeros(len(pool))
    picks = [
        ike.Pick(i, kind, option or 0, float(sim[i]))
        for i, kind, option in zip(g["nearest"], g["kinds"], g["options"], strict=True)
    ]
    edit = ike.context_edit(
        smollm.tokenizer, [pool.requests[g["edit"]]], picks, pool, copy_own_fact=False
    )
    assert [d.text for d in edit.demonstrations] == g["demonstrations"][:-1]
