"""IKE: demonstration format, selection, retrieval, the pool-embedding cache, bad input, the
method through the protocol, the edited fact's own copy demonstration, sequential edits."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import jaxedit as je
from jaxedit.errors import ConfigError, InputError
from jaxedit.methods import ike
from jaxedit.methods import ike_retrieval as retrieval
from jaxedit.models.generate import next_token_logprobs
from jaxedit.requests import EditRequest, Probe


def _req(prompt, subject, new, true, para=(), nb=()):
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=tuple(para),
        neighborhood=tuple(Probe(p, (a,)) for p, a in nb),
    )


POOL = [
    _req(
        "{} is located in the city of",
        "The Colosseum",
        "London",
        "Rome",
        ["Where is the Colosseum? It is in"],
        [("The Pantheon is located in the city of", "Rome")],
    ),
    _req(
        "The mother tongue of {} is",
        "Danielle Darrieux",
        "English",
        "French",
        ["Danielle Darrieux spoke"],
        [("The mother tongue of Jean Gabin is", "French")],
    ),
    _req(
        "{} plays the",
        "Toko Yasuda",
        "piano",
        "guitar",
        ["Toko Yasuda is a musician who plays the"],
        [("Jimi Hendrix plays the", "guitar")],
    ),
]
EDIT = _req(
    "{} is located in the city of",
    "The Eiffel Tower",
    "Rome",
    "Paris",
    ["The Eiffel Tower can be found in"],
    [("The Louvre is located in the city of", "Paris")],
)
EDIT2 = _req(
    "{} plays the",
    "Lionel Messi",
    "violin",
    "football",
    ["Lionel Messi is a musician who plays the"],
    [("Jimi Hendrix plays the", "guitar")],
)
F_EDIT = "The Eiffel Tower is located in the city of Rome"


class FakeEmbedder:
    """Fixed vectors by text: similarity is known exactly."""

    key = "fake/v1"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.array([self.table[t] for t in texts], np.float32)


# The edit's fact is nearest to the Colosseum record, then piano, then mother tongue; the second
# edit's fact (Messi) is nearest to piano, then mother tongue, then the Colosseum.
VECS = {
    ike.fact(POOL[0]): [1.0, 0.1, 0.0],
    ike.fact(POOL[1]): [0.0, 1.0, 0.0],
    ike.fact(POOL[2]): [0.6, 0.0, 0.8],
    ike.fact(EDIT): [1.0, 0.0, 0.0],
    ike.fact(EDIT2): [0.0, 0.45, 0.9],
}


def _state(**hp) -> ike.IKEState:
    pool = retrieval.Pool.from_requests(POOL)
    keys = [ike.fact(r) for r in POOL]
    retr = retrieval.EmbeddingRetriever(
        FakeEmbedder(VECS), np.array([VECS[t] for t in keys]), center=False
    )
    return ike.IKEState(ike.IKEHparams(**{"k": 3, "mix": (1, 1, 1), **hp}), pool, retr)


def _compute(lm, reqs=(EDIT,), **hp):
    return ike.METHOD.compute(lm, _state(**hp), list(reqs))


# ----------------------------------------------------------------------------- format


def test_demonstration_strings():
    d = ike.demonstrations(POOL[0])
    f = "The Colosseum is located in the city of London"
    assert d["copy"] == [f"New Fact: {f}\nPrompt: {f}\n\n"]
    assert d["update"] == [f"New Fact: {f}\nPrompt: Where is the Colosseum? It is in London\n\n"]
    assert d["retain"] == [
        f"New Fact: {f}\nPrompt: The Pantheon is located in the city of Rome\n\n"
    ]


RETRIEVED = (
    "New Fact: The mother tongue of Danielle Darrieux is English\n"
    "Prompt: The mother tongue of Danielle Darrieux is English\n\n"  # copy
    "New Fact: Toko Yasuda plays the piano\n"
    "Prompt: Jimi Hendrix plays the guitar\n\n"  # retain: neighbour + its true answer
    "New Fact: The Colosseum is located in the city of London\n"
    "Prompt: Where is the Colosseum? It is in London\n\n"  # update: paraphrase + new
)
OWN = f"New Fact: {F_EDIT}\nPrompt: {F_EDIT}\n\n"
HEAD = f"New Fact: {F_EDIT}\nPrompt: "


def test_golden_context_with_the_facts_own_copy(smollm):
    """k = 3, mix 1:1:1 on the hand-made pool: least similar first, then the edited fact's own
    copy demonstration (the paper's icl.py appends it; the old code left it out), then the
    fact and the query lead."""
    edit, info = _compute(smollm)
    assert isinstance(edit, je.ContextEdit) and edit.facts == (F_EDIT,)
    assert edit.render(smollm.tokenizer, 10_000) == RETRIEVED + OWN + HEAD
    assert [d.source for d in edit.demonstrations] == [1, 2, 0, -1]  # ascending similarity
    sims = [d.similarity for d in edit.demonstrations]
    assert sims == sorted(sims) and sims[-1] == 1.0
    assert info["k"] == 4 and info["own_copy"] and info["dropped"] == 0
    assert (info["n_copy"], info["n_update"], info["n_retain"]) == (2, 1, 1)
    assert info["context_tokens"] == len(smollm.tokenizer.encode(RETRIEVED + OWN + HEAD))


def test_copy_own_fact_off(smollm):
    edit, info = _compute(smollm, copy_own_fact=False)
    assert edit.render(smollm.tokenizer, 10_000) == RETRIEVED + HEAD
    assert not info["own_copy"] and info["k"] == 3


def test_zero_demo_and_k0(smollm):
    zero, info = _compute(smollm, zero_demo=True)
    assert zero.demonstrations == () and info["zero_demo"]
    assert zero.render(smollm.tokenizer, 10_000) == HEAD
    own_only, _ = _compute(smollm, k=0)
    assert own_only.render(smollm.tokenizer, 10_000) == OWN + HEAD


def test_mix_counts():
    assert ike.mix_counts(32) == (4, 12, 16)  # the paper
    assert ike.mix_counts(8) == (1, 3, 4)
    assert sum(ike.mix_counts(5)) == 5
    assert ike.mix_counts(6, (1, 0, 0)) == (6, 0, 0)
    for bad in [(1, 2), (-1, 1, 1), (0, 0, 0)]:
        with pytest.raises(InputError):
            ike.mix_counts(4, bad)


def test_kinds_follow_mix_and_seed(smollm):
    a, _ = _compute(smollm, mix=(0, 0, 1), copy_own_fact=False)
    assert [d.kind for d in a.demonstrations] == ["retain"] * 3
    b, _ = _compute(smollm)
    assert b == _compute(smollm)[0]  # deterministic per edit and seed
    kinds = {tuple(d.kind for d in _compute(smollm, seed=s)[0].demonstrations) for s in range(8)}
    assert len(kinds) > 1  # the seed moves the kinds


def test_reserve_tokens_cover_the_longest_query(smollm):
    edit, _ = _compute(smollm)
    tok = smollm.tokenizer
    longest = max(
        len(tok.encode_continuation(" " + t))
        for t in [
            "The Eiffel Tower is located in the city of Rome",
            "The Eiffel Tower can be found in Paris",
            "The Louvre is located in the city of Rome",
        ]
    )
    assert edit.reserve_tokens == longest


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_true_nearest_neighbours():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 6)).astype(np.float32)
    texts = [f"t{i}" for i in range(40)]
    emb = FakeEmbedder({**dict(zip(texts, vecs.tolist(), strict=True)), "q": vecs[7] + 0.1})
    for center in (False, True):
        r = retrieval.EmbeddingRetriever(emb, vecs, center=center)
        sim = r.similarity(["q"])[0]
        mean = vecs.mean(0) if center else 0
        x, q = vecs - mean, vecs[7] + 0.1 - mean
        want = (x @ q) / np.linalg.norm(x, axis=1) / np.linalg.norm(q)
        np.testing.assert_allclose(sim, want, atol=1e-5)
        assert int(np.argmax(sim)) == 7
        assert list(np.argsort(-sim)[:5]) == list(np.argsort(-want)[:5])


def test_nearest_skips_the_edits_own_record():
    pool = retrieval.Pool.from_requests([*POOL, EDIT])
    sim = np.array([0.5, 0.1, 0.3, 1.0])
    assert ike.nearest(EDIT, pool, sim, 3) == [0, 2, 1]


def test_tfidf_retrieval():
    pool = [
        "The capital of France is Paris",
        "Michael Jordan plays basketball",
        "The capital of Italy is Rome",
        "Toko Yasuda plays the guitar",
    ]
    r = retrieval.TfidfRetriever(pool)
    sim = r.similarity(["The capital of Spain is Madrid", "Who plays basketball"])
    assert set(np.argsort(-sim[0])[:2]) == {0, 2}
    assert int(np.argmax(sim[1])) == 1
    np.testing.assert_allclose(r.similarity([pool[3]])[0, 3], 1.0, atol=1e-6)


def test_hidden_state_embedder_neighbours(smollm):
    """The default embedder groups facts by relation: each query's 3 nearest share its theme."""
    pool = [
        "The capital of France is Paris",
        "The capital of Germany is Berlin",
        "The capital of Spain is Madrid",
        "Michael Jordan plays basketball",
        "Serena Williams plays tennis",
        "Lionel Messi plays soccer",
        "The mother tongue of Jean Gabin is French",
        "The mother tongue of Sophia Loren is Italian",
        "The mother tongue of Pablo Picasso is Spanish",
    ]
    queries = [
        "The capital of Japan is Tokyo",
        "Roger Federer plays tennis",
        "The mother tongue of Danielle Darrieux is English",
    ]
    emb = retrieval.HiddenStateEmbedder(smollm, layer=4)
    vecs = emb(pool)
    assert vecs.shape == (9, smollm.config.d_model)
    np.testing.assert_allclose(emb(pool[:1])[0], vecs[0], atol=1e-4)  # batch-independent
    sim = retrieval.EmbeddingRetriever(emb, vecs).similarity(queries)
    for theme, row in enumerate(sim):
        assert set(np.argsort(-row)[:3]) == {3 * theme, 3 * theme + 1, 3 * theme + 2}


def test_pool_cache_is_reused_and_keyed(tmp_path):
    emb = FakeEmbedder(VECS)
    texts = list(VECS)[:3]
    a = retrieval.cached_embeddings(emb, texts, "digest-a", tmp_path)
    b = retrieval.cached_embeddings(emb, texts, "digest-a", tmp_path)
    assert emb.calls == 1
    np.testing.assert_array_equal(a, b)
    retrieval.cached_embeddings(emb, texts, "digest-b", tmp_path)  # another pool file: recompute
    assert emb.calls == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # no temporaries left
    (tmp_path / files[0]).write_bytes(b"garbage")  # a corrupt cache is recomputed
    retrieval.cached_embeddings(emb, texts, "digest-a", tmp_path)
    retrieval.cached_embeddings(emb, texts, "digest-b", tmp_path)
    assert emb.calls == 3


# ----------------------------------------------------------------------------- bad input


def test_bad_hparams_and_pools(tmp_path, smollm):
    m = je.methods.get("ike")
    for bad in [{"k": -1}, {"mix": (1, 2)}, {"embedder": "bert"}, {"max_context": 0}]:
        with pytest.raises(ConfigError):
            m.hparams("smollm2-135m", **bad)
    with pytest.raises(ConfigError, match="unknown"):
        m.hparams("smollm2-135m", demo="x.json")
    with pytest.raises(InputError, match="demos=PATH"):
        m.prepare(smollm, m.hparams("smollm2-135m"))
    with pytest.raises(InputError, match="cannot read"):
        m.prepare(smollm, m.hparams("smollm2-135m", demos=str(tmp_path / "missing.json")))
    with pytest.raises(InputError):
        retrieval.TfidfRetriever([])
    with pytest.raises(InputError):
        retrieval.EmbeddingRetriever(FakeEmbedder({}), np.zeros((0, 3)))


def test_context_too_long_drops_least_similar_demos(smollm):
    full, info = _compute(smollm)
    n = info["context_tokens"]  # the context alone fits, the queries then do not
    edit, info = _compute(smollm, max_context=n)
    assert 0 < info["dropped"] <= 4
    # The most similar demonstrations stay (the own copy last of all); the fact is intact.
    assert edit.demonstrations == full.demonstrations[info["dropped"] :]
    assert edit.render(smollm.tokenizer, n).endswith(HEAD)
    with pytest.raises(InputError, match="more than"):
        _compute(smollm, max_context=10)


# ----------------------------------------------------------------------------- the protocol


def _pool_file(tmp_path):
    recs = [
        {
            "case_id": i,
            "prompt": r.rewrite_prompt,
            "subject": r.subject,
            "target_new": r.target_new,
            "ground_truth": r.target_true,
            "rephrase_prompt": r.paraphrase_prompts[0],
            "locality_prompt": r.neighborhood[0].prompt,
            "locality_ground_truth": r.neighborhood[0].answers[0],
        }
        for i, r in enumerate(POOL)
    ]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(recs))
    return str(path)


