"""MEND: gradient factors, the editor network, meta-training, checkpoints, errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.errors import CheckpointError, InputError
from jaxedit.methods.mend import editor as mend
from jaxedit.methods.mend import train as mt
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import forward, init_params


def _tiny(smollm, family="llama", seed=0) -> LanguageModel:
    """A tiny random model sharing the embedded model's tokenizer (fast to compile)."""
    common = dict(
        vocab_size=smollm.config.vocab_size,
        d_model=32,
        n_layers=4,
        head_dim=16,
        d_ff=64,
        max_positions=128,
    )
    if family == "llama":
        cfg = ModelConfig(model_type="llama", family="llama", n_heads=2, n_kv_heads=1, **common)
    else:  # GPT-2 style: LayerNorm, GELU, no gate, biases, learned positions
        cfg = ModelConfig(
            model_type="gpt2",
            family="gpt2",
            n_heads=2,
            n_kv_heads=2,
            norm="layernorm",
            activation="gelu_new",
            gated_mlp=False,
            positional="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            **common,
        )
    params = init_params(cfg, seed)
    # random norm scales / biases, so the chain rule through them is really exercised
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return LanguageModel(f"tiny-{family}", cfg, jax.tree.unflatten(tree, leaves), smollm.tokenizer)


@pytest.fixture(scope="module")
def cases(data_dir):
    return mt.load_cases(f"{data_dir}/counterfact/counterfact-train.json", limit=40)


def _edit_input(lm, n=2):
    pairs = [
        mend.encode_pair(lm.tokenizer, "The Eiffel Tower is located in", "Rome"),
        mend.encode_pair(lm.tokenizer, "Danielle Darrieux's mother tongue is", "English language"),
    ][:n]
    tokens, mask, labels = mend.pad_pairs(lm.tokenizer, pairs, 16)
    return mend.labelled(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels), 8)


def _true_grads(lm, layout, x):
    def grads(params, x):  # jitted: one compile instead of op-by-op dispatch (test time)
        loss = lambda p: mend.nll(
            forward(lm.config, p, x.tokens, x.mask, logit_positions=x.pos).logits, x
        )
        g = jax.grad(loss)(params)
        return [get_weight(g, s, layer) for s, layer in layout.weights]

    return jax.jit(grads)(lm.params, x)


def _factors(lm, layout, x):
    """Factors the way an edit computes them: only the edited blocks, from the prefix residual."""
    first = mend.first_layer(layout)

    def run(params, x):
        cfg_top, top = mend.split_top(lm.config, params, first)
        h0 = mend.prefix_resid(lm.config, params, x.tokens, x.mask, first)
        return mend.gradient_factors(cfg_top, top, mend.shift_layout(layout, first), x, h0)[1]

    return jax.jit(run)(lm.params, x)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- factors


def test_identity_editor_gives_true_gradient_smollm(smollm):
    """Σ_t δ_t u_tᵀ == ∇W, and the identity-initialised editor without normalisation returns
    exactly it, for gate / up / down of the last three blocks of the embedded model."""
    hp = mend.hparams_for(smollm.config, smollm.name).replace(norm=False)
    layout = mend.make_layout(smollm.config, hp)
    assert {s for s, _ in layout.weights} == {"mlp_gate", "mlp_up", "mlp_out"}
    x = _edit_input(smollm)
    factors = _factors(smollm, layout, x)
    truth = _true_grads(smollm, layout, x)
    editor = mend.init_editor(jax.random.key(0), layout, hp)
    pseudo, _ = mend.pseudo_gradients(editor, mend.init_norm(layout), layout, factors, False)
    for t, f, p in zip(truth, mend.true_gradients(factors, layout), pseudo, strict=True):
        assert float(jnp.linalg.norm(t)) > 0
        assert _rel(f, t) <= 1e-5
        assert _rel(p, t) <= 1e-5


def test_factors_gpt2_style(smollm):
    """Non-gated MLP with biases (GPT-2): δ of c_fc goes through act'(x W + b)."""
    lm = _tiny(smollm, "gpt2")
    layout = mend.make_layout(lm.config, mend.MENDHparams(rank=8))
    assert layout.weights[:2] == (("mlp_up", 1), ("mlp_out", 1))
    x = _edit_input(lm)
    for f, t in zip(
        mend.true_gradients(_factors(lm, layout, x), layout),
        _true_grads(lm, layout, x),
        strict=True,
    ):
        assert _rel(f, t) <= 1e-5


