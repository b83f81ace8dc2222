"""The general block (jaxedit.eval.general): perplexity against a hand computation (plain and
after a context edit), known-facts accuracy, fluency, the shipped WikiText slice, fact
sampling, and the block on the embedded model (`none` keeps it, a broken weight moves it)."""

from __future__ import annotations

import json
import os
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import methods
from jaxedit.edits import ContextEdit, WeightDelta, WeightEdit, apply
from jaxedit.errors import InputError
from jaxedit.eval import datasets, general, report, runner, scoring
from jaxedit.eval.general import GeneralSuite
from jaxedit.eval.generation import Decoding, generate_texts
from jaxedit.eval.metrics import fluency
from jaxedit.locate import facts
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import forward, init_params

TEXT = (
    " The quick brown fox jumps over the lazy dog . A second sentence follows , with a comma "
    "and more words to make the text longer than two windows of sixteen tokens , and a "
    "third clause so that a third , shorter window is left at its end .\n"
)


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


def window_nll(lm, lead: list[int], window: list[int]) -> list[float]:
    """NLL of window[1:] after lead + window[:1] .. by a plain full forward."""
    seq = lead + window
    logits = forward(lm.config, lm.params, jnp.asarray([seq])).logits[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    first = len(lead)  # position of window[0]; it predicts window[1]
    return [-float(logp[first + j, window[j + 1]]) for j in range(len(window) - 1)]


def test_perplexity_equals_a_hand_computation(tiny):
    ids = tiny.tokenizer.encode_continuation(TEXT)[:40]
    assert len(ids) == 40
    lead = [tiny.tokenizer.bos_id] if tiny.tokenizer.add_bos else []
    nll = [x for i in range(0, 40, 16) for x in window_nll(tiny, lead, ids[i : i + 16])]
    assert len(nll) == 15 + 15 + 7  # the first token of each window is not predicted
    want = float(np.exp(np.mean(nll)))
    got = general.perplexity(tiny, TEXT, window=16, max_tokens=40)
    assert got == pytest.approx(want, rel=1e-4)
    # token by token, in order (what benchmarks/collateral.py splits perplexity with)
    np.testing.assert_allclose(general.token_nll(tiny, ids, window=16), nll, rtol=1e-4, atol=1e-5)
    # the cap counts tokens of the text: 32 tokens = the first two windows only
    two = float(np.exp(np.mean(nll[:30])))
    assert general.perplexity(tiny, TEXT, window=16, max_tokens=32) == pytest.approx(two, rel=1e-4)


def test_perplexity_after_a_context_edit_reads_the_context(tiny):
    ctx = ContextEdit(("The Eiffel Tower is located in the city of Rome",), (), 8)
    lm2 = apply(tiny, ctx)
    head = tiny.tokenizer.encode(lm2.context_text().rstrip(" "))
    ids = tiny.tokenizer.encode_continuation(TEXT)[:32]
    nll = [x for i in (0, 16) for x in window_nll(tiny, head, ids[i : i + 16])]
    got = general.perplexity(lm2, TEXT, window=16, max_tokens=32)
    assert got == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)
    assert got != pytest.approx(general.perplexity(tiny, TEXT, window=16, max_tokens=32))


def test_known_facts_accuracy_is_token_accuracy(tiny):
    """Mean over facts of the fraction of answer tokens that are the teacher-forced argmax."""
    pairs = [
        ("The Eiffel Tower is located in the city of", "Paris"),
        ("Danielle Darrieux's mother tongue is", "French language"),
    ]
    per_fact = []
    for prompt, answer in pairs:
        p = tiny.tokenizer.encode(prompt)
        a = tiny.tokenizer.encode_continuation(" " + answer)
        logits = forward(tiny.config, tiny.params, jnp.asarray([p + a[:-1]])).logits[0]
        pred = np.asarray(jnp.argmax(logits, axis=-1))[len(p) - 1 :]
        per_fact.append(float(np.mean(pred == np.array(a))))
    assert general.known_facts_accuracy(tiny, pairs) == pytest.approx(np.mean(per_fact))
    with pytest.raises(InputError, match="no known facts"):
        general.known_facts_accuracy(tiny, [])


