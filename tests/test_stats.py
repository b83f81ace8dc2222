"""Key second-moment statistics: streaming = one-shot, 8 devices = 1, cache validation, the hub
corpora's seeded article sample (on a local stand-in: tests never download)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

from jaxedit import stats
from jaxedit.errors import CheckpointError, InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import forward_jit, init_params
from jaxedit.stats.second_moment import second_moment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_lm(seed: int = 0) -> LanguageModel:
    cfg = tiny_llama_config(64)
    tok = SimpleNamespace(
        pad_id=0, bos_id=1, eos_id=2, tok=SimpleNamespace(token_to_id=lambda t: None)
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed), tok)


def random_docs(n: int, seed: int = 0) -> list[list[int]]:
    """Documents of a few lengths that fill their shape buckets unevenly (the reference runs
    each alone, so few distinct lengths keep its compiles few)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 64, rng.choice([3, 7, 13, 29, 39])).tolist() for _ in range(n)]


def one_shot(lm: LanguageModel, layer: int, docs: list[list[int]]) -> np.ndarray:
    """Reference: every document alone (no padding), keys stacked, Kᵀ K / N in float64."""
    keys = []
    for d in docs:
        out = forward_jit(lm.config, lm.params, jnp.asarray([d], jnp.int32), capture=("mlp_key",))
        keys.append(np.asarray(out.captured["mlp_key"][layer, 0], np.float64))
    K = np.concatenate(keys)
    return K.T @ K / len(K)


