"""IKE: demonstration format (golden), retrieval, pool-embedding cache, bad input, the method."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest

from jaxedit.methods import legacy as methods
from jaxedit.errors import InputError
from jaxedit.methods import ike
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


class FakeEmbedder:
    """Fixed vectors by text: similarity is known exactly."""

    key = "fake/v1"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.array([self.table[t] for t in texts], np.float32)


# Query (the edit's fact) is nearest to the Colosseum record, then piano, then mother tongue.
VECS = {
    ike.fact(POOL[0]): [1.0, 0.1, 0.0],
    ike.fact(POOL[1]): [0.0, 1.0, 0.0],
    ike.fact(POOL[2]): [0.6, 0.0, 0.8],
    ike.fact(EDIT): [1.0, 0.0, 0.0],
}


def _ike(k, mix=(1, 1, 1), zero=False, max_tokens=None):
    pool = ike.Pool.from_requests(POOL)
    retr = ike.EmbeddingRetriever(
        FakeEmbedder(VECS), np.array([VECS[t] for t in pool.keys()]), center=False
    )
    hp = ike.IKEParams(k=k, mix=mix, zero_demo=zero, max_tokens=max_tokens)
    return ike.IKE(pool, retr, hp)


# ----------------------------------------------------------------------------- format


def test_demonstration_strings():
    d = ike.demonstrations(POOL[0])
    f = "The Colosseum is located in the city of London"
    assert d["copy"] == [f"New Fact: {f}\nPrompt: {f}\n\n"]
    assert d["update"] == [f"New Fact: {f}\nPrompt: Where is the Colosseum? It is in London\n\n"]
    assert d["retain"] == [
        f"New Fact: {f}\nPrompt: The Pantheon is located in the city of Rome\n\n"
    ]


def test_golden_prompt(smollm):
    """k = 3 with a 1:1:1 mix on the hand-made pool: the exact prefix, least similar first."""
    res = _ike(3)(smollm, [EDIT])
    golden = (
        "New Fact: The mother tongue of Danielle Darrieux is English\n"
        "Prompt: The mother tongue of Danielle Darrieux is English\n\n"  # copy
        "New Fact: Toko Yasuda plays the piano\n"
        "Prompt: Jimi Hendrix plays the guitar\n\n"  # retain: neighbour + its true answer
        "New Fact: The Colosseum is located in the city of London\n"
        "Prompt: Where is the Colosseum? It is in London\n\n"  # update: paraphrase + new
        "New Fact: The Eiffel Tower is located in the city of Rome\n"
        "Prompt: "
    )
    assert res.context == golden
    demos = res.record["demonstrations"]
    assert [d["pool_index"] for d in demos] == [1, 2, 0]  # ascending similarity
    assert sorted(d["kind"] for d in demos) == ["copy", "retain", "update"]
    assert res.context == "".join(d["text"] for d in demos) + ike.query_head([EDIT])
    assert res.model is smollm  # no weight change
    assert res.summary["k"] == 3 and res.summary["dropped"] == 0


def test_zero_demo(smollm):
    res = _ike(3, zero=True)(smollm, [EDIT])
    assert res.context == "New Fact: The Eiffel Tower is located in the city of Rome\nPrompt: "
    assert res.record["demonstrations"] == []


def test_mix_counts():
    assert ike.mix_counts(32) == (4, 12, 16)  # the paper
    assert ike.mix_counts(8) == (1, 3, 4)
    assert sum(ike.mix_counts(5)) == 5
    assert ike.mix_counts(6, (1, 0, 0)) == (6, 0, 0)
    for bad in [(1, 2), (-1, 1, 1), (0, 0, 0)]:
        with pytest.raises(InputError):
            ike.mix_counts(4, bad)


def test_kinds_follow_mix_and_seed(smollm):
    a = _ike(3, mix=(0, 0, 1))(smollm, [EDIT])
    assert [d["kind"] for d in a.record["demonstrations"]] == ["retain"] * 3
    b = _ike(3)(smollm, [EDIT])
    assert b.context == _ike(3)(smollm, [EDIT]).context  # deterministic per edit and seed


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_true_nearest_neighbours():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 6)).astype(np.float32)
    texts = [f"t{i}" for i in range(40)]
    emb = FakeEmbedder({**dict(zip(texts, vecs.tolist(), strict=True)), "q": vecs[7] + 0.1})
    for center in (False, True):
        r = ike.EmbeddingRetriever(emb, vecs, center=center)
        sim = r.similarity(["q"])[0]
        mean = vecs.mean(0) if center else 0
        x, q = vecs - mean, vecs[7] + 0.1 - mean
        want = (x @ q) / np.linalg.norm(x, axis=1) / np.linalg.norm(q)
        np.testing.assert_allclose(sim, want, atol=1e-5)
        assert int(np.argmax(sim)) == 7
        assert list(np.argsort(-sim)[:5]) == list(np.argsort(-want)[:5])


def test_tfidf_retrieval():
    pool = [
        "The capital of France is Paris",
        "Michael Jordan plays basketball",
        "The capital of Italy is Rome",
        "Toko Yasuda plays the guitar",
    ]
    r = ike.TfidfRetriever(pool)
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
    emb = ike.HiddenStateEmbedder(smollm, layer=4)
    vecs = emb(pool)
    assert vecs.shape == (9, smollm.config.d_model)
    np.testing.assert_allclose(emb(pool[:1])[0], vecs[0], atol=1e-4)  # batch-independent
    sim = ike.EmbeddingRetriever(emb, vecs).similarity(queries)
    for theme, row in enumerate(sim):
        assert set(np.argsort(-row)[:3]) == {3 * theme, 3 * theme + 1, 3 * theme + 2}


def test_pool_cache_is_reused_and_keyed(tmp_path):
    emb = FakeEmbedder(VECS)
    texts = list(VECS)[:3]
    a = ike.cached_embeddings(emb, texts, "digest-a", tmp_path)
    b = ike.cached_embeddings(emb, texts, "digest-a", tmp_path)
    assert emb.calls == 1
    np.testing.assert_array_equal(a, b)
    ike.cached_embeddings(emb, texts, "digest-b", tmp_path)  # another pool file: recompute
    assert emb.calls == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # no temporaries left
    (tmp_path / files[0]).write_bytes(b"garbage")  # a corrupt cache is recomputed
    ike.cached_embeddings(emb, texts, "digest-a", tmp_path)
    ike.cached_embeddings(emb, texts, "digest-b", tmp_path)
    assert emb.calls == 3


# ----------------------------------------------------------------------------- bad input


def test_empty_pool():
    with pytest.raises(InputError):
        ike.IKE(ike.Pool.from_requests([]), None, ike.IKEParams())
    with pytest.raises(InputError):
        ike.TfidfRetriever([])
    with pytest.raises(InputError):
        ike.EmbeddingRetriever(FakeEmbedder({}), np.zeros((0, 3)))


def test_k_larger_than_pool(smollm):
    with pytest.warns(UserWarning, match="pool size"):
        res = _ike(10)(smollm, [EDIT])
    assert res.summary["k"] == len(POOL)


def test_context_too_long_drops_least_similar_demos(smollm):
    full = _ike(3)(smollm, [EDIT])
    n = full.summary["context_tokens"]
    with pytest.warns(UserWarning, match="dropped"):
        res = _ike(3, max_tokens=n)(smollm, [EDIT])  # context alone fits, queries do not
    assert 0 < res.summary["dropped"] <= 3
    kept = res.record["demonstrations"]
    # The most similar demonstrations stay; the fact and the query head are intact.
    assert [d["pool_index"] for d in kept] == [1, 2, 0][res.summary["dropped"] :]
    assert res.context.endswith(ike.query_head([EDIT]))
    with pytest.raises(InputError, match="new fact and query"):
        _ike(3, max_tokens=10)(smollm, [EDIT])


# ----------------------------------------------------------------------------- the method


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


def test_registered_method(smollm, tmp_path):
    m = methods.get("ike")
    p = argparse.ArgumentParser()
    m.add_arguments(p)
    args = p.parse_args(["--demos", _pool_file(tmp_path), "--k", "2", "--embedder", "tfidf"])
    edit = m.prepare(smollm, args)
    res = edit(smollm, [EDIT])
    assert res.summary["k"] == 2
    assert res.context.endswith(
        "New Fact: The Eiffel Tower is located in the city of Rome\nPrompt: "
    )
    # TF-IDF: the Colosseum record shares "is located in the city of" with the edit.
    assert res.record["demonstrations"][-1]["pool_index"] == 0
    with pytest.raises(InputError, match="--demos"):
        m.prepare(smollm, p.parse_args([]))
    with pytest.raises(InputError):
        m.prepare(smollm, p.parse_args(["--demos", str(tmp_path / "missing.json")]))
    zero = m.prepare(smollm, p.parse_args(["--zero-demo"]))(smollm, [EDIT])
    assert zero.record["demonstrations"] == []


def test_context_moves_the_model_to_the_new_fact(smollm):
    """The point of IKE: after the context, the new object is likelier on the rewrite prompt."""
    from jaxedit.eval import scoring as metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _ike(3)(smollm, [EDIT])
    p = [EDIT.rewrite_prompt]
    plain = metrics.score_targets(smollm, p, [EDIT.target_new])
    edited = metrics.score_targets(smollm, p, [EDIT.target_new], prefix=res.context)
    assert edited.nll[0] < plain.nll[0]
