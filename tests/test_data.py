"""Loaders: every format in the shared data directory, and clear errors on bad input."""

from __future__ import annotations

import json
import os

import pytest

from jaxedit.errors import InputError
from jaxedit.eval import datasets as data
from jaxedit.eval.datasets.snippets import load_snippets


def path(data_dir, *p):
    return os.path.join(data_dir, *p)


def test_counterfact_easyedit(data_dir):
    ds = data.load(path(data_dir, "counterfact", "counterfact-edit.json"), n=5)
    assert ds.format == "counterfact" and len(ds) == 5 and ds.n_records == 10_000
    r = ds.requests[0]
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert r.prompt == "The mother tongue of {} is"
    assert (r.target_new, r.target_true, r.case_id) == ("English", "French", 0)
    assert len(r.paraphrase_prompts) == 1
    assert r.neighborhood[0].answers == ("French",)


def test_counterfact_offset(data_dir):
    ds = data.load(path(data_dir, "counterfact", "counterfact-edit.json"), n=2, offset=3)
    raw = json.load(open(path(data_dir, "counterfact", "counterfact-edit.json")))
    assert [r.case_id for r in ds.requests] == [raw[3]["case_id"], raw[4]["case_id"]]


def test_counterfact_rome_form(data_dir):
    ds = data.load(path(data_dir, "counterfact", "original_format", "most_orthogonal.json"))
    assert ds.format == "counterfact_rome" and len(ds) == 10
    r = ds.requests[0]
    assert r.rewrite_prompt == "Ferdinand de Saussure, a citizen of"
    assert (r.target_new, r.target_true) == ("Belgium", "Switzerland")
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood) == 10
    assert all(p.answers == ("Switzerland",) for p in r.neighborhood)
    assert len(r.generation_prompts) == 10
    assert r.extra["relation_id"] == "P27"
    # the Wikidata ids that select the case's attribute snippets (consistency references)
    assert (r.extra["target_new_id"], r.extra["target_true_id"]) == ("Q31", "Q39")


def test_zsre_with_portability(data_dir):
    ds = data.load(path(data_dir, "zsre", "zsre_mend_eval_portability_gpt4.json"), n=3)
    r = ds.requests[0]
    assert ds.format == "zsre"
    assert r.rewrite_prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (r.target_new, r.target_true) == ("2006", "1998")
    assert r.neighborhood[0].prompt.startswith("nq question: ")
    assert r.neighborhood[0].prompt.endswith("?") and r.neighborhood[0].answers == ("The String",)
    assert r.portability[0].kind == "one_hop" and r.portability[0].answers == ("Athletics",)


def test_zsre_bad_records_named_or_skipped(data_dir):
    f = path(data_dir, "zsre", "zsre_mend_train-1k.json")
    with pytest.raises(InputError, match=r"record 534: field 'alt'"):
        data.load(f)
    ds = data.load(f, skip_bad=True)
    assert ds.n_bad == 2 and len(ds) == 998


def test_knowedit_zsre(data_dir):
    ds = data.load(path(data_dir, "knowedit", "ZsRE-test-all.json"))
    assert ds.format == "knowedit" and len(ds) == 1301
    r = ds.requests[0]
    assert (r.target_new, r.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert [p.kind for p in r.neighborhood] == ["Relation_Specificity"] * 2
    assert r.portability[0].kind == "Reasoning" and r.portability[0].answers == ("Owlet moths",)
    kinds = {p.kind for q in ds.requests for p in q.portability}
    assert kinds == {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}


def test_knowedit_cf_aliases(data_dir):
    ds = data.load(path(data_dir, "knowedit", "test_cf.json"), n=1)
    r = ds.requests[0]
    assert r.target_true == "United States of America" and r.paraphrase_prompts
    reasoning = [p for p in r.portability if p.kind == "Reasoning"]
    assert reasoning[0].answers[:2] == ("Syrian pound", "SYP")  # nested list -> aliases
    assert {p.kind for p in r.neighborhood} <= {"Relation_Specificity", "Forgetfulness"}


def test_mquake_groups(data_dir):
    ds = data.load(path(data_dir, "mquake", "MQuAKE-hard.json"), n=2)
    assert ds.format == "mquake" and len(ds) == 8
    groups = data.group_cases(ds.requests)
    assert [len(g) for g in groups] == [4, 4]
    g = groups[0]
    assert g[0].rewrite_prompt == "Hey Jude was performed by" and g[0].target_new == "Madonna"
    assert not g[0].portability and g[-1].portability[0].kind == "multi_hop"
    assert g[-1].portability[0].answers[0] == "Arabic"
    assert g[0].paraphrase_prompts == ("Who performed Hey Jude?",)
    assert g[0].extra["relation_id"] == "P175" and g[0].extra["target_new_id"] == "Q1744"


def test_known_1000_is_refused_clearly(data_dir):
    with pytest.raises(InputError, match="causal-tracing"):
        data.load(path(data_dir, "counterfact", "known_1000.json"))


# ----------------------------------------------------------------------------- bad input


def write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


GOOD = {
    "case_id": 1,
    "prompt": "The capital of {France} is",
    "subject": "France",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "rephrase_prompt": "France's capital is",
    "locality_prompt": "The capital of Spain is",
    "locality_ground_truth": "Madrid",
}


def test_missing_field_names_file_and_record(tmp_path):
    bad = dict(GOOD)
    del bad["target_new"]
    f = write(tmp_path, [GOOD, bad])
    with pytest.raises(InputError, match=r"d\.json: record 1: missing field 'target_new'"):
        data.load(f)
    ds = data.load(f, skip_bad=True)
    assert len(ds) == 1 and ds.n_bad == 1 and "record 1" in ds.bad[0]


def test_subject_not_in_prompt(tmp_path):
    f = write(tmp_path, [dict(GOOD, subject="Germany")])
    with pytest.raises(InputError, match="record 0: subject 'Germany' not found"):
        data.load(f)


def test_braces_in_prompt_are_escaped(tmp_path):
    r = data.load(write(tmp_path, [GOOD])).requests[0]
    assert r.rewrite_prompt == "The capital of {France} is"


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "empty data set"),
        ("{not json", "not JSON"),
        ('{"a": 1}', "expected a list"),
        ('[{"foo": 1}]', "cannot tell the data format"),
        ("[1, 2]", "JSON objects"),
    ],
)
def test_bad_files(tmp_path, content, match):
    with pytest.raises(InputError, match=match):
        data.load(write(tmp_path, content))