def test_streaming_equals_one_shot_tiny():
    lm = tiny_lm()
    docs = random_docs(30)
    ref = one_shot(lm, 1, docs)
    small, n_small = second_moment(lm, 1, docs, batch_tokens=64)  # many small batches
    big, n_big = second_moment(lm, 1, docs, batch_tokens=1 << 16)  # one batch
    assert n_small == n_big == sum(map(len, docs))
    np.testing.assert_allclose(small, ref, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(big, ref, rtol=2e-5, atol=1e-7)


# WikiText test documents at max_len=256 (the roofline benchmark's 4,096 tokens): a long tail.
WIKI_LENGTHS = [5, 6, 6, 6, 7, 7, 8, 8, 8, 8, 8, 9, 9, 9, 14, 18, 25, 26, 29, 47, 60, 61, 62, 69,
                71, 71, 96, 100, 102, 108, 116, 123, 138, 148, 169, 189, 190, 190, 195, 196, 210,
                212, 224, 233, 244, 256]  # fmt: skip


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_pack_covers_every_document_once_with_little_padding(multiple):
    """Every document in exactly one row (ids and right padding intact); a batch holds one
    length bucket, its rows a multiple of the device count and within the token budget; on
    WikiText's long tail few positions are padding (filling each batch to batch_tokens // T
    rows, the old packing, computed 8,192 positions for these 4,096 tokens)."""
    docs = [[1000 * i + j for j in range(n)] for i, n in enumerate(WIKI_LENGTHS)]
    seen, slots, shapes = [], 0, set()
    for tokens, mask in stats.pack(docs, -1, 4096, multiple):
        B, T = tokens.shape
        assert B % multiple == 0 and (B * T <= 4096 or B == multiple)
        n_real = mask.sum(1)
        assert fine_bucket(int(n_real.max())) == T  # the longest document's bucket
        for row, m, n in zip(tokens, mask, n_real, strict=True):
            assert m[:n].all() and not m[n:].any() and (row[n:] == -1).all()
            if n:
                seen.append(row[:n].tolist())
        slots += B * T
        shapes.add((B, T))
    assert sorted(seen) == sorted(docs)
    # rows rounded to 8 devices cost a little more on so few documents
    assert slots <= (1.2 if multiple <= 2 else 1.3) * sum(WIKI_LENGTHS)
    assert len(shapes) <= 12


def test_streaming_equals_one_shot_smollm(smollm, data_dir):
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    c = stats.load_corpus(smollm, corpus, n_tokens=300, max_len=48)
    assert sum(map(len, c.docs)) == 300 and c.fingerprint.startswith("file-")
    streamed, n = second_moment(smollm, 2, c.docs, batch_tokens=96)
    assert n == 300
    ref = one_shot(smollm, 2, c.docs)
    # padded batches vs unpadded single rows: fp32 rounding only, relative to C's scale
    assert np.max(np.abs(streamed - ref)) / np.max(np.abs(ref)) < 1e-4


def test_eight_simulated_devices_equal_one():
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_stats import tiny_lm, random_docs
        from jaxedit import stats
        from jaxedit.stats.second_moment import second_moment
        import numpy as np
        assert jax.local_device_count() == 8, jax.local_device_count()
        lm = tiny_lm()
        docs = random_docs(50, seed=1)
        c8, n8 = second_moment(lm, 2, docs, batch_tokens=256)
        c1, n1 = second_moment(lm, 2, docs, batch_tokens=256, devices=jax.devices()[:1])
        print(json.dumps({{"n8": n8, "n1": n1, "mesh": stats.data_mesh().devices.size,
                           "err": float(np.max(np.abs(c8 - c1)) / np.max(np.abs(c1)))}}))
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mesh"] == 8 and r["n8"] == r["n1"]
    assert r["err"] < 1e-5


def test_cache_roundtrip_and_tamper(tmp_path):
    lm = tiny_lm()
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    corpus.write_text(
        "\n".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) for _ in range(20))
    )
    lm = LanguageModel(lm.name, lm.config, lm.params, _WordTok())
    kw = dict(n_tokens=150, max_len=32, cache_dir=tmp_path / "cache")
    first = stats.layer_stats(lm, 1, str(corpus), **kw)
    assert not first.meta["from_cache"] and first.count == 150
    again = stats.layer_stats(lm, 1, str(corpus), **kw)
    assert again.meta["from_cache"]
    np.testing.assert_array_equal(again.mom2, first.mom2)
    path = first.meta["cache"]
    # another layer / token count is another file
    other = stats.layer_stats(lm, 2, str(corpus), **kw)
    assert other.meta["cache"] != path and not other.meta["from_cache"]

    # tamper: same metadata, one changed entry -> the checksum catches it
    with np.load(path) as z:
        mom2, meta = np.array(z["mom2"]), str(z["meta"])
    mom2[0, 0] += 1.0
    np.savez(path, mom2=mom2, meta=np.array(meta))
    with pytest.raises(CheckpointError, match="checksum"):
        stats.load_stats(path)
    with pytest.raises(CheckpointError):
        stats.layer_stats(lm, 1, str(corpus), on_bad_cache="error", **kw)
    rebuilt = stats.layer_stats(lm, 1, str(corpus), **kw)  # rebuilt, never silently used
    assert not rebuilt.meta["from_cache"]
    np.testing.assert_allclose(rebuilt.mom2, first.mom2, rtol=1e-6)
    assert stats.layer_stats(lm, 1, str(corpus), **kw).meta["from_cache"]

    # a truncated file and a non-finite matrix are refused too
    with open(path, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CheckpointError):
        stats.load_stats(path)
    bad = stats.Stats(np.full((48, 48), np.nan, np.float32), 1, {**first.meta, "width": 48})
    stats.save_stats(path, bad)
    with pytest.raises(CheckpointError, match="non-finite"):
        stats.load_stats(path)
    # a file keyed for other settings is refused
    stats.save_stats(path, first)
    with pytest.raises(CheckpointError, match="other settings"):
        stats.load_stats(path, {**stats.load_stats(path).meta, "layer": 7})
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave no temp files