def test_fluency_is_ngram_entropy_of_greedy_texts(tiny):
    prompts = general.FLUENCY_PROMPTS[:2]
    texts = generate_texts(tiny, prompts, Decoding(top_k=1, max_out_len=20))
    assert general.fluency(tiny, prompts, 20) == pytest.approx(fluency(texts))


def test_shipped_slice_is_the_start_of_wikitext2_test(data_dir):
    text = general.default_text()
    raw = open(os.path.join(data_dir, "wikitext", "wiki.test.raw"), encoding="utf-8").read()
    assert raw.startswith(text) and text.count("\n") == 79
    assert text.startswith(" \n = Robert Boulter = \n")
    notice = resources.files("jaxedit.data").joinpath("WIKITEXT_LICENSE.txt").read_text()
    assert "CC BY-SA 3.0" in notice and "Merity" in notice


def test_facts_from_requests_excludes_edited_cases_and_prompts(data_dir):
    ds = datasets.load(os.path.join(data_dir, "counterfact", "counterfact-edit.json"), n=400)
    edited = ds.requests[:5]
    got = general.facts_from_requests(ds.requests, edited, n=200)
    assert len(got) == 200 and got == general.facts_from_requests(ds.requests, edited, n=200)
    assert not {r.rewrite_prompt for r in edited} & {p for p, _ in got}
    truth = {r.rewrite_prompt: r.target_true for r in ds.requests}
    assert all(truth[p] == a for p, a in got)  # prompt -> its ground truth
    order = [p for p, _ in got]
    assert order == [r.rewrite_prompt for r in ds.requests if r.rewrite_prompt in set(order)]
    other = general.facts_from_requests(ds.requests, edited, n=200, seed=1)
    assert other != got  # seeded
    few = general.facts_from_requests(ds.requests[:10], edited, n=200)
    assert len(few) == 5  # fewer records than asked: all of them


def test_load_known_facts(data_dir, tmp_path):
    path = os.path.join(data_dir, "counterfact", "known_1000.json")
    got = general.load_known_facts(path, n=50)
    recs = json.load(open(path))
    by_prompt = {r["prompt"]: r["attribute"] for r in recs}
    assert len(got) == 50 and all(by_prompt[p] == a for p, a in got)  # attribute, not prediction
    cf = general.load_known_facts(os.path.join(data_dir, "counterfact", "counterfact-edit.json"))
    assert len(cf) == 200  # an editing data set: rewrite prompt -> target_true
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "Paris is in", "attribute": ""}]))
    with pytest.raises(InputError, match="record 0 has none of"):
        general.load_known_facts(bad)
    bad.write_text(json.dumps([{"question": "x"}]))
    with pytest.raises(InputError, match="cannot tell the data format"):
        general.load_known_facts(bad)


