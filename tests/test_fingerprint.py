"""Model fingerprints: from the files a model was loaded from, not from every param byte; an
edited model never shares the original's; every byte on request or when the files changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.edits import WeightDelta, WeightEdit, apply
from jaxedit.io import filehash
from jaxedit.io.checkpoint import load
from jaxedit.models import lm as lm_module
from jaxedit.models.lm import LanguageModel, fingerprint
from jaxedit.models.transformer import init_params

GOLDEN = Path(__file__).parent / "goldens"


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    """A private cache root (file hashes land there) and an empty in-memory hash table."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(lm_module.FULL_FINGERPRINT_ENV, raising=False)
    monkeypatch.setattr(filehash, "_memo", {})
    return tmp_path / "cache"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _count_leaf_hashes(monkeypatch) -> list:
    seen = []
    real = lm_module._leaf_bytes

    def counting(leaf):
        seen.append(np.shape(leaf))
        return real(leaf)

    monkeypatch.setattr(lm_module, "_leaf_bytes", counting)
    return seen


def _edit(lm: LanguageModel, scale: float = 1.0) -> WeightEdit:
    F, D = lm.config.d_ff, lm.config.d_model
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(F, 1)), rng.normal(size=(D, 1))
    return WeightEdit((WeightDelta("mlp_out", 1, u * scale, v),))


def test_loaded_model_is_keyed_by_files_not_bytes(monkeypatch, tmp_path):
    hashed = _count_leaf_hashes(monkeypatch)
    a = load(GOLDEN / "llama")
    fp = a.fingerprint()
    assert hashed == []  # no param byte was read
    assert load(GOLDEN / "llama").fingerprint() == fp  # the same files: the same key
    moved = _copy(GOLDEN / "llama", tmp_path / "elsewhere")
    assert load(moved).fingerprint() == fp  # content, not location
    assert load(GOLDEN / "llama", dtype="bfloat16").fingerprint() != fp  # dtype is part of it
    assert fp != a.fingerprint(full=True)  # a different key space from the full hash


def test_other_weights_other_fingerprint(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(GOLDEN / "llama", tmp_path / "m")
    before = load(d).fingerprint()
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert load(d).fingerprint() != before


def test_edited_model_hashes_only_the_changed_weight(monkeypatch):
    base = load(GOLDEN / "llama")
    base_fp = base.fingerprint()
    hashed = _count_leaf_hashes(monkeypatch)
    edited = apply(base, _edit(base))
    fp = edited.fingerprint()
    assert fp != base_fp
    stacked = base.params["blocks"]["mlp"]["down"]["kernel"].shape
    assert hashed == [stacked]  # the one stacked matrix the edit replaced
    # the same edit on another load of the same files: the same fingerprint (caches shared)
    assert apply(load(GOLDEN / "llama"), _edit(base)).fingerprint() == fp
    # another edit: another fingerprint; the original keeps its own
    assert apply(base, _edit(base, 2.0)).fingerprint() not in (fp, base_fp)
    assert base.fingerprint() == base_fp


def test_full_fingerprint_opt_in(monkeypatch):
    lm = load(GOLDEN / "gpt2")
    full = fingerprint(lm.config, lm.params)
    assert lm.fingerprint(full=True) == full
    monkeypatch.setenv(lm_module.FULL_FINGERPRINT_ENV, "1")
    assert lm.fingerprint() == full
    monkeypatch.setenv(lm_module.FULL_FINGERPRINT_ENV, "0")
    assert lm.fingerprint() != full


def test_model_without_files_hashes_every_byte():
    from conftest import tiny_llama_config

    cfg = tiny_llama_config(64)
    params = init_params(cfg)
    lm = LanguageModel("random", cfg, params, tokenizer=None)
    assert lm.fingerprint() == fingerprint(cfg, params)
    bumped = jax.tree.map(lambda x: x, params)
    bumped["final_norm"]["scale"] = params["final_norm"]["scale"] + 1
    assert lm.with_params(bumped).fingerprint() != lm.fingerprint()


def test_files_changed_since_loading_fall_back_to_every_byte(tmp_path):
    d = _copy(GOLDEN / "gpt2", tmp_path / "m")
    lm = load(d)
    st = os.stat(d / "model.safetensors")
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert lm.fingerprint() == lm.fingerprint(full=True)


def test_relayout_keeps_the_fingerprint_a_new_array_does_not():
    lm = load(GOLDEN / "llama")
    fp = lm.fingerprint()
    copied = jax.tree.map(lambda x: jnp.array(x, copy=True), lm.params)
    assert lm.with_layout(copied).fingerprint() == fp  # the caller says: same values
    # with_params makes no such promise: the copies' bytes are hashed (a miss, never a false hit)
    assert lm.with_params(copied).fingerprint() != fp


def test_file_hashes_are_computed_once(monkeypatch, cache_root, tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    digest = filehash.content_hash(f)
    cached = json.loads((cache_root / filehash.CACHE_NAME).read_text())
    assert cached[str(f.resolve())]["sha256"] == digest
    monkeypatch.setattr(filehash, "_memo", {})

    def no_read(path):
        raise AssertionError("re-read a file whose hash is cached")

    monkeypatch.setattr(filehash, "sha256_file", no_read)
    assert filehash.content_hash(f) == digest  # from the file on disk
    f.write_bytes(b"y" * 1000)  # same size, new mtime: hashed again
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="re-read"):
        filehash.content_hash(f)


def test_has_fingerprint_accepts_the_every_byte_one():
    """Files that recorded the every-byte fingerprint (MEND editors trained before file keys)
    still match their model, and only it."""
    lm = load(GOLDEN / "llama")
    assert lm.has_fingerprint(lm.fingerprint()) and lm.has_fingerprint(lm.fingerprint(full=True))
    other = load(GOLDEN / "llama", dtype="bfloat16")
    assert not lm.has_fingerprint(other.fingerprint(full=True))
    assert not lm.has_fingerprint(other.fingerprint())
