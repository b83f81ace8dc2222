"""Answer metrics by generation (`*_gen`): the normalisation and prefix match on hand-built
continuations, the per-case metrics from hand-built continuations, the batched greedy decoding
(equal to one-prompt generation, independent of its batch), and the runner's rows."""

from __future__ import annotations

import dataclasses

import pytest

from jaxedit import methods
from jaxedit.edits import ContextEdit, apply
from jaxedit.eval import generation, measure, metrics, runner
from jaxedit.eval.measure import GenScore, gen_case_metrics, gen_queries, measure_generated
from jaxedit.models.generate import generate
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import init_params
from jaxedit.requests import EditRequest, Probe

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "text, norm",
    [
        ("  Paris ", "paris"),
        ("PARIS", "paris"),
        ("Paris,\n\tFrance.", "paris france"),
        ("English-speaking", "english speaking"),
        ("Québec", "quebec"),
        ("São Paulo", "sao paulo"),
        ("the United States", "united states"),
        ("The Hague", "hague"),
        ("a guitar", "guitar"),
        ("An Tai", "tai"),
        ("theatre", "theatre"),  # an article only as a whole word
        ("Toys_R_Us", "toys r us"),
        ("!!!", ""),
    ],
)
def test_normalize_answer(text, norm):
    assert metrics.normalize_answer(text) == norm


@pytest.mark.parametrize(
    "continuation, answers, hit",
    [
        (" Paris, France. It is", ["Paris"], True),  # prefix, then punctuation
        (" Paris", ["Paris"], True),  # exactly the answer
        (" paris is", ["Paris"], True),  # case
        ("\n Paris\n", ["Paris"], True),  # whitespace
        (" Parisian food", ["Paris"], False),  # not at a word boundary
        (" the city of Paris", ["Paris"], False),  # begins with something else
        (" France", ["Paris"], False),
        (" the United States of America", ["United States"], True),  # leading article
        (" U.S. Army", ["U.S."], True),  # punctuation inside the answer
        (" Quebec City", ["Québec"], True),  # accents
        (" New York City", ["New York"], True),
        (" New", ["New York"], False),  # a continuation cut inside the answer
        (" Holland is", ["Netherlands", "Holland"], True),  # an alias
        (" Holland is", ["Netherlands"], False),
        (" anything", ["..."], False),  # an answer that normalises to nothing
        ("", ["Paris"], False),
    ],
)
def test_generated_match(continuation, answers, hit):
    assert metrics.generated_match(continuation, answers) is hit


# ----------------------------------------------------------------------------- per case

REQ = EditRequest(
    prompt="{} is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    case_id="x",
    paraphrase_prompts=("Where is the Eiffel Tower? In", "The Eiffel Tower stands in"),
    neighborhood=(
        Probe("The Louvre is located in the city of", ("Paris",), "neighborhood"),  # CounterFact
        Probe("Big Ben is located in the city of", ("London", "Westminster"), "other"),
    ),
    portability=(
        Probe("The Eiffel Tower is in the country of", ("Italy",), "Reasoning"),
        Probe("The Tour Eiffel is in the city of", ("Rome",), "Subject_Aliasing"),
        Probe("The tower's country's capital is", ("Rome",), "Reasoning"),
    ),
    reverse=(Probe("Rome is home to", ("The Eiffel Tower",), "reverse"),),
)


def _scores(texts: dict) -> dict:
    answers = {key: a for key, _, a in gen_queries(REQ)}
    return {k: GenScore(t, metrics.generated_match(t, answers[k])) for k, t in texts.items()}


