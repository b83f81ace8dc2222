"""Checkpoint I/O: HF export that transformers loads, orbax round trip, GGUF, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import requires_torch
from test_model_parity import FAMILIES, GOLDENS, golden, make_goldens_module, max_diff_real

from jaxedit.cli.main import main
from jaxedit.errors import CheckpointError, ConfigError
from jaxedit.io.checkpoint import (
    hf_state_dict,
    load,
    load_gguf,
    save_hf,
    save_orbax,
)
from jaxedit.models.families.llama import GGUF_LAYER, GGUF_TOP

TEXT = "Hello, wörld! 123"


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def copy_golden(family: str, dst: Path) -> Path:
    shutil.copytree(GOLDENS / family, dst, ignore=shutil.ignore_patterns("golden.npz"))
    return dst


# ----------------------------------------------------------------------------- HF export


@requires_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_then_transformers_gives_same_logits(family, tmp_path, capsys):
    """`jaxedit convert --out D`, then `AutoModelForCausalLM.from_pretrained(D)` == the golden."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert main(["convert", "--model", str(GOLDENS / family), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    mg, g = make_goldens_module(), golden(family)
    for batch in ("full", "left"):
        ids, mask = g[f"{batch}_ids"], g[f"{batch}_mask"]
        logits, _ = mg.run_hf(model, ids, mask)
        assert max_diff_real(logits, g[f"{batch}_logits"], mask) <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TEXT, add_special_tokens=True).input_ids == load(out).tokenizer.encode(TEXT)


@pytest.mark.parametrize("family", ("gpt2", "gpt_neox", "qwen2"))
def test_save_hf_then_load_round_trips(family, tmp_path):
    lm = load(GOLDENS / family)
    again = load(save_hf(lm, tmp_path / "out"))
    assert again.config == lm.config
    assert_same_params(again.params, lm.params)
    assert again.tokenizer.encode(TEXT) == lm.tokenizer.encode(TEXT)


