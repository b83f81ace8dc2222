"""Reverse probes (jaxedit.eval.reverse): every relation with a reverse template pinned by a
golden string, the class relations without one, template recovery (ambiguity included), the
question rules of zsRE / KnowEdit, and the loaders attaching the probes to real data."""

from __future__ import annotations

import json
import os

import pytest

from jaxedit.eval import datasets
from jaxedit.eval import reverse as rv
from jaxedit.requests import Probe

# CounterFact relations: (relation, one of its prompt templates, subject, target_new, the
# reverse prompt expected). Each relation is asked through its own id AND, where the template
# belongs to it alone or to relations with the same reverse, through the template.
COUNTERFACT_GOLDEN = [
    ("P17", "{} is located in the country of", "Shablykinsky District", "Belarus",
     "Belarus is home to"),
    ("P19", "{} was born in", "Charles Nungesser", "Mumbai", "Mumbai is the birthplace of"),
    ("P20", "{} passed away in", "Sebastiano Conca", "Georgetown",
     "Georgetown is the place of death of"),
    ("P27", "{} is a citizen of", "Haseeb Ahsan", "Niger",
     "Niger is the country of citizenship of"),
    ("P30", "{} belongs to the continent of", "George V Coast", "Africa", "Africa is home to"),
    ("P36", "The capital of {} is", "Italy", "Lyon", "Lyon is the capital of"),
    ("P37", "The official language of {} is", "Italy", "Korean",
     "Korean is an official language of"),
    ("P103", "The mother tongue of {} is", "Danielle Darrieux", "English",
     "English is the native language of"),
    ("P108", "{} is employed by", "Brian Krzanich", "Toyota", "Toyota is the employer of"),
    ("P127", "{} is owned by", "BBC Radio 3", "Google", "Google is the owner of"),
    ("P131", "{} is within", "Ostankinsky District", "Leeds", "Leeds is home to"),
    ("P138", "{} is named for", "Centocelle Airport", "Milan", "Milan is the namesake of"),
    ("P159", "{} is headquartered in", "Veracode", "Columbus",
     "Columbus is home to the headquarters of"),
    ("P176", "{}, a product manufactured by", "Honda Insight", "Suzuki",
     "Suzuki is the maker of"),
    ("P178", "{} was developed by", "Apple A5", "Google", "Google is the maker of"),
    ("P190", "The twin city of {} is", "Lyon", "Manila", "Manila is a twin city of"),
    ("P264", "{}'s record label is", "Charley Patton", "Coral", "Coral is the record label of"),
    ("P276", "The location of {} is", "PAX", "Leeds", "Leeds is home to"),
    ("P364", "The original language of {} is", "Wild Reeds", "Spanish",
     "Spanish is the original language of"),
    ("P407", "{} is written in", "El Correo", "English",
     "English is the original language of"),
    ("P449", "{} premiered on", "The Yellow Rose", "CBS", "CBS is the original broadcaster of"),
    ("P463", "{} is a member of", "Argentine Football Association", "NATO",
     "One member of NATO is"),
    ("P495", "{} was created in the country of", "Falling Down", "Philippines",
     "Philippines is the place of origin of"),
    ("P740", "{} was founded in", "Webley & Scott", "Wales", "Wales is the place of origin of"),
    ("P937", "{} worked in the city of", "Laurent Cars", "Philadelphia",
     "Philadelphia is the place of work of"),
    ("P1412", "{} speaks the language", "Georges Marchais", "English",
     "English is a language spoken by"),
]  # fmt: skip

# Relations known only by id (MQuAKE, ROME-form records) and their golden reverse prompts.
BY_ID_GOLDEN = [
    ("P6", "Boris Johnson", "Boris Johnson is the head of government of"),
    ("P35", "Emmanuel Macron", "Emmanuel Macron is the head of state of"),
    ("P22", "Frederick II", "Frederick II is the father of"),
    ("P25", "Catherine Rolfe", "Catherine Rolfe is the mother of"),
    ("P26", "Carol Chu", "Carol Chu is married to"),
    ("P40", "Ada Lovelace", "Ada Lovelace is a child of"),
    ("P3373", "Linda Skolmen", "Linda Skolmen is a sibling of"),
    ("P50", "Jane Austen", "Jane Austen is the author of"),
    ("P57", "Abbas Kiarostami", "Abbas Kiarostami is the director of"),
    ("P84", "Inigo Jones", "Inigo Jones is the architect of"),
    ("P86", "John Williams", "John Williams is the composer of"),
    ("P112", "Steve Jobs", "Steve Jobs is the founder of"),
    ("P123", "BBC Books", "BBC Books is the publisher of"),
    ("P155", "Windows 7", "Windows 7 is followed by"),
    ("P156", "Windows 8", "Windows 8 follows"),
    ("P161", "Dennis Price", "Dennis Price starred in"),
    ("P166", "Nobel Prize in Physics", "Nobel Prize in Physics was awarded to"),
    ("P169", "Tim Cook", "Tim Cook is the chief executive officer of"),
    ("P170", "Paul Cézanne", "Paul Cézanne is the creator of"),
    ("P175", "Lil Wayne", "Lil Wayne is the performer of"),
    ("P286", "Pep Guardiola", "Pep Guardiola is the head coach of"),
    ("P488", "Jack Ma", "Jack Ma is the chairperson of"),
    ("P54", "Ottawa Senators", "One player of Ottawa Senators is"),
    ("P69", "University of Michigan", "University of Michigan is the alma mater of"),
    ("P361", "Benelux", "One part of Benelux is"),
]

