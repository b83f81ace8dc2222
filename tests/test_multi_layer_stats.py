"""Statistics of several layers in one pass (`layers_stats`): equal to `layer_stats` layer by
layer, one cache file per layer shared with it, only missing layers computed, corrupt files
rebuilt, 8 simulated devices equal to one."""

from __future__ import annotations

import json
import os
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
from jaxedit.models.lm import LanguageModel
from jaxedit.models.transformer import init_params
from jaxedit.stats import second_moment as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WordTok:
    """Whitespace words hashed onto ids 3..62 (the tiny model's vocabulary is 64)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    tok = SimpleNamespace(token_to_id=lambda t: None)

    def encode(self, text: str) -> list[int]:
        return [3 + (sum(map(ord, w)) % 60) for w in text.split()]


@pytest.fixture(scope="module")
def lm():
    cfg = tiny_llama_config(64)  # 3 layers
    return LanguageModel("tiny", cfg, init_params(cfg, 0), WordTok())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    lines = [
        json.dumps({"text": " ".join(rng.choice(words, rng.integers(4, 30)))}) for _ in range(40)
    ]
    path.write_text("\n".join(lines))
    return str(path)


KW = dict(n_tokens=300, max_len=32, batch_tokens=128)


@pytest.fixture
def passes(monkeypatch):
    """The layer tuples each corpus batch was run for."""
    seen: list[tuple[int, ...]] = []
    kernel = sm._moment_sums

    def spy(cfg, layers, *args):
        seen.append(layers)
        return kernel(cfg, layers, *args)

    monkeypatch.setattr(sm, "_moment_sums", spy)
    return seen


def test_one_pass_equals_layer_by_layer(lm, corpus, tmp_path, passes):
    many = stats.layers_stats(lm, (2, 0, 1), corpus, cache_dir=tmp_path / "many", **KW)
    assert list(many) == [2, 0, 1]  # the order asked for
    assert passes and set(passes) == {(0, 1, 2)}  # one pass over the corpus for all three
    passes.clear()
    for layer in (0, 1, 2):
        one = stats.layer_stats(lm, layer, corpus, cache_dir=tmp_path / "one", **KW)
        st = many[layer]
        assert st.layer == layer and st.count == one.count == 300
        assert not st.meta["from_cache"] and st.meta["pass_layers"] == [0, 1, 2]
        np.testing.assert_allclose(st.mom2, one.mom2, rtol=2e-5, atol=1e-7)
    assert set(passes) == {(0,), (1,), (2,)}
    # the layers differ: each got its own keys, not one layer's three times
    assert not np.allclose(many[0].mom2, many[2].mom2)


def test_one_file_per_layer_shared_with_layer_stats(lm, corpus, tmp_path, passes):
    cache = tmp_path / "cache"
    first = stats.layers_stats(lm, (0, 2), corpus, cache_dir=cache, **KW)
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 2 and sorted(st.meta["cache"] for st in first.values()) == list(
        map(str, files)
    )
    # layer_stats reads the file layers_stats wrote, under the same key
    single = stats.layer_stats(lm, 2, corpus, cache_dir=cache, **KW)
    assert single.meta["from_cache"] and single.meta["cache"] == first[2].meta["cache"]
    np.testing.assert_array_equal(single.mom2, first[2].mom2)
    # a second call reads both files; nothing is computed
    passes.clear()
    again = stats.layers_stats(lm, (0, 2), corpus, cache_dir=cache, **KW)
    assert passes == [] and all(st.meta["from_cache"] for st in again.values())
    np.testing.assert_array_equal(again[0].mom2, first[0].mom2)
    # a file written by layer_stats is read by layers_stats; only the missing layer is computed
    stats.layer_stats(lm, 1, corpus, cache_dir=cache, max_len=32, n_tokens=150)  # other key
    mixed = stats.layers_stats(lm, (0, 1, 2), corpus, cache_dir=cache, **KW)
    assert [mixed[i].meta["from_cache"] for i in (0, 1, 2)] == [True, False, True]
    assert mixed[1].meta["pass_layers"] == [1] and set(passes) == {(1,)}
    assert len(list(cache.glob("*.npz"))) == 4  # (0, 1, 2) at 300 tokens, 1 at 150
    assert not list(cache.glob("*.tmp"))


def test_the_pass_stops_at_the_highest_layer(lm, monkeypatch):
    """The kernel's forward runs blocks 0..max(layers) only, the last up to its key."""
    calls = []
    forward = sm.forward

    def spy(*args, **kw):
        calls.append((kw.get("n_layers"), kw.get("stop_at")))
        return forward(*args, **kw)

    monkeypatch.setattr(sm, "forward", spy)
    tokens = jnp.full((2, 8), 5, jnp.int32)
    mask = jnp.ones((2, 8), bool)
    kk, n = sm._moment_sums.__wrapped__(lm.config, (1, 0), lm.params, tokens, mask)
    assert calls == [(2, "mlp_key")] and kk.shape == (2, 48, 48) and int(n) == 16