def test_protocol_on_the_hand_made_pool(smollm, tmp_path):
    m = je.methods.get("ike")
    hp = m.hparams("smollm2-135m", demos=_pool_file(tmp_path), k=2, embedder="tfidf")
    edit, info = m.compute(smollm, m.prepare(smollm, hp), [EDIT])
    assert info["k"] == 3 and info["own_copy"]
    # TF-IDF: the Colosseum record shares "is located in the city of" with the edit; it sits
    # right before the edit's own copy.
    assert [d.source for d in edit.demonstrations][-2:] == [0, -1]
    lm2 = je.apply(smollm, edit)
    assert smollm.context is None and lm2.params is smollm.params
    assert lm2.context_text() == edit.render(smollm.tokenizer, smollm.config.max_positions)


def test_protocol_raises_p_rome(smollm, data_dir):
    """The acceptance path: hparams -> prepare -> compute -> apply, with the preset (k = 8,
    the own copy) on CounterFact's training split; the edited model (its context in a KV
    cache) puts more mass on " Rome" after the rewrite prompt (measured: -5.17 -> -3.51)."""
    m = je.methods.get("ike")
    pool = f"{data_dir}/counterfact/counterfact-train.json"
    hp = m.hparams("smollm2-135m", demos=pool, pool_size=2000, embedder="tfidf")
    req = je.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    edit, info = m.compute(smollm, m.prepare(smollm, hp), [req])
    assert info["k"] == 9 and info["dropped"] == 0
    rome = smollm.tokenizer.encode_continuation(" Rome")[0]
    before = float(next_token_logprobs(smollm, [req.rewrite_prompt])[0, rome])
    after = float(next_token_logprobs(je.apply(smollm, edit), [req.rewrite_prompt])[0, rome])
    assert after > before + 1.0