def test_save_hf_refuses_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(load(GOLDENS / "llama"), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_sharded_safetensors_directory(tmp_path):
    """A `model.safetensors.index.json` + several shards loads like the single file."""
    from safetensors.numpy import load_file, save_file

    d = copy_golden("qwen2", tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_params(load(d).params, load(GOLDENS / "qwen2").params)


@requires_torch
@pytest.mark.slow
def test_convert_embedded_model_then_transformers(smollm, tmp_path):
    """The embedded SmolLM2 exported and read back by transformers gives the logits transformers
    computes from the original GGUF (≤ 1e-4), and ours up to fp32 summation order over 30
    layers (≤ 1e-5 of the logit scale, ~1e-4 absolute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxedit.io.checkpoint import embedded_gguf_path
    from jaxedit.models.transformer import forward_jit

    out = save_hf(smollm, tmp_path / "smollm")
    ref = json.loads((GOLDENS / "embedded.json").read_text())
    ids = AutoTokenizer.from_pretrained(out)(ref["prompt"]).input_ids
    assert ids == ref["input_ids"]
    gguf = embedded_gguf_path("smollm2-135m")
    logits = {}
    for name, kw in (("export", {}), ("gguf", {"gguf_file": gguf.name})):
        model = AutoModelForCausalLM.from_pretrained(
            out if name == "export" else gguf.parent, dtype=torch.float32, **kw
        ).eval()
        with torch.no_grad():
            logits[name] = model(torch.tensor([ids])).logits[0].numpy()
        del model
    assert np.abs(logits["export"] - logits["gguf"]).max() <= 1e-4
    mine = np.asarray(forward_jit(smollm.config, smollm.params, np.array([ids])).logits[0])
    scale = np.abs(logits["export"]).max()
    assert np.abs(mine - logits["export"]).max() <= 1e-5 * scale


# ----------------------------------------------------------------------------- orbax


def test_orbax_save_restore_round_trip(tmp_path, capsys):
    lm = load(GOLDENS / "gpt_neox")
    out = tmp_path / "ckpt"
    assert main(["convert", "--model", str(GOLDENS / "gpt_neox"), "--out", str(out)]) == 0
    capsys.readouterr()
    shutil.rmtree(out)
    save_orbax(lm, out)
    again = load(out)
    assert again.config == lm.config
    assert_same_params(again.params, lm.params)
    assert again.tokenizer.encode(TEXT) == lm.tokenizer.encode(TEXT)
    assert again.tokenizer.eos_id == lm.tokenizer.eos_id


def test_orbax_bfloat16_round_trip(tmp_path):
    lm = load(GOLDENS / "llama", dtype="bfloat16")
    again = load(save_orbax(lm, tmp_path / "ckpt"))
    assert again.config.dtype == "bfloat16"
    assert_same_params(again.params, lm.params)


# ----------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama Q/K rows (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path: Path, lm, arch: str, *, tokenizer: bool = True, qtype=None) -> Path:
    """A GGUF the way llama.cpp writes one, from a loaded model, with the `gguf` package."""
    import gguf

    to_gguf = {v: k for k, v in GGUF_TOP.items()}
    c = lm.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_positions)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if tokenizer:
        tok = lm.tokenizer.tok
        w.add_tokenizer_model("gpt2")
        w.add_token_list([tok.id_to_token(i) for i in range(tok.get_vocab_size())])
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    for name, arr in hf_state_dict(c, lm.params):
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            block = {v: k for k, v in GGUF_LAYER.items()}[rest]
            gname = f"blk.{layer}.{block}"
        else:
            gname = to_gguf[name]
        if arch == "llama" and ".attn_q." in gname:
            arr = _llama_cpp_permute(arr, c.n_heads)
        elif arch == "llama" and ".attn_k." in gname:
            arr = _llama_cpp_permute(arr, c.n_kv_heads)
        if qtype is not None and arr.ndim == 2:
            arr = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, arr, raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_gguf_loads_the_same_params(family, tmp_path):
    """llama.cpp's Q/K row permutation is undone for `llama` (only), tokenizer from metadata."""
    lm = load(GOLDENS / family)
    again = load(write_gguf(tmp_path / "m.gguf", lm, family))
    assert again.config.norm_eps == pytest.approx(lm.config.norm_eps)  # GGUF stores it as f32
    same = dict(rope_scaling=None, norm_eps=lm.config.norm_eps)
    assert again.config.replace(**same) == lm.config.replace(**same)
    assert_same_params(again.params, lm.params)
    assert again.tokenizer.encode(TEXT) == lm.tokenizer.encode(TEXT)
    assert again.tokenizer.decode(again.tokenizer.encode(TEXT)) == TEXT


@pytest.mark.parametrize("qname", ("Q4_0", "Q4_1", "Q8_0"))
def test_fast_dequantisation_matches_gguf_package(qname, tmp_path):
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    lm = load(GOLDENS / "qwen2")
    ours = load(write_gguf(tmp_path / "q.gguf", lm, "qwen2", qtype=qtype))
    reference = {}
    for name, arr in hf_state_dict(lm.config, lm.params):
        if arr.ndim == 2:
            reference[name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
    for name, arr in hf_state_dict(ours.config, ours.params):
        if name in reference:
            np.testing.assert_array_equal(arr, reference[name], err_msg=name)


def test_gguf_without_tokenizer_is_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", load(GOLDENS / "qwen2"), "qwen2", tokenizer=False)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load(path)


def test_corrupt_gguf_is_refused(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", load(GOLDENS / "qwen2"), "qwen2")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="past the end|truncated|corrupt"):
        load(truncated)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(header_cut)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"NOTAGGUF" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load_gguf(garbage)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(tmp_path / "nowhere.gguf")


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(GOLDENS / "llama" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load(d)
    with pytest.raises(CheckpointError, match="pickle"):
        load(d / "pytorch_model.bin")


def test_unsupported_architecture(tmp_path):
    d = copy_golden("llama", tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ConfigError, match="unsupported architecture.*bert"):
        load(d)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),  # conflicting
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping"),
    ],
)
def test_unsupported_config_field_is_named(change, named, tmp_path):
    d = copy_golden("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=named):
        load(d)


def test_corrupt_safetensors(tmp_path):
    d = copy_golden("llama", tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors|could not be read"):
        load(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load(d)


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_golden("llama", tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load(d)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load(d)


# ----------------------------------------------------------------------------- special ids


def with_special_ids(dst: Path, ids: int, **tokenizer_config) -> Path:
    """The GPT-2 golden (256 tokens) with config bos/eos/pad ids `ids` (e.g. GPT-2's 50256)."""
    d = copy_golden("gpt2", dst)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(bos_token_id=ids, eos_token_id=ids, pad_token_id=ids)
    (d / "config.json").write_text(json.dumps(cfg))
    if tokenizer_config:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


def test_out_of_vocab_special_ids_give_finite_padded_logits(tmp_path):
    """bos/eos/pad 50256 beside a 256-token vocabulary: unused ids are dropped, the pad id falls
    back to a valid one, and a padded batch computes what each row computes alone."""
    import jax.numpy as jnp

    from jaxedit.models.transformer import forward_jit

    lm = load(with_special_ids(tmp_path / "m", 50256))
    tok = lm.tokenizer
    assert tok.bos_id is None and tok.eos_id is None  # the model can never emit 50256
    assert 0 <= tok.pad_id < lm.config.vocab_size
    texts = ["Hello, wörld!", "Hi"]
    batch = tok.batch(texts, padding="left")
    assert not batch.mask.all()
    logits = np.asarray(
        forward_jit(lm.config, lm.params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask)).logits
    )
    assert np.isfinite(logits).all()
    for row, text in enumerate(texts):
        ids = np.asarray([tok.encode(text)], np.int32)
        alone = np.asarray(forward_jit(lm.config, lm.params, jnp.asarray(ids)).logits)[0]
        np.testing.assert_allclose(logits[row, batch.mask[row]], alone, atol=1e-5, rtol=0)


def test_out_of_vocab_bos_that_is_prepended_is_refused(tmp_path):
    d = with_special_ids(tmp_path / "m", 50256, add_bos_token=True)
    with pytest.raises(CheckpointError, match="bos_token_id 50256 is outside the vocabulary"):
        load(d)
