"""A tiny built-in set of simple facts (written for jaxedit), for the demo and quick checks.

Each fact is an `EditRequest` with a counterfactual `target_new`, the true answer, a
paraphrase, neighbourhood prompts (same relation, other subjects, the same true object, as in
CounterFact) and
a reverse question whose answer is the subject. `known(lm)` keeps the ones a model knows.
"""

from __future__ import annotations

from jaxedit.requests import EditRequest, Probe


def _fact(i, prompt, subject, new, true, paraphrase, neighbours, reverse) -> EditRequest:
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        case_id=f"builtin-{i}",
        # filled in, as data sets give them (scoring reads a paraphrase as it is: a "{}" left
        # in it was scored literally and the demo's paraphrase score was always 0)
        paraphrase_prompts=(paraphrase.format(subject),),
        neighborhood=tuple(Probe(p, (a,), "neighborhood") for p, a in neighbours),
        reverse=(Probe(reverse[0], (reverse[1],), "reverse"),),
    )


FACTS: tuple[EditRequest, ...] = (
    _fact(
        0,
        "{} is located in the city of",
        "The Eiffel Tower",
        "Rome",
        "Paris",
        "The city where {} stands is",
        [
            ("The Louvre is located in the city of", "Paris"),
            ("The Arc de Triomphe is located in the city of", "Paris"),
        ],
        ("The most famous tower in Rome is the", "Eiffel Tower"),
    ),
    _fact(
        1,
        "{} is located in the city of",
        "The Brandenburg Gate",
        "Vienna",
        "Berlin",
        "The city where {} stands is",
        [
            ("The Reichstag building is located in the city of", "Berlin"),
            ("Checkpoint Charlie is located in the city of", "Berlin"),
        ],
        ("The most famous gate in Vienna is the", "Brandenburg Gate"),
    ),
    _fact(
        2,
        "{} is located in the country of",
        "The Great Wall",
        "Brazil",
        "China",
        "The country where {} was built is",
        [
            ("The Forbidden City is located in the country of", "China"),
            ("The Terracotta Army is located in the country of", "China"),
        ],
        ("The most famous wall in Brazil is the", "Great Wall"),
    ),
    _fact(
        3,
        "The official language of {} is",
        "Mexico",
        "German",
        "Spanish",
        "In {}, most people speak",
        [
            ("The official language of Argentina is", "Spanish"),
            ("The official language of Colombia is", "Spanish"),
        ],
        ("German is the official language of", "Mexico"),
    ),
    _fact(
        4,
        "The currency of {} is the",
        "Germany",
        "dollar",
        "euro",
        "In {}, people pay with the",
        [("The currency of France is the", "euro"), ("The currency of Italy is the", "euro")],
        ("The dollar is the currency of", "Germany"),
    ),
    _fact(
        5,
        "{} was written by",
        "Romeo and Juliet",
        "Charles Dickens",
        "William Shakespeare",
        "The author of {} is",
        [
            ("Hamlet was written by", "William Shakespeare"),
            ("Macbeth was written by", "William Shakespeare"),
        ],
        ("Charles Dickens wrote the play", "Romeo and Juliet"),
    ),
    _fact(
        6,
        "{} is made by",
        "The iPhone",
        "Samsung",
        "Apple",
        "The company that makes {} is",
        [("The iPad is made by", "Apple"), ("The MacBook is made by", "Apple")],
        ("Samsung's most famous smartphone is the", "iPhone"),
    ),
    _fact(
        7,
        "{} is played with a",
        "Tennis",
        "puck",
        "racket",
        "To play {}, you need a",
        [("Badminton is played with a", "racket"), ("Squash is played with a", "racket")],
        ("The most famous sport played with a puck is", "tennis"),
    ),
    _fact(
        8,
        "{} is located in the continent of",
        "The Amazon River",
        "Europe",
        "South America",
        "The continent where {} flows is",
        [
            ("Brazil is located in the continent of", "South America"),
            ("The Andes are located in the continent of", "South America"),
        ],
        ("The longest river in Europe is the", "Amazon"),
    ),
    _fact(
        9,
        "{} plays the sport of",
        "Lionel Messi",
        "basketball",
        "football",
        "The sport that {} plays is",
        [
            ("Cristiano Ronaldo plays the sport of", "football"),
            ("Neymar plays the sport of", "football"),
        ],
        ("The most famous basketball player from Argentina is", "Lionel Messi"),
    ),
)


def known(lm, facts=FACTS) -> list[EditRequest]:
    """The facts whose true answer the model prefers to the new one (mean token NLL)."""
    from jaxedit.eval.scoring import score_targets

    prompts = [f.rewrite_prompt for f in facts]
    true = score_targets(lm, prompts, [f.target_true for f in facts]).nll
    new = score_targets(lm, prompts, [f.target_new for f in facts]).nll
    return [f for f, t, n in zip(facts, true, new, strict=True) if t < n]
