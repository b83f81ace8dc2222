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


@pytest.mark.slow  # the same property on the embedded model is in the default suite (below)
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
    # packed rows vs unpadded single rows: fp32 rounding only (4e-7), relative to C's scale
    assert np.max(np.abs(streamed - ref)) / np.max(np.abs(ref)) < 1e-5


@pytest.mark.slow  # +5 s of compiles; the default suite checks packed rows vs one_shot above
def test_packed_rows_equal_bucketed_statistics_smollm(smollm, data_dir):
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    c = stats.load_corpus(smollm, corpus, n_tokens=300, max_len=48)
    new, _ = second_moment(smollm, 2, c.docs, batch_tokens=96)
    old = bucketed_reference(smollm, 2, c.docs, 1 << 16)  # a batch per bucket: few compiles
    assert np.max(np.abs(new - old)) / np.max(np.abs(old)) < 1e-5


def bucketed_reference(lm: LanguageModel, layer: int, docs, batch_tokens: int) -> np.ndarray:
    """C the way it was computed before packed rows: `stats.pack` batches (one document per
    row, right padding), the forward run whole up to `layer` (no `stop_at`), float64 sums."""
    acc, count = 0.0, 0
    for tokens, mask in stats.pack(docs, -1, batch_tokens):
        out = forward_jit(lm.config, lm.params, jnp.asarray(tokens), jnp.asarray(mask),
                          capture=("mlp_key",), n_layers=layer + 1)  # fmt: skip
        keys = np.asarray(out.captured["mlp_key"][layer], np.float64)[mask]
        acc, count = acc + keys.T @ keys, count + len(keys)
    return acc / count


def tiny_gpt2(seed: int = 0) -> LanguageModel:
    """GPT-2 style (learned positions, LayerNorm, GELU, biases): positions enter the
    embeddings, not the attention, so restarting them per document is tested separately."""
    cfg = tiny_llama_config(64).replace(
        model_type="gpt2", family="gpt2", n_kv_heads=4, norm="layernorm",
        activation="gelu_new", gated_mlp=False, positional="learned", qkv_bias=True,
        attn_out_bias=True, mlp_bias=True,
    )  # fmt: skip
    return LanguageModel("tiny-gpt2", cfg, init_params(cfg, seed), tiny_lm().tokenizer)


def test_stop_at_key_gives_the_keys_of_the_whole_forward():
    """`forward(stop_at="mlp_key")` skips the last block's down projection and residual and
    returns bit for bit the keys (and earlier sites) of the forward that runs them."""
    lm = tiny_lm()
    cfg = lm.config
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 64, (2, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]))
    sites = ("attn_out", "mlp_in", "mlp_key")
    for n in (1, cfg.n_layers):
        full = forward_jit(cfg, lm.params, tokens, mask, capture=sites, n_layers=n)
        cut = forward_jit(cfg, lm.params, tokens, mask, capture=sites, n_layers=n,
                          stop_at="mlp_key")  # fmt: skip
        assert cut.logits is None
        for s in sites:
            assert cut.captured[s].shape == full.captured[s].shape
            assert full.captured[s].shape[:3] == (n, 2, 9)
            np.testing.assert_array_equal(cut.captured[s], full.captured[s])
    with pytest.raises(ValueError, match="after stop_at"):
        forward_jit(cfg, lm.params, tokens, mask, capture=("mlp_out",), stop_at="mlp_key")
    with pytest.raises(ValueError, match="block site"):
        forward_jit(cfg, lm.params, tokens, mask, stop_at="logits")


@pytest.mark.parametrize("make", [tiny_lm, tiny_gpt2], ids=["rotary", "learned"])
def test_packed_rows_give_each_document_its_keys_alone(make):
    """Several documents in one row with `segments`: each document's keys at every layer are
    those it has run alone (attention within the document, positions restarting at it)."""
    lm = make()
    docs = random_docs(24, seed=2)
    checked = 0
    for tokens, mask, segments in stats.pack_segments(docs, 0, 128):
        out = forward_jit(lm.config, lm.params, jnp.asarray(tokens), jnp.asarray(mask),
                          capture=("mlp_key",), segments=jnp.asarray(segments),
                          stop_at="mlp_key")  # fmt: skip
        keys = np.asarray(out.captured["mlp_key"])
        for r in range(tokens.shape[0]):
            for j in range(1, segments[r].max() + 1):
                (at,) = np.nonzero(segments[r] == j)
                alone = forward_jit(lm.config, lm.params, jnp.asarray(tokens[r, at][None]),
                                    capture=("mlp_key",)).captured["mlp_key"][:, 0]  # fmt: skip
                got = keys[:, r, at]
                assert np.max(np.abs(got - alone)) <= 1e-5 * np.max(np.abs(alone))
                checked += 1
    assert checked == len(docs)


def test_packed_rows_equal_bucketed_statistics_tiny():
    lm = tiny_lm()
    rng = np.random.default_rng(3)  # three lengths: three buckets for the reference to compile
    docs = [rng.integers(3, 64, rng.choice([5, 11, 29])).tolist() for _ in range(40)]
    new, n = second_moment(lm, 1, docs, batch_tokens=1 << 16)  # one batch of packed rows
    old = bucketed_reference(lm, 1, docs, 1 << 16)  # a batch per bucket: few compiles
    assert n == sum(map(len, docs))
    assert np.max(np.abs(new - old)) / np.max(np.abs(old)) < 1e-5


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_pack_segments_covers_every_document_once(multiple):
    """Every document in exactly one contiguous run of one row, numbered 1, 2, ... from the
    row's start, padding only at the row's end; few shapes; on WikiText's long tail at most
    one row of positions more than the tokens (`pack`: 4,750 for 4,096)."""
    docs = [[1000 * i + j for j in range(n)] for i, n in enumerate(WIKI_LENGTHS)]
    seen, slots, shapes = [], 0, set()
    for tokens, mask, segments in stats.pack_segments(docs, -1, 1024, multiple):
        B, T = tokens.shape
        assert B % multiple == 0 and T <= 256 and (B * T <= 1024 or B == multiple)
        for row, m, seg in zip(tokens, mask, segments, strict=True):
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any() and (row[n:] == -1).all()
            assert (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all()
            assert (np.diff(seg[:n]) <= 1).all() and (n == 0 or seg[0] == 1)
            for j in range(1, int(seg.max()) + 1):
                seen.append(row[seg == j].tolist())
        slots += B * T
        shapes.add((B, T))
    assert sorted(seen) == sorted(docs)
    assert slots <= sum(WIKI_LENGTHS) + 256 * multiple  # the last batch's rounded rows
    assert len(shapes) <= 3


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