POST = _scores(
    {
        ("rw", 0): " Rome, Italy.",
        ("pp", 0): " Rome",
        ("pp", 1): " the heart of Paris",
        ("nb", 0): " Rome.",  # the CounterFact neighbour lost its true object
        ("nb", 1): " westminster, London",  # the second alias
        ("port", 0): " Italy",
        ("port", 1): " Paris",
        ("port", 2): " Rome!",
        ("rev", 0): " the Eiffel Tower",
    }
)
PRE = _scores(
    {
        ("rw", 0): " Paris",
        ("pp", 0): " Paris",
        ("pp", 1): " Paris",
        ("nb", 0): " Paris.",
        ("nb", 1): " Westminster, London",
        ("port", 0): " France",
        ("port", 1): " Paris",
        ("port", 2): " Paris",
        ("rev", 0): " many tourists",
    }
)


def test_gen_queries_list_every_prompt_with_its_answers():
    q = {key: (p, a) for key, p, a in gen_queries(REQ)}
    assert q[("rw", 0)] == ("The Eiffel Tower is located in the city of", ("Rome",))
    assert q[("pp", 1)] == ("The Eiffel Tower stands in", ("Rome",))
    assert q[("nb", 1)] == ("Big Ben is located in the city of", ("London", "Westminster"))
    assert q[("rev", 0)] == ("Rome is home to", ("The Eiffel Tower",))
    assert len(q) == 1 + 2 + 2 + 3 + 1


def test_gen_case_metrics_from_hand_built_continuations():
    m = gen_case_metrics(REQ, POST, PRE)
    assert m == {
        "efficacy_gen": 1.0,
        "paraphrase_gen": 0.5,
        "specificity_gen": 0.5,  # the neighbour lost Paris; Big Ben says an alias
        "neighborhood_gen": 0.0,  # only the CounterFact neighbour
        "locality_gen": 0.5,  # Big Ben's continuation is unchanged (case aside), the Louvre's not
        "portability_gen": pytest.approx(2 / 3),
        "portability/Reasoning_gen": 1.0,
        "portability/Subject_Aliasing_gen": 0.0,
        "reverse_gen": 1.0,
    }
    unedited = gen_case_metrics(REQ, PRE, PRE)
    assert unedited["efficacy_gen"] == 0.0 and unedited["neighborhood_gen"] == 1.0
    assert unedited["locality_gen"] == 1.0
    assert "locality_gen" not in gen_case_metrics(REQ, POST)  # needs the unedited model's


def test_gen_case_metrics_of_a_bare_request():
    r = EditRequest(prompt="{} plays", subject="Tom", target_new="jazz")
    m = gen_case_metrics(r, {("rw", 0): GenScore(" jazz", True)})
    assert m == {"efficacy_gen": 1.0}


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=1), smollm.tokenizer)


PROMPTS = [
    "The capital of France is",
    "Danielle Darrieux's mother tongue is ",  # a trailing space is dropped
    "Toyota Camry is produced by",
    "Rome is home to",
    "A very much longer prompt about the city in which the Eiffel Tower stands, namely",
]


@pytest.mark.slow  # test_greedy_ids_in_several_chunks checks the same ids by default
def test_greedy_ids_equal_one_prompt_generation(tiny):
    n_new = [3, 5, 9, 1, 4]
    ids = generation.greedy_ids(tiny, PROMPTS, n_new)
    assert [len(i) for i in ids] == n_new
    for p, i, n in zip(PROMPTS, ids, n_new, strict=True):
        alone = generation.greedy_ids(tiny, [p], [n])[0]
        assert i == alone  # the batch does not change a row
        # the KV-cached greedy generator of jaxedit.models.generate (stops at EOS; ours not)
        text = generate(tiny, p.rstrip(), max_new_tokens=n)
        assert tiny.tokenizer.decode(i).startswith(text)


def test_greedy_ids_read_a_context_edit(tiny):
    """An IKE-style context runs once into a KV cache: the same continuations as the plain
    model on context + prompt."""
    fact = "The Eiffel Tower is located in the city of Rome"
    edited = apply(tiny, ContextEdit((fact,), reserve_tokens=16))
    ctx = edited.context_text()
    got = generation.greedy_ids(edited, PROMPTS[:3], [4, 6, 2])
    assert got == generation.greedy_ids(tiny, [ctx + p for p in PROMPTS[:3]], [4, 6, 2])