def test_bad_arguments(tmp_path):
    f = write(tmp_path, [GOOD])
    with pytest.raises(InputError, match="unknown data format"):
        data.load(f, format="squad")
    with pytest.raises(InputError, match="--n must be positive"):
        data.load(f, n=0)
    with pytest.raises(InputError, match="no records at offset"):
        data.load(f, offset=5)
    with pytest.raises(InputError, match="not found"):
        data.load(str(tmp_path / "missing.json"))


def test_jsonl_and_explicit_format(tmp_path):
    f = write(tmp_path, json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", "d.jsonl")
    assert len(data.load(f, format="counterfact")) == 2


# ----------------------------------------------------------------------------- snippets


def snippets_file(tmp_path, entries) -> str:
    return write(tmp_path, entries, "attribute_snippets.json")


def test_snippets_select_references_by_relation_and_new_target(data_dir, tmp_path):
    """ROME: references = snips[relation_id][target_new id] (other subjects with that object)."""
    ds = data.load(path(data_dir, "counterfact", "original_format", "most_orthogonal.json"))
    r0 = ds.requests[0]  # P27 (citizen of), Saussure -> Belgium (Q31), true Switzerland (Q39)
    f = snippets_file(
        tmp_path,
        [
            {
                "relation_id": "P27",
                "target_id": "Q31",
                "samples": [
                    {"name": "Jacques Brel", "text": "Brel was a Belgian singer."},
                    {"name": "Hergé", "text": "Hergé was a Belgian cartoonist."},
                ],
            },
            {  # the true object: never a reference of the edit
                "relation_id": "P27",
                "target_id": "Q39",
                "samples": [{"name": "Roger Federer", "text": "Federer is Swiss."}],
            },
            {  # same object, other relation
                "relation_id": "P19",
                "target_id": "Q31",
                "samples": [{"name": "Audrey Hepburn", "text": "Born in Brussels."}],
            },
        ],
    )
    snips = load_snippets(f)
    assert snips.references(r0) == ["Brel was a Belgian singer.", "Hergé was a Belgian cartoonist."]
    assert len(snips.texts) == 4  # ROME fits its TF-IDF on every snippet text
    others = [
        r
        for r in ds.requests
        if (r.extra["relation_id"], r.extra["target_new_id"]) != ("P27", "Q31")
    ]
    assert others and all(snips.references(r) == [] for r in others)
    flat = data.load(path(data_dir, "counterfact", "counterfact-edit.json"), n=1).requests[0]
    assert snips.references(flat) == []  # EasyEdit's CounterFact carries no ids


@pytest.mark.parametrize(
    "content, match",
    [
        ("[]", "non-empty list"),
        ('[{"relation_id": "P27", "samples": []}]', "entry 0 needs relation_id, target_id"),
        ('[{"relation_id": "P27", "target_id": "Q1", "samples": [{"name": "x"}]}]', "'text'"),
        ("{oops", "not JSON"),
    ],
)
def test_bad_snippets(tmp_path, content, match):
    with pytest.raises(InputError, match=match):
        load_snippets(snippets_file(tmp_path, content))
    with pytest.raises(InputError, match="cannot read"):
        load_snippets(tmp_path / "missing.json")