CLASS_RELATIONS = ("P21", "P39", "P101", "P106", "P136", "P140", "P413", "P641", "P1303")

# zsRE / KnowEdit prompts: (prompt with "{}", relation the rules find or None).
QUESTION_GOLDEN = [
    ("The name of the head of state of {} is", "P35"),
    ("The name of the head of government of {} is", "P6"),
    ("The name of the capital city of {} is", "P36"),
    ("What is the twin city of {}?", "P190"),
    ("What is {}'s spouse's name?", "P26"),
    ("Which lady gave birth to {}?", "P25"),
    ("Which lady {} was born to?", "P25"),
    ("Who was {}'s father?", "P22"),
    ("The names of the siblings of {} are", "P3373"),
    ("The name of the child of {} is", "P40"),
    ("What label was responsible for {}?", "P264"),
    ("Whom is {} named after?", "P138"),
    ("What architect designed {}?", "P84"),
    ("The name of the composer of {} is", "P86"),
    ("Who are the stars of the film {}?", "P161"),
    ("Who was {} directed by?", "P57"),
    ("The name of the author of {} is", "P50"),
    ("What is the publisher of {}?", "P123"),
    ("Who is the founder of {}?", "P112"),
    ("Who is the creator of {}?", "P170"),
    ("Which performer released the album {}?", "P175"),
    ("Which is the manufacturer of {}?", "P176"),
    ("Where is the headquarters of {}?", "P159"),
    ("In what city was {} born?", "P19"),
    ("What city did {} live when he died?", "P20"),
    ("The name of the country of citizenship of {} is", "P27"),
    ("The name of the employer of {} is", "P108"),
    ("Who is the owner of {}?", "P127"),
    ("What original network is {} on?", "P449"),
    ("The official language of {} is", "P37"),
    ("What is the mother tongue of {}?", "P103"),
    ("What language is {} written in?", "P364"),
    ("What team is {} on?", "P54"),
    ("What university did {} attend?", "P69"),
    ("The name of the award {} won is", "P166"),
    ("What group was {} a member of?", "P463"),
    ("What continent is {} on?", "P30"),
    ("What state is {} located?", "P131"),
    ("{} follows", "P155"),
    ("{} is followed by", "P156"),
    # no reverse: a date, a cause, a class, a nomination, or nothing a rule knows
    ("What is the date of birth for {}?", None),
    ("What did {} die of?", None),
    ("The occupation of {} is", None),
    ("The gender of {} is", None),
    ("What voice type is {}?", None),
    ("Which family does {} belong to?", None),
    ("What award was {} nominated for?", None),
    ("What war did {} participate in?", None),
    ("The name of the position held by {} is", None),
]


@pytest.mark.parametrize("rid, template, subject, target, expected", COUNTERFACT_GOLDEN)
def test_counterfact_relation_golden(rid, template, subject, target, expected):
    want = (Probe(expected, (subject,), "reverse"),)
    assert rv.counterfact_reverse(template, subject, target, rid) == want  # by id
    assert rv.counterfact_reverse(template, subject, target) == want  # by its template
    assert rid in rv.relations_of(template)


def test_every_counterfact_relation_with_a_reverse_has_a_golden():
    covered = {r.id for r in rv.RELATIONS.values() if r.reverse is not None and r.forward}
    assert covered == {g[0] for g in COUNTERFACT_GOLDEN}


@pytest.mark.parametrize("rid, obj, expected", BY_ID_GOLDEN)
def test_relation_by_id_golden(rid, obj, expected):
    (p,) = rv.counterfact_reverse("{} is something", "The Subject", obj, rid)
    assert p == Probe(expected, ("The Subject",), "reverse")


def test_every_relation_is_golden_or_a_class():
    golden = {g[0] for g in COUNTERFACT_GOLDEN} | {g[0] for g in BY_ID_GOLDEN}
    assert set(rv.RELATIONS) == golden | set(CLASS_RELATIONS)
    for rid in CLASS_RELATIONS:
        r = rv.RELATIONS[rid]
        assert r.reverse is None and r.why_not
    for r in rv.RELATIONS.values():
        assert r.answers in (rv.ONE, rv.MANY)
        assert r.reverse is None or r.reverse.count("{}") == 1