def test_prepare_caches_pool_embeddings_under_cache_dir(smollm, tmp_path):
    m = je.methods.get("ike")
    hp = m.hparams("smollm2-135m", demos=_pool_file(tmp_path), k=2)
    cache = tmp_path / "cache"
    a = m.prepare(smollm, hp, cache_dir=str(cache))
    (f,) = cache.iterdir()
    stamp = f.stat().st_mtime_ns
    b = m.prepare(smollm, hp, cache_dir=str(cache))
    assert [p.name for p in cache.iterdir()] == [f.name] and f.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(a.retriever.pool, b.retriever.pool)
    with pytest.warns(UserWarning, match="pool size"):
        m.prepare(smollm, dataclasses.replace(hp, k=10, embedder="tfidf"))


# ----------------------------------------------------------------------------- sequential


def test_sequential_edits_compose_into_one_well_formed_context(smollm):
    """Two IKE edits in sequence give one context: every demonstration, then both facts, then
    one query lead (the old runner joined two contexts into "…Prompt: New Fact: …"); it fits
    the model, and a shorter model drops the least similar demonstrations of both edits first."""
    tok = smollm.tokenizer
    e1, _ = _compute(smollm, [EDIT])
    e2, _ = _compute(smollm, [EDIT2])
    lm2 = je.apply(je.apply(smollm, e1), e2)
    text = lm2.context_text()
    f2 = ike.fact(EDIT2)
    assert text.endswith(f"\nNew Fact: {F_EDIT}\nNew Fact: {f2}\nPrompt: ")
    assert "Prompt: New Fact" not in text
    demos = lm2.context.demonstrations
    assert text.count("Prompt: ") == len(demos) + 1
    assert {d.text for d in demos} == {d.text for d in e1.demonstrations + e2.demonstrations}
    assert len(tok.encode(text)) + lm2.context.reserve_tokens <= smollm.config.max_positions

    # A model whose length leaves room for only three demonstrations keeps the three most
    # similar of both edits (the two own copies, similarity 1, and the next one).
    by_sim = sorted(demos, key=lambda d: d.similarity)
    keep = by_sim[-3:]
    head = e1.compose(e2).head()
    need = len(tok.encode("".join(d.text for d in demos if d in keep) + head))
    short = dataclasses.replace(
        lm2, config=dataclasses.replace(smollm.config, max_positions=need + e2.reserve_tokens)
    )
    kept, dropped = short.context.fit(tok, short.config.max_positions)
    assert dropped == len(demos) - 3
    assert sorted(kept, key=lambda d: d.similarity) == sorted(keep, key=lambda d: d.similarity)
    assert short.context_text().endswith(f"New Fact: {F_EDIT}\nNew Fact: {f2}\nPrompt: ")