def test_known_to_keeps_the_facts_the_model_completes(smollm, tmp_path, monkeypatch):
    """`known_to` keeps exactly the candidates whose every answer token is the model's argmax,
    in order, stops scoring once it has `n`, and `cached_known_to` reads back what it wrote."""
    real = [(r.rewrite_prompt, r.target_true) for r in facts.FACTS[:6]]
    cands = real + [(p, "Zyqxwv Plorth") for p, _ in real[:3]]
    s = scoring.score_targets(smollm, [p for p, _ in cands], [a for _, a in cands])
    want = [f for f, acc in zip(cands, s.token_acc, strict=True) if acc == 1.0]
    assert 2 <= len(want) < len(cands)  # the model knows some of the facts, not the nonsense
    assert general.known_to(smollm, cands, n=100, chunk=4) == (want, len(cands))
    got, scored = general.known_to(smollm, cands, n=1, chunk=1)
    assert got == want[:1] and scored == cands.index(want[0]) + 1  # stops at the first known
    assert general.known_to(smollm, cands, n=100, max_scored=2)[1] == 2
    assert general.known_facts_accuracy(smollm, want) == 1.0
    with pytest.raises(InputError, match="must be positive"):
        general.known_to(smollm, cands, n=0)

    assert general.cached_known_to(smollm, cands, 100, tmp_path) == (want, len(cands))
    (entry,) = (tmp_path / "known_facts").iterdir()
    monkeypatch.setattr(general, "known_to", lambda *a: pytest.fail("not read from the cache"))
    assert general.cached_known_to(smollm, cands, 100, tmp_path) == (want, len(cands))
    monkeypatch.undo()
    bad = json.loads(entry.read_text()) | {"facts": [["Paris is in", "Texas"]]}
    for damaged in ("{not json", json.dumps(bad)):  # recomputed and rewritten
        entry.write_text(damaged)
        assert general.cached_known_to(smollm, cands, 100, tmp_path) == (want, len(cands))
        assert json.loads(entry.read_text())["facts"] == [list(f) for f in want]


def test_suite_checks_and_names(tmp_path):
    with pytest.raises(InputError, match="empty"):
        GeneralSuite("   ")
    with pytest.raises(InputError, match="not found"):
        GeneralSuite.from_file(tmp_path / "nope.txt")
    (tmp_path / "t.txt").write_text(TEXT)
    assert GeneralSuite.from_file(tmp_path / "t.txt").ppl_name == "ppl"
    d = GeneralSuite.default()
    assert d.ppl_name == "wikitext_ppl" and d.setup()["ppl_max_tokens"] == general.PPL_TOKENS


def test_general_table():
    block = {
        "edited": {"wikitext_ppl": 40.0, "fluency": 5.0},
        "unedited": {"wikitext_ppl": 20.0, "fluency": 5.0},
        "model": "final",
    }
    lines = report.general_table(block).splitlines()
    assert lines[0].startswith("| general (final) | unedited | edited | ratio |")
    assert "| wikitext_ppl | 20.000 | 40.000 | 2.000 |" in lines


# ----------------------------------------------------------------------------- embedded model


def broken(lm, state, requests):
    """A deliberately damaging 'edit': layer 2's MLP output matrix × 5."""
    w = np.asarray(get_weight(lm.params, "mlp_out", 2), np.float32)
    return WeightEdit((WeightDelta("mlp_out", 2, dense=4.0 * w),)), {}


@pytest.mark.slow  # ~40 s: perplexity, known facts and fluency of a 135M model
def test_general_block_on_the_embedded_model(smollm, data_dir):
    """Sane perplexity; `none` leaves the block as it was; a broken weight raises perplexity
    and lowers known-facts accuracy and fluency (the runner's edited block: tests/test_lifelong)."""
    ds = datasets.load(os.path.join(data_dir, "counterfact", "counterfact-edit.json"), n=300)
    edited = [facts.FACTS[0]]
    suite = GeneralSuite.default(
        general.facts_from_requests(ds.requests, edited, n=60),
        "counterfact-edit.json",
        max_tokens=256,
        prompts=general.FLUENCY_PROMPTS[:2],
    )
    none = runner.evaluate(smollm, edited, methods.get("none"), None, general=suite)
    g = none["general"]
    assert g["edited"] == g["unedited"] and g["model"] == "after the last edit"
    assert 10 < g["unedited"]["wikitext_ppl"] < 100  # (measured 34.2 on these 256 tokens)
    assert 0 < g["unedited"]["known_facts_acc"] < 1 and g["unedited"]["fluency"] > 3
    bad = general.measure_general(apply(smollm, broken(smollm, None, edited)[0]), suite)
    assert bad["wikitext_ppl"] > 2 * g["unedited"]["wikitext_ppl"]  # (measured 203 vs 34)
    assert bad["known_facts_acc"] < g["unedited"]["known_facts_acc"]
    assert bad["fluency"] < g["unedited"]["fluency"]