def test_corrupted_layer_file_is_rebuilt_with_a_warning(lm, corpus, tmp_path, capsys, passes):
    cache = tmp_path / "cache"
    first = stats.layers_stats(lm, (0, 1, 2), corpus, cache_dir=cache, **KW)
    path = first[1].meta["cache"]
    with np.load(path) as z:
        mom2, meta = np.array(z["mom2"]), str(z["meta"])
    mom2[3, 3] += 1.0  # same metadata, one changed entry: the checksum catches it
    np.savez(path, mom2=mom2, meta=np.array(meta))
    capsys.readouterr()
    passes.clear()
    with pytest.raises(CheckpointError, match="checksum"):
        stats.layers_stats(lm, (0, 1, 2), corpus, cache_dir=cache, on_bad_cache="error", **KW)
    assert passes == []  # refused before anything was computed
    rebuilt = stats.layers_stats(lm, (0, 1, 2), corpus, cache_dir=cache, **KW)
    err = capsys.readouterr().err
    assert "checksum" in err and "recomputing" in err
    assert [rebuilt[i].meta["from_cache"] for i in (0, 1, 2)] == [True, False, True]
    assert set(passes) == {(1,)}  # only the bad layer, the forward stopped at it
    np.testing.assert_allclose(rebuilt[1].mom2, first[1].mom2, rtol=1e-6)
    assert stats.layers_stats(lm, (1,), corpus, cache_dir=cache, **KW)[1].meta["from_cache"]


def test_layers_are_checked(lm, corpus, tmp_path):
    kw = dict(KW, cache_dir=tmp_path)
    refused = [((), "no layers"), ((0, 3), "out of range"), ((True,), "not an int")]
    for bad, match in refused:
        with pytest.raises(InputError, match=match):
            stats.layers_stats(lm, bad, corpus, **kw)
    with pytest.raises(InputError, match="out of range"):
        stats.layer_stats(lm, -1, corpus, **kw)
    twice = stats.layers_stats(lm, (1, 1), corpus, **kw)  # repeated: computed once
    assert list(twice) == [1] and len(list(tmp_path.glob("*.npz"))) == 1


@pytest.mark.slow  # test_stats.py runs the one-layer version on eight devices by default
def test_eight_simulated_devices_equal_one_for_several_layers():
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax
        import numpy as np
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from conftest import tiny_llama_config
        from jaxedit.models.lm import LanguageModel
        from jaxedit.models.transformer import init_params
        from jaxedit.stats.second_moment import second_moments
        assert jax.local_device_count() == 8, jax.local_device_count()
        cfg = tiny_llama_config(64)
        lm = LanguageModel("tiny", cfg, init_params(cfg, 0), type("T", (), {{"pad_id": 0}})())
        rng = np.random.default_rng(1)
        docs = [rng.integers(3, 64, rng.choice([3, 7, 13, 29])).tolist() for _ in range(50)]
        c8, n8 = second_moments(lm, (0, 2), docs, batch_tokens=256)
        c1, n1 = second_moments(lm, (0, 2), docs, batch_tokens=256, devices=jax.devices()[:1])
        err = max(float(np.max(np.abs(c8[i] - c1[i])) / np.max(np.abs(c1[i]))) for i in (0, 2))
        print(json.dumps({{"n8": n8, "n1": n1, "err": err, "layers": sorted(c8)}}))
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
    assert r["n8"] == r["n1"] > 0 and r["layers"] == [0, 2]
    assert r["err"] < 1e-5