def test_greedy_ids_in_several_chunks(tiny, monkeypatch):
    monkeypatch.setattr(generation, "GREEDY_ROWS", 2)
    chunked = generation.greedy_ids(tiny, PROMPTS, [4] * 5)
    monkeypatch.undo()
    assert chunked == generation.greedy_ids(tiny, PROMPTS, [4] * 5)


def test_greedy_ids_bad_input(tiny):
    from jaxedit.errors import InputError

    with pytest.raises(InputError, match="lengths"):
        generation.greedy_ids(tiny, PROMPTS, [1])
    with pytest.raises(InputError, match="non-empty"):
        generation.greedy_ids(tiny, ["  "], [1])
    with pytest.raises(InputError, match="at least one"):
        generation.greedy_ids(tiny, ["x"], [0])


def test_measure_generated_reads_each_querys_own_length(tiny):
    scores = measure_generated(tiny, [REQ])[0]
    assert set(scores) == {key for key, _, _ in gen_queries(REQ)}
    tok = tiny.tokenizer
    for key, prompt, answers in gen_queries(REQ):
        n = max(len(tok.encode_continuation(" " + a)) for a in answers) + measure.GEN_MARGIN
        ids = generation.greedy_ids(tiny, [prompt], [n])[0]
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        assert scores[key].text == tok.decode(ids)
        assert scores[key].match == metrics.generated_match(scores[key].text, answers)
    # two requests in one call: each gets what it gets alone
    other = dataclasses.replace(REQ, target_new="Berlin Wall Memorial Park", case_id="y")
    both = measure_generated(tiny, [REQ, other])
    assert both[0] == scores


def test_embedded_model_says_what_it_knows(smollm):
    """The unedited model continues "The capital of France is" with Paris, not Rome."""
    r = EditRequest(
        prompt="The capital of {} is",
        subject="France",
        target_new="Rome",
        neighborhood=(Probe("The capital of Germany is", ("Berlin",), "neighborhood"),),
    )
    paris = dataclasses.replace(r, target_new="Paris")
    g_rome, g_paris = measure_generated(smollm, [r, paris])
    assert gen_case_metrics(r, g_rome)["efficacy_gen"] == 0.0
    assert gen_case_metrics(paris, g_paris)["efficacy_gen"] == 1.0
    assert gen_case_metrics(r, g_rome)["specificity_gen"] == 1.0
    assert g_paris[("rw", 0)].text.lstrip().startswith("Paris")


# ----------------------------------------------------------------------------- the runner


def test_runner_rows_carry_generated_metrics(tiny):
    reqs = [REQ, dataclasses.replace(REQ, case_id="y", target_new="Berlin")]
    none = methods.get("none")
    state = none.prepare(tiny, none.hparams())
    res = runner.evaluate(tiny, reqs, none, state, general=False, gen_metrics=True)
    for name in ("efficacy_gen", "paraphrase_gen", "neighborhood_gen", "reverse_gen"):
        assert res["metrics"][name]["n"] == 2
        assert res["metrics"][name] == res["baseline"][name]  # nothing was edited
    assert res["metrics"]["locality_gen"]["mean"] == 1.0
    assert res["metrics"]["portability/Subject_Aliasing_gen"]["n"] == 2
    row = res["cases"][0]
    want = measure_generated(tiny, [REQ])[0]
    assert row["continuations"]["rw/0"] == want[("rw", 0)].text
    assert row["metrics"]["efficacy_gen"] == float(want[("rw", 0)].match)
    assert res["gen_metrics"] == {"margin_tokens": measure.GEN_MARGIN, "decoding": "greedy"}
    off = runner.evaluate(tiny, reqs, none, state, general=False)
    assert "efficacy_gen" not in off["metrics"] and off["gen_metrics"] is None