def test_padding_and_tokens_after_labels_are_masked(smollm):
    lm = _tiny(smollm)
    layout = mend.make_layout(lm.config, mend.MENDHparams(rank=8))
    x = _edit_input(lm)
    f = _factors(lm, layout, x)
    m = np.asarray(f.m["32x64"][0]).reshape(x.tokens.shape)
    assert not m[~np.asarray(x.mask)].any()  # padding
    last_label = np.asarray(x.pos).max(1) + 1
    for b in range(m.shape[0]):  # no δ after the last label token (causal)
        assert not m[b, last_label[b] + 1 :].any()


# ----------------------------------------------------------------------------- editor


def _perturbed_editor(layout, hp, seed=0):
    ed = mend.init_editor(jax.random.key(seed), layout, hp)
    leaves, tree = jax.tree.flatten(ed)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def test_vmapped_editor_equals_per_layer_loop(smollm):
    lm = _tiny(smollm)
    hp = mend.MENDHparams(rank=8)
    layout = mend.make_layout(lm.config, hp)
    f = _factors(lm, layout, _edit_input(lm))
    norm = mend.init_norm(layout)
    for g in norm:  # real statistics, so the normalisation is exercised
        norm[g] = mend.update_norm(
            norm[g],
            f.u[g].reshape(-1, f.u[g].shape[-1]),
            f.d[g].reshape(-1, f.d[g].shape[-1]),
            f.m[g].reshape(-1),
        )
    editor = _perturbed_editor(layout, hp)
    vm, _ = mend.pseudo_gradients(editor, norm, layout, f, True)
    loop = mend.pseudo_gradients_loop(editor, norm, layout, f, True)
    for a, b in zip(vm, loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    # the modes matter: the same factors through another layer's scale/shift differ
    assert _rel(vm[0], vm[1]) > 1e-3


def test_update_norm_matches_sequential_welford():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(2.0, 3.0, (7, 5)), rng.normal(-1.0, 0.5, (4, 5))
    m1, m2 = np.array([1, 1, 0, 1, 1, 1, 1], bool), np.ones(4, bool)
    st = {
        "k": jnp.zeros(()),
        "u_mean": jnp.zeros(5),
        "u_m2": jnp.zeros(5),
        "d_mean": jnp.zeros(5),
        "d_m2": jnp.zeros(5),
    }
    st = mend.update_norm(st, x1, x1, m1)
    st = mend.update_norm(st, x2, x2, m2)
    seen = np.concatenate([x1[m1], x2])
    # the reference's per-token update_counter, one token at a time
    mean, s = seen[0].copy(), np.zeros(5)
    for k, x in enumerate(seen[1:], start=2):
        new = mean + (x - mean) / k
        s, mean = s + (x - mean) * (x - new), new
    assert float(st["k"]) == len(seen)
    np.testing.assert_allclose(st["u_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(st["u_m2"], s, rtol=1e-4)
    np.testing.assert_allclose(mend._std(st["u_m2"], st["k"]), seen.std(0, ddof=1), rtol=1e-4)


def test_init_is_identity_and_trainable():
    layout = mend.Layout((("mlp_out", 0), ("mlp_out", 1)), (("3x2", 3, 2, (0, 1)),))
    hp = mend.MENDHparams(rank=4)
    ed = mend.init_editor(jax.random.key(0), layout, hp)
    u, d = jnp.arange(6.0).reshape(2, 3) - 2, jnp.ones((2, 2))
    norm = mend.init_norm(layout)["3x2"]
    ut, dt = mend.transform(ed["nets"]["3x2"], norm, u, d, jnp.asarray(1), False)
    np.testing.assert_array_equal(ut, u)
    np.testing.assert_array_equal(dt, d)
    # clamp(min=0) passes gradient at 0: the zero-initialised U gets a non-zero gradient
    g = jax.grad(lambda e: jnp.sum(mend.transform(e, norm, u, d, 1, False)[0]))(ed["nets"]["3x2"])
    assert float(jnp.abs(g[0]["u"]).sum()) > 0


# ----------------------------------------------------------------------------- training


def _train_setup(smollm, cases):
    lm = _tiny(smollm)
    hp = mend.MENDHparams(rank=8, batch=2, accumulate=2, lr=1e-3, lr_lr=1e-3, max_len=24)
    layout = mend.make_layout(lm.config, hp)
    data = mt.tokenize_cases(lm.tokenizer, cases, hp.max_len, hp.max_target)
    return lm, hp, layout, data


@pytest.mark.slow  # ~85 s on 2 cores: compiles the train step twice (jit and eager)
def test_jit_train_step_equals_eager(smollm, cases):
    lm, hp, layout, data = _train_setup(smollm, cases)
    # one step performs the Adam update; the edit loss also on the edit input (the resume test
    # below covers the rephrase-only loss)
    hp = hp.replace(accumulate=1, inner_loss=True)
    state = mt.init_state(layout, hp)
    step_jit, _ = mt.jit_steps(lm.config, layout, hp)
    b = data.take(mt.batch_indices(len(data), 0, hp.batch, hp.seed))
    s_eager, m_eager = mt.train_step(lm.config, layout, hp, lm.params, state, b)
    s_jit, m_jit = step_jit(lm.params, state, b)
    assert float(m_eager["loss/total_edit"]) > 0 and "edit/acc_inner" in m_jit
    for a, c in zip(jax.tree.leaves(s_eager), jax.tree.leaves(s_jit), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-4, atol=1e-6)
    # the editor did move (the step is not a no-op) and the normaliser saw the tokens
    assert not np.array_equal(s_jit.editor["edit_lrs"], state.editor["edit_lrs"])
    assert float(s_jit.norm["32x64"]["k"]) > 0


def test_eta_optimiser_coupling():
    """η moves by lr_lr alone, or by lr + lr_lr when it is also an outer parameter (reference)."""
    layout = mend.Layout((("mlp_out", 0),), (("3x2", 3, 2, (0,)),))
    for outer, expect in ((False, 1e-3), (True, 1e-2 + 1e-3)):
        hp = mend.MENDHparams(rank=2, lr=1e-2, lr_lr=1e-3, accumulate=1, eta_outer=outer)
        ed = mend.init_editor(jax.random.key(0), layout, hp)
        opt = mt.make_optimizer(hp, ed)
        g = jax.tree.map(jnp.ones_like, ed)  # global norm < grad_clip: no clipping
        upd, _ = opt.update(g, opt.init(ed), ed)
        np.testing.assert_allclose(upd["edit_lrs"], -expect, rtol=1e-4)  # Adam's first step: -lr
        np.testing.assert_allclose(upd["nets"]["3x2"][0]["u"], -1e-2, rtol=1e-4)


def test_batch_indices_pure_and_cover_epochs():
    a = [mt.batch_indices(10, s, 4, 3) for s in range(5)]
    b = [mt.batch_indices(10, s, 4, 3) for s in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert sorted(flat[:10]) == list(range(10))  # first epoch is a permutation


@pytest.mark.slow  # ~100 s on 2 cores: trains three times
def test_resume_is_bit_identical(smollm, cases, tmp_path):
    lm, hp, _, _ = _train_setup(smollm, cases)
    kw = dict(steps=4, val_every=2, val_size=4, log_every=1, progress=False)
    full = mt.train(lm, cases, tmp_path / "full", hp, **kw)
    mt.train(lm, cases, tmp_path / "part", hp, stop_after=2, **kw)  # a "crash" after step 2
    resumed = mt.train(lm, cases, tmp_path / "part", hp, resume=True, **kw)
    assert full["steps"] == resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    layout = mend.make_layout(lm.config, hp)
    mgr_a = mt._manager(tmp_path / "full" / "checkpoints", 2)
    mgr_b = mt._manager(tmp_path / "part" / "checkpoints", 2)
    a, b = mt.restore_state(mgr_a, layout, hp), mt.restore_state(mgr_b, layout, hp)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    log_a = (tmp_path / "full" / "train_log.jsonl").read_text()
    log_b = (tmp_path / "part" / "train_log.jsonl").read_text()
    assert log_a == log_b  # the log too: no duplicated or lost lines
    # the trained editor loads and edits
    trained = mt.load_editor(tmp_path / "full", lm)
    from jaxedit.requests import from_prompt

    edit = mend.make_editor(lm, trained)
    res = edit(lm, [from_prompt("The Eiffel Tower is in", "The Eiffel Tower", "Rome")])
    w = get_weight(res.model.params, "mlp_out", 3)
    assert not np.array_equal(w, get_weight(lm.params, "mlp_out", 3))
    assert np.array_equal(get_weight(lm.params, "mlp_out", 3), get_weight(lm.params, "mlp_out", 3))
    assert set(res.summary) >= {"weights", "update_norms", "edit_lrs"}

    # errors: another model, corrupt checkpoints, missing directory
    other = _tiny(smollm, seed=5)
    with pytest.raises(CheckpointError, match="trained for model"):
        mt.load_editor(tmp_path / "full", other)
    with pytest.raises(CheckpointError, match="no such editor directory"):
        mt.load_editor(tmp_path / "nowhere", lm)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "full", bad)
    for f in bad.rglob("*"):
        if f.is_file() and f.name != "config.json" and f.suffix != ".jsonl":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        mt.load_editor(bad, lm)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config"):
        mt.load_editor(bad, lm)
    # refusing to overwrite a finished run without --resume
    with pytest.raises(InputError, match="not empty"):
        mt.train(lm, cases, tmp_path / "full", hp, **kw)


# ----------------------------------------------------------------------------- bad input


def test_empty_or_bad_training_set(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="empty training set"):
        mt.load_cases(tmp_path / "empty.json")
    with pytest.raises(InputError, match="not found"):
        mt.load_cases(tmp_path / "missing.json")
    (tmp_path / "wrong.json").write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(InputError, match="lacks field"):
        mt.load_cases(tmp_path / "wrong.json")


def test_cli_empty_training_set_exits_2(tmp_path, capsys):
    from jaxedit.cli.main import main

    (tmp_path / "empty.json").write_text("[]")
    rc = main(["mend-train", "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "empty training set" in capsys.readouterr().err


def test_edit_scale_is_linear_in_the_update(smollm):
    """`scale` multiplies η: 0 leaves the model as it was, 2 doubles every weight update."""
    from jaxedit.requests import from_prompt

    lm = _tiny(smollm)
    hp = mend.MENDHparams(rank=8)
    layout = mend.make_layout(lm.config, hp)
    trained = mt.TrainedEditor(
        mend.init_editor(jax.random.key(0), layout, hp), mend.init_norm(layout), layout, hp, 0, {}
    )
    req = [from_prompt("The Eiffel Tower is in", "The Eiffel Tower", "Rome")]
    deltas = {}
    for scale in (0.0, 1.0, 2.0):
        res = mend.make_editor(lm, trained, scale=scale)(lm, req)
        assert res.summary["edit_scale"] == scale
        deltas[scale] = [
            np.asarray(get_weight(res.model.params, s, layer) - get_weight(lm.params, s, layer))
            for s, layer in layout.weights
        ]
    assert all(not d.any() for d in deltas[0.0])
    assert any(np.abs(d).max() > 0 for d in deltas[1.0])
    for one, two in zip(deltas[1.0], deltas[2.0], strict=True):
        np.testing.assert_allclose(two, 2 * one, rtol=1e-5, atol=1e-7)
    for bad in (-1.0, float("nan")):
        with pytest.raises(InputError, match="edit scale"):
            mend.make_editor(lm, trained, scale=bad)


def test_method_registered_and_needs_editor(smollm):
    import argparse

    from jaxedit.methods import legacy as methods

    m = methods.get("mend")
    p = argparse.ArgumentParser()
    m.add_arguments(p)
    with pytest.raises(InputError, match="--editor"):
        m.prepare(smollm, p.parse_args([]))


def test_presets_load(smollm):
    for name in ("gpt2-xl", "gpt-j", "llama-7b", "smollm2-135m"):
        hp = mend.load_hparams(name)
        assert len(hp.weights) in (6, 9)
    assert mend.hparams_for(smollm.config, smollm.name).weights[-1] == ("mlp_out", 29)
    with pytest.raises(InputError, match="presets"):
        mend.load_hparams("no-such-model")