@pytest.mark.parametrize("rid", CLASS_RELATIONS)
def test_class_relations_get_no_probe(rid):
    assert rv.counterfact_reverse("{} x", "S", "jazz", rid) == ()
    for t in rv.RELATIONS[rid].forward:
        assert rv.counterfact_reverse(t, "S", "jazz") == ()


def test_shared_templates():
    # the same reverse in every relation using the template: a probe
    assert set(rv.relations_of("{} is located in")) == {"P17", "P30", "P131", "P276"}
    assert rv.counterfact_reverse("{} is located in", "Eibenstock", "Iran")[0].prompt == (
        "Iran is home to"
    )
    assert rv.counterfact_reverse("{}, developed by", "Ferrari F40", "Microsoft")[0].prompt == (
        "Microsoft is the maker of"
    )
    # different reverses (country of origin, owner, country, located in): none
    assert set(rv.relations_of("{} is from")) == {"P17", "P127", "P131", "P495"}
    assert rv.counterfact_reverse("{} is from", "Areva", "Germany") == ()
    assert rv.counterfact_reverse("{}, from", "Pentium III", "Prague") == ()
    # a template no relation uses, an unknown id: none
    assert rv.counterfact_reverse("{} likes", "S", "T") == ()
    assert rv.counterfact_reverse("{} likes", "S", "T", "P999999") == ()
    # the record's id beats its template
    assert rv.counterfact_reverse("{} is from", "Areva", "Siemens", "P127")[0].prompt == (
        "Siemens is the owner of"
    )


def test_object_is_inserted_literally():
    (p,) = rv.counterfact_reverse("The capital of {} is", "X", " {weird} ")
    assert p.prompt == "{weird} is the capital of"


@pytest.mark.parametrize("prompt, rid", QUESTION_GOLDEN)
def test_question_rules(prompt, rid):
    assert rv.question_relation(prompt) == rid
    probes = rv.question_reverse(prompt, "Subj", "Obj")
    if rid is None:
        assert probes == ()
    else:
        expected = rv.RELATIONS[rid].reverse.replace("{}", "Obj")
        assert probes == (Probe(expected, ("Subj",), "reverse"),)


def test_every_question_rule_has_a_golden():
    assert {rid for _, rid in rv.QUESTION_RULES} <= {rid for _, rid in QUESTION_GOLDEN}


def test_question_rule_goldens_spelled_out():
    """A few complete reverse prompts of real zsRE / KnowEdit edits."""
    cases = [
        ("The name of the spouse of {} is", "Ron DeSantis", "Carol Chu", "Carol Chu is married to"),
        ("The mother of {} is whom?", "Babur", "Boris I", "Boris I is the mother of"),
        ("{} follows", "Windows 8", "Windows 95", "Windows 95 is followed by"),
        ("Which sports team is {} playing for?", "X", "FC Atyrau", "One player of FC Atyrau is"),
    ]
    for prompt, subj, obj, want in cases:
        assert rv.question_reverse(prompt, subj, obj) == (Probe(want, (subj,), "reverse"),)


# ----------------------------------------------------------------------------- real data


def _path(data_dir, *parts):
    p = os.path.join(data_dir, *parts)
    if not os.path.exists(p):
        pytest.skip(f"{p} missing")
    return p


def test_every_counterfact_template_is_in_the_table(data_dir):
    """Every prompt template of our CounterFact files belongs to a relation of the table."""
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        recs = json.load(open(_path(data_dir, "counterfact", name)))
        templates = {r["prompt"].replace(r["subject"], "{}", 1) for r in recs}
        assert not [t for t in templates if not rv.relations_of(t)], name


def test_loaders_attach_reverse_probes(data_dir):
    cf = datasets.load(_path(data_dir, "counterfact", "counterfact-edit.json"), n=400)
    r = cf.requests[0]  # Danielle Darrieux, mother tongue French -> English
    assert r.reverse == (
        Probe("English is the native language of", ("Danielle Darrieux",), "reverse"),
    )
    share = sum(bool(q.reverse) for q in cf.requests) / len(cf.requests)
    assert share >= 0.5  # the acceptance asks for probes on >= 30 % of the cases

    rome = datasets.load(_path(data_dir, "counterfact", "original_format", "most_orthogonal.json"))
    for q in rome.requests:  # by the record's relation id
        rid = q.extra["relation_id"]
        want = rv.RELATIONS[rid].reverse if rid in rv.RELATIONS else None
        assert bool(q.reverse) == (want is not None)
        if want:
            assert q.reverse[0].prompt == want.replace("{}", q.target_new)

    ke = datasets.load(_path(data_dir, "knowedit", "test_cf.json"), n=1)
    assert ke.requests[0].reverse[0].prompt == "Syria is the country of citizenship of"
    assert ke.requests[0].reverse[0].answers == ("Leonardo DiCaprio",)

    mq = datasets.load(_path(data_dir, "mquake", "MQuAKE-hard.json"), n=3)
    assert sum(bool(q.reverse) for q in mq.requests) >= len(mq.requests) // 2