def test_corpus_errors(tmp_path):
    lm = tiny_lm()
    with pytest.raises(InputError, match="not 'self'"):
        stats.layer_stats(lm, 0, str(tmp_path / "missing.txt"), cache_dir=tmp_path)
    with pytest.raises(InputError, match="out of range"):
        stats.layer_stats(lm, 3, "self", cache_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(InputError, match="text"):
        stats.load_corpus(
            LanguageModel("t", lm.config, lm.params, _WordTok()), str(bad), n_tokens=10
        )


def test_self_corpus_sampling_is_seeded():
    lm = tiny_lm()
    a = stats.sample_tokens(lm, 5, 7, seed=3)
    b = stats.sample_tokens(lm, 5, 7, seed=3)
    c = stats.sample_tokens(lm, 5, 7, seed=4)
    assert a.shape == (5, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    top1 = stats.sample_tokens(lm, 3, 6, seed=0, top_k=1)  # top-1 sampling is greedy
    assert (top1 == top1[0]).all()


class _WordTok:
    """A whitespace tokenizer over a tiny vocabulary (ids < 64) for file corpora."""

    pad_id, bos_id, eos_id = 0, 1, 2
    tok = SimpleNamespace(token_to_id=lambda t: None)

    def encode(self, text: str) -> list[int]:
        return [3 + (sum(map(ord, w)) % 60) for w in text.split()]


# ----------------------------------------------------------------------------- hub corpora


class _StandIn:
    """A local stand-in for a hub data set: n rows {"text": "doc i word ..."}, every 7th blank;
    records which data set was asked for."""

    def __init__(self, n: int):
        self.rows = [
            {"text": "" if i % 7 == 3 else f"doc {i} " + "word " * (1 + i % 5)} for i in range(n)
        ]
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, config: str):
        self.calls.append((name, config))
        return self.rows


class _DocTok(_WordTok):
    """Reads "doc N w w" as [N, 5, 5]: which row a document came from stays visible."""

    def encode(self, text: str) -> list[int]:
        words = text.split()
        return [int(words[1]), *[5] * (len(words) - 2)]


def test_wikipedia_is_the_maintained_dump_sampled_at_random():
    loader = _StandIn(200)
    lm = LanguageModel("t", tiny_lm().config, tiny_lm().params, _DocTok())
    kw = dict(max_len=64, dataset_loader=loader)
    c = stats.load_corpus(lm, "wikipedia", n_samples=20, seed=1, **kw)
    ((name, config),) = loader.calls
    assert name == "wikimedia/wikipedia" and re.fullmatch(r"20\d{6}\.en", config)
    picked = [d[0] for d in c.docs]
    assert len(picked) == 20 == len(set(picked))
    # a seeded random sample of rows in the order of the reference's FixedRandomSubsetSampler
    # (all indices shuffled by random.Random(seed)), blank rows skipped: not the first articles
    order = list(range(len(loader.rows)))
    random.Random(1).shuffle(order)
    assert picked == [i for i in order if loader.rows[i]["text"].strip()][:20]
    assert picked != sorted(picked) and max(picked) > 100
    again = stats.load_corpus(lm, "wikipedia", n_samples=20, seed=1, **kw)
    other = stats.load_corpus(lm, "wikipedia", n_samples=20, seed=2, **kw)
    assert again.docs == c.docs and other.docs != c.docs
    assert c.fingerprint != other.fingerprint  # another sample, another cache entry
    # a token budget cuts the sample exactly; wikitext is sampled the same way
    t = stats.load_corpus(lm, "wikitext", n_tokens=50, seed=1, **kw)
    assert loader.calls[-1] == stats.HF_CORPORA["wikitext"]
    assert sum(map(len, t.docs)) == 50 and t.docs[0] == c.docs[0]


def test_hub_statistics_are_cached_per_sample(tmp_path):
    loader = _StandIn(60)  # ids < 60: inside the tiny model's vocabulary
    lm = LanguageModel("t", tiny_lm().config, tiny_lm().params, _DocTok())
    kw = dict(n_tokens=120, max_len=16, cache_dir=tmp_path, dataset_loader=loader)
    a = stats.layer_stats(lm, 1, "wikipedia", seed=0, **kw)
    b = stats.layer_stats(lm, 1, "wikipedia", seed=5, **kw)
    assert a.count == b.count == 120
    assert a.meta["cache"] != b.meta["cache"] and not b.meta["from_cache"]
    assert not np.allclose(a.mom2, b.mom2)
    assert stats.layer_stats(lm, 1, "wikipedia", seed=0, **kw).meta["from_cache"]
    assert len(loader.calls) == 2  # the cached one did not read the data set
