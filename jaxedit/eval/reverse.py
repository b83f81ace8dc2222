"""Reverse probes: the edited fact asked the other way round, its subject the answer.

An edit (s, r, o -> o*) written into a model's weights may hold only in the direction it was
taught: "The mother tongue of Danielle Darrieux is" -> "English", while "English is the mother
tongue of" still never names her (the reversal curse; Berglund et al. 2023, and for editing
Ma et al. 2023, "Untying the Reversal Curse via Bidirectional Language Model Editing"). A
reverse probe is the prompt `reverse.replace("{}", o*)` with the subject `s` as its answer,
measured teacher-forced (`reverse`, token accuracy of `" " + s`) and generated (`reverse_gen`).

Which relations have one. The reverse is well defined when the object is an entity and a plain
sentence makes the subject one of its correct continuations. `answers` says how many subjects
a reverse prompt has: "one" (capital of, head of state, spouse: the subject is THE answer) or
"many" (located in, birthplace of, native language of: the subject is one correct answer among
several, so the unedited model rarely names it and the edited model shows whether the edit
carried over). Relations whose object is a class (occupation, field of work, genre,
instrument, sport, playing position, religion, position held) get no probe: "A famous jazz
musician is" is a question about jazz, not the reverse of a fact. The table below is that
documentation; `RELATIONS[rid].reverse is None` with `why_not` marks the excluded ones.

Where the relation comes from:

- a record's own relation id (ROME-form CounterFact, MQuAKE: `requested_rewrite.relation_id`);
- otherwise CounterFact's prompt template (`{}` for the subject): EasyEdit's flat CounterFact
  drops the relation id, but its prompts are ParaRel's templates of 34 relations, listed per
  relation in `Relation.forward` (collected from ParaRel's patterns, yanaiela/pararel, and the
  templates of ROME's known_1000.json and of our CounterFact files). A template shared by
  relations with different reverse templates ("{} is from": country of origin, owner, country,
  located in) gives no probe; shared ones with the same reverse ("{} is located in": P17, P131,
  P276, P30, all "{} is home to") give it;
- zsRE / KnowEdit prompts (free questions, "What is the name of the spouse of {}?", or KnowEdit's
  statements, "The name of the spouse of {} is"): `QUESTION_RULES`, regular expressions tried
  in order; a question about a date, a year, a number or a class matches `NO_REVERSE` first and
  gets no probe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxedit.requests import Probe

ONE, MANY = "one", "many"
KIND = "reverse"

# Reverse templates several relations share (their CounterFact templates overlap).
LOCATED = "{} is home to"
ORIGIN = "{} is the place of origin of"
MAKER = "{} is the maker of"
LANGUAGE_OF = "{} is the original language of"
CLASS = "the object is a class, not an entity: the reverse asks about the class"


@dataclass(frozen=True)
class Relation:
    """A Wikidata relation and its reverse template ("{}" = the object; the subject answers)."""

    id: str
    name: str
    reverse: str | None
    answers: str = MANY  # ONE: the subject is the only answer; MANY: one of several
    forward: tuple[str, ...] = ()  # CounterFact prompt templates of the relation
    why_not: str = ""  # why there is no reverse (reverse None)


_TABLE = (
    # ---- CounterFact relations with a reverse
    Relation(
        "P17",
        "country",
        LOCATED,
        MANY,
        (
            "{} is from",
            "{} is located in",
            "{} is located in the country of",
            "{}, in",
            "{}, located in",
            "{}, which is located in",
        ),
    ),
    Relation(
        "P19",
        "place of birth",
        "{} is the birthplace of",
        MANY,
        (
            "{} is native to",
            "{} is originally from",
            "{} originated from",
            "{} originates from",
            "{} was born in",
            "{} was native to",
            "{} was originally from",
        ),
    ),
    Relation(
        "P20",
        "place of death",
        "{} is the place of death of",
        MANY,
        (
            "{} died at",
            "{} died in",
            "{} died in the city of",
            "{} expired at",
            "{} lost their life at",
            "{} passed away at",
            "{} passed away in",
            "{} succumbed at",
            "{}'s life ended in",
        ),
    ),
    Relation(
        "P27",
        "country of citizenship",
        "{} is the country of citizenship of",
        MANY,
        (
            "{} has a citizenship from",
            "{} has a citizenship of",
            "{} holds a citizenship from",
            "{} is a citizen of",
            "{}, a citizen of",
            "{}, who has a citizenship from",
            "{}, who has a citizenship of",
            "{}, who holds a citizenship from",
            "{}, who is a citizen of",
        ),
    ),
    Relation(
        "P30",
        "continent",
        LOCATED,
        MANY,
        (
            "{} belongs to the continent of",
            "{} is a part of the continent of",
            "{} is located in",
            "{} is located in the continent",
            "{}, in",
        ),
    ),
    Relation(
        "P36",
        "capital",
        "{} is the capital of",
        ONE,
        (
            "The capital city of {} is",
            "The capital of {} is",
            "{}'s capital city is",
            "{}'s capital city,",
            "{}'s capital is",
            "{}'s capital,",
            "{}, which has the capital",
            "{}, which has the capital city",
        ),
    ),
    Relation(
        "P37",
        "official language",
        "{} is an official language of",
        MANY,
        (
            "In {}, an official language is",
            "In {}, the language spoken is",
            "In {}, they understand",
            "The law in {} declares the language",
            "The official language of {} is",
        ),
    ),
    Relation(
        "P103",
        "native language",
        "{} is the native language of",
        MANY,
        (
            "The mother tongue of {} is",
            "The native language of {} is",
            "{} is a native speaker of",
            "{}, a native",
        ),
    ),
    Relation(
        "P108",
        "employer",
        "{} is the employer of",
        MANY,
        (
            "{} is employed by",
            "{} works for",
            "{}, of",
            "{}, who is employed by",
            "{}, who works for",
        ),
    ),
    Relation(
        "P127",
        "owned by",
        "{} is the owner of",
        MANY,
        ("{} is from", "{} is owned by", "{} owner", "{}'s owner", "{}, by", "{}, from"),
    ),
    Relation(
        "P131",
        "located in the administrative territorial entity",
        LOCATED,
        MANY,
        (
            "{} can be found in",
            "{} is from",
            "{} is in",
            "{} is located in",
            "{} is within",
            "{}, in",
        ),
    ),
    Relation(
        "P138",
        "named after",
        "{} is the namesake of",
        MANY,
        (
            "{} is called after",
            "{} is named after",
            "{} is named for",
            "{} was called after",
            "{} was named after",
            "{} was named for",
            "{}, called after",
            "{}, named after",
            "{}, named for",
            "{}, which is called after",
            "{}, which is named after",
            "{}, which is named for",
            "{}, which was called after",
            "{}, which was named after",
            "{}, which was named for",
        ),
    ),
    Relation(
        "P159",
        "headquarters location",
        "{} is home to the headquarters of",
        MANY,
        (
            "The headquarter of {} is in",
            "The headquarter of {} is located in",
            "The headquarters of {} is in",
            "{} is based in",
            "{} is headquartered in",
            "{}'s headquarters are in",
            "{}, whose headquarters are in",
        ),
    ),
    Relation(
        "P176",
        "manufacturer",
        MAKER,
        MANY,
        (
            "{} is a product of",
            "{} is created by",
            "{} is developed by",
            "{} is produced by",
            "{}, a product manufactured by",
            "{}, created by",
            "{}, developed by",
            "{}, produced by",
        ),
    ),
    Relation(
        "P178",
        "developer",
        MAKER,
        MANY,
        (
            "{} is a product of",
            "{} is created by",
            "{} is developed by",
            "{} was a product of",
            "{} was created by",
            "{} was developed by",
            "{}, a product created by",
            "{}, a product developed by",
            "{}, a product of",
            "{}, created by",
            "{}, developed by",
        ),
    ),
    Relation(
        "P190",
        "twinned administrative body",
        "{} is a twin city of",
        MANY,
        ("The twin city of {} is", "What is the twin city of {}? It is", "{} is a twin city of"),
    ),
    Relation(
        "P264",
        "record label",
        "{} is the record label of",
        MANY,
        (
            "The music label representing {} is",
            "The music label that is representing {} is",
            "{} is represented by",
            "{} is represented by music label",
            "{} is represented by record label",
            "{} label :",
            "{} recorded for",
            "{}'s label is",
            "{}'s music label is",
            "{}'s record company is",
            "{}'s record label is",
            "{}, released by",
            "{}, that is represented by",
            "{}, which is represented by",
        ),
    ),
    Relation(
        "P276",
        "location",
        LOCATED,
        MANY,
        (
            "The location of {} is",
            "Where is {}? It is located in",
            "{} can be found in",
            "{} is in",
            "{} is located in",
        ),
    ),
    Relation(
        "P361",
        "part of",
        "One part of {} is",
        MANY,
    ),
    Relation(
        "P364",
        "original language of film or TV show",
        LANGUAGE_OF,
        MANY,
        (
            "The language of {} is",
            "The language of {} was",
            "The original language of {} is",
            "The original language of {} was",
        ),
    ),
    Relation(
        "P407",
        "language of work or name",
        LANGUAGE_OF,
        MANY,
        (
            "The language of {} is",
            "The language of {} was",
            "{} is written in",
            "{} was written in",
        ),
    ),
    Relation(
        "P449",
        "original broadcaster",
        "{} is the original broadcaster of",
        MANY,
        (
            "{} debuted on",
            "{} is to debut on",
            "{} premiered on",
            "{} premieres on",
            "{} was originally aired on",
            "{} was released on",
        ),
    ),
    Relation(
        "P463",
        "member of",
        "One member of {} is",
        MANY,
        (
            "{} belongs to the organization of",
            "{} is a member of",
            "{} is a part of the",
            "{} is affiliated with",
            "{} is affiliated with the",
        ),
    ),
    Relation(
        "P495",
        "country of origin",
        ORIGIN,
        MANY,
        (
            "{} formed in",
            "{} from",
            "{} is from",
            "{} originated in",
            "{} was created in",
            "{} was created in the country of",
            "{} was developed in",
            "{} was formed in",
            "{} was formulated in",
            "{} was from",
            "{}, created in",
            "{}, developed in",
            "{}, formulated in",
            "{}, from",
            "{}, that originated in",
            "{}, that was created in",
            "{}, that was developed in",
            "{}, that was formed in",
            "{}, that was formulated in",
            "{}, that was from",
        ),
    ),
    Relation(
        "P740",
        "location of formation",
        ORIGIN,
        MANY,
        (
            "{} formed in",
            "{} originated in",
            "{} started in",
            "{} that was founded in",
            "{} was created in",
            "{} was formed in",
            "{} was founded in",
            "{} was started in",
            "{}, created in",
            "{}, founded in",
            "{}, that originated in",
            "{}, that was created in",
            "{}, that was formed in",
            "{}, that was started in",
        ),
    ),
    Relation(
        "P937",
        "work location",
        "{} is the place of work of",
        MANY,
        (
            "{} found employment in",
            "{} took up work in",
            "{} used to work in",
            "{} was employed in",
            "{} worked in",
            "{} worked in the city of",
        ),
    ),
    Relation(
        "P1412",
        "languages spoken, written or signed",
        "{} is a language spoken by",
        MANY,
        (
            "The language used by {} is",
            "{} speaks",
            "{} speaks the language",
            "{} spoke the language",
            "{} writes in",
            "{}, speaker of",
        ),
    ),
    # ---- CounterFact relations whose object is a class: no reverse
    Relation(
        "P39",
        "position held",
        None,
        forward=(
            "{} has the position of",
            "{} holds the position of",
            "{} holds the title of",
            "{} is a",
            "{}'s position is",
            "{}, who has the position of",
            "{}, who holds the position of",
            "{}, whose position is that of",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P101",
        "field of work",
        None,
        forward=(
            "The domain of activity of {} is",
            "The domain of work of {} is",
            "The expertise of {} is",
            "{} specializes in",
            "{} works in the area of",
            "{} works in the field of",
            "{}'s area of work is",
            "{}'s domain of activity is",
            "{}'s domain of work is",
            "{}'s expertise is",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P106",
        "occupation",
        None,
        forward=(
            "The occupation of {} is",
            "The profession of {} is",
            "{} works as",
            "{}'s occupation is",
            "{}'s profession is a",
            "{}'s profession is an",
            "{}, who works as",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P136",
        "genre",
        None,
        forward=(
            "The genre played by {} is",
            "What does {} play? They play",
            "{} is known for performing",
            "{} performs",
            "{} plays",
            "{}, who plays",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P140",
        "religion",
        None,
        forward=(
            "The official religion of {} is",
            "{} follows the religion of",
            "{} is affiliated with the religion",
            "{} is follower of",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P413",
        "position played on team",
        None,
        forward=(
            "Which position does {} play? They play as",
            "{} plays as",
            "{} plays in the position of",
            "{}, the",
            "{}, who plays the position",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P641",
        "sport",
        None,
        forward=(
            "What sport does {} play? They play",
            "{} is a professional",
            "{} professionally plays the sport",
            "{}, the",
        ),
        why_not=CLASS,
    ),
    Relation(
        "P1303",
        "instrument",
        None,
        forward=(
            "{} performs on the",
            "{} plays",
            "{} plays the",
            "{} plays the instrument",
            "{}, performing on the",
            "{}, playing the",
            "{}, the",
        ),
        why_not=CLASS,
    ),
    # ---- relations of MQuAKE / zsRE / KnowEdit (by id or by question)
    Relation("P6", "head of government", "{} is the head of government of", ONE),
    Relation("P35", "head of state", "{} is the head of state of", ONE),
    Relation("P22", "father", "{} is the father of", MANY),
    Relation("P25", "mother", "{} is the mother of", MANY),
    Relation("P26", "spouse", "{} is married to", ONE),
    Relation("P40", "child", "{} is a child of", MANY),
    Relation("P3373", "sibling", "{} is a sibling of", MANY),
    Relation("P50", "author", "{} is the author of", MANY),
    Relation("P57", "director", "{} is the director of", MANY),
    Relation("P84", "architect", "{} is the architect of", MANY),
    Relation("P86", "composer", "{} is the composer of", MANY),
    Relation("P112", "founded by", "{} is the founder of", MANY),
    Relation("P123", "publisher", "{} is the publisher of", MANY),
    Relation("P155", "follows", "{} is followed by", ONE),
    Relation("P156", "followed by", "{} follows", ONE),
    Relation("P161", "cast member", "{} starred in", MANY),
    Relation("P166", "award received", "{} was awarded to", MANY),
    Relation("P169", "chief executive officer", "{} is the chief executive officer of", ONE),
    Relation("P170", "creator", "{} is the creator of", MANY),
    Relation("P175", "performer", "{} is the performer of", MANY),
    Relation("P286", "head coach", "{} is the head coach of", ONE),
    Relation("P488", "chairperson", "{} is the chairperson of", ONE),
    Relation("P54", "member of sports team", "One player of {} is", MANY),
    Relation("P69", "educated at", "{} is the alma mater of", MANY),
    Relation("P21", "sex or gender", None, why_not=CLASS),
)
RELATIONS: dict[str, Relation] = {r.id: r for r in _TABLE}


def _template_index() -> dict[str, tuple[str, ...]]:
    index: dict[str, list[str]] = {}
    for r in _TABLE:
        for t in r.forward:
            index.setdefault(t, []).append(r.id)
    return {t: tuple(ids) for t, ids in index.items()}


TEMPLATES: dict[str, tuple[str, ...]] = _template_index()  # CounterFact template -> relations


def relations_of(template: str) -> tuple[str, ...]:
    """The relation ids whose CounterFact prompts use `template` ("{}" for the subject)."""
    return TEMPLATES.get(template.strip(), ())


def reverse_template(relation_ids: tuple[str, ...]) -> str | None:
    """The reverse template all `relation_ids` share; None when they differ, when one has no
    reverse, or when there is none."""
    found = {RELATIONS[r].reverse if r in RELATIONS else None for r in relation_ids}
    if len(found) != 1:
        return None
    return found.pop()


def probe(reverse: str | None, subject: str, target: str) -> tuple[Probe, ...]:
    """The reverse probe `reverse` filled with the object, answered by the subject (or none)."""
    if reverse is None or not target.strip():
        return ()
    return (Probe(reverse.replace("{}", target.strip()), (subject,), KIND),)


def counterfact_reverse(
    template: str, subject: str, target: str, relation_id: str | None = None
) -> tuple[Probe, ...]:
    """The reverse probe of a CounterFact-style edit: by its relation id when the record has
    one, else by its prompt template (`relations_of`)."""
    ids = (relation_id,) if relation_id else relations_of(template)
    return probe(reverse_template(ids), subject, target)


# ----------------------------------------------------------------------------- questions

# A question about a date, a year, a number or a class: no reverse, whatever else it names.
NO_REVERSE = re.compile(
    r"\b(date|year|when (is|was|did|does|were)|how many|how old|age|die of|how did|cause|"
    r"nominated|gender|sex|occupation|profession|voice|range|position|genre|instrument|sport|"
    r"religion|species|family|genus|order|taxon|rank)\b",
    re.IGNORECASE,
)

# (pattern over the prompt with "{}" for the subject, relation id), tried in order.
QUESTION_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), rid)
    for p, rid in (
        (r"^{} follows$", "P155"),
        (r"^{} is followed by$", "P156"),
        (r"\bhead of state\b", "P35"),
        (r"\bhead of government\b|\bprime minister\b", "P6"),
        (r"\bcapital\b", "P36"),
        (r"\btwin (city|town)\b|\bsister city\b", "P190"),
        (r"\bspouse\b|\bwife\b|\bhusband\b|\bmarried\b", "P26"),
        (r"\bmother\b(?! tongue)|\bgave birth to\b|\bborn to\b", "P25"),
        (r"\bfather\b", "P22"),
        (r"\bsiblings?\b|\bbrothers?\b|\bsisters?\b", "P3373"),
        (r"\bchild(ren)?\b|\bsons?\b|\bdaughters?\b", "P40"),
        (r"\b(record )?label\b", "P264"),
        (r"\bnamed (after|for)\b|\bcalled after\b", "P138"),
        (r"\barchitect\b", "P84"),
        (r"\bcomposer\b|\bcomposed\b", "P86"),
        (r"\bcast members?\b|\bstars? of\b|\bstarred\b|\bactors? in\b", "P161"),
        (r"\bdirector\b|\bdirected\b", "P57"),
        (r"\bauthor\b|\bwrote\b|\bwritten by\b", "P50"),
        (r"\bpublisher\b|\bpublished by\b", "P123"),
        (r"\bfounder\b|\bfounded by\b", "P112"),
        (r"\bcreator\b|\bcreated by\b", "P170"),
        (r"\bperformer\b|\bperformed by\b", "P175"),
        (
            r"\bmanufacturer\b|\bmanufactured\b|\bproduced by\b|\bdeveloper\b|\bdeveloped by\b",
            "P176",
        ),
        (r"\bheadquarter", "P159"),
        (r"\bplace of birth\b|\bbirthplace\b|\bborn\b", "P19"),
        (r"\bplace of death\b|\bdied\b|\bdie\b", "P20"),
        (r"\bcountry of citizenship\b|\bcitizen", "P27"),
        (r"\bemployer\b|\bemployed\b|\bwork(s|ed)? for\b", "P108"),
        (r"\bowner\b|\bowned by\b", "P127"),
        (r"\bnetwork\b|\bbroadcaster\b|\baired\b|\bchannel\b", "P449"),
        (r"\bofficial language\b", "P37"),
        (r"\bnative language\b|\bmother tongue\b", "P103"),
        (r"\boriginal language\b|\blanguage of\b|\bwritten in\b", "P364"),
        (r"\bteam\b|\bclub\b", "P54"),
        (r"\bcollege\b|\buniversity\b|\beducated\b|\bschool\b|\balma mater\b", "P69"),
        (r"\baward\b|\bprize\b", "P166"),
        (r"\bmember of\b", "P463"),
        (r"\bcontinent\b", "P30"),
        (r"\blocated\b|\blocation\b|\bwhat (state|country|city|region|county)\b", "P131"),
    )
)


def question_relation(template: str) -> str | None:
    """The relation of a zsRE / KnowEdit prompt ("{}" for the subject) by `QUESTION_RULES`;
    None for a question about a date, number or class (`NO_REVERSE`) or one no rule knows."""
    if NO_REVERSE.search(template):
        return None
    for pattern, rid in QUESTION_RULES:
        if pattern.search(template):
            return rid
    return None


def question_reverse(template: str, subject: str, target: str) -> tuple[Probe, ...]:
    """The reverse probe of a zsRE / KnowEdit edit, by the relation its prompt asks about."""
    rid = question_relation(template)
    return probe(None if rid is None else RELATIONS[rid].reverse, subject, target)
