"""MEND: gradient factors, the editor network, the edit protocol, meta-training, checkpoints,
the locality-KL option, hparams and errors. (Parity with eric-mitchell/mend: test_mend_parity.)"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxedit as je
from jaxedit.errors import CheckpointError, ConfigError, InputError
from jaxedit.methods import mend
from jaxedit.methods.mend import checkpoint as ckpt
from jaxedit.methods.mend import data as md
from jaxedit.methods.mend import editor as ed
from jaxedit.methods.mend import factors as fa
from jaxedit.methods.mend import inputs, losses, method
from jaxedit.methods.mend import state as st
from jaxedit.methods.mend import train as mt
from jaxedit.methods.mend.hparams import Layout, MENDHparams, make_layout
from jaxedit.models.config import ModelConfig
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import forward, init_params
from jaxedit.requests import EditRequest

PACKAGE = Path(mend.__file__).parent


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
    return md.load_cases(f"{data_dir}/counterfact/counterfact-train.json", limit=40)


def _edit_input(lm, n=2):
    pairs = [
        inputs.encode_pair(lm.tokenizer, "The Eiffel Tower is located in", "Rome"),
        inputs.encode_pair(
            lm.tokenizer, "Danielle Darrieux's mother tongue is", "English language"
        ),
    ][:n]
    tokens, mask, labels = inputs.pad_pairs(lm.tokenizer, pairs, 16)
    return inputs.labelled(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels), 8)


def _true_grads(lm, layout, x):
    def grads(params, x):  # jitted: one compile instead of op-by-op dispatch (test time)
        loss = lambda p: losses.nll(
            forward(lm.config, p, x.tokens, x.mask, logit_positions=x.pos).logits, x
        )
        g = jax.grad(loss)(params)
        return [get_weight(g, s, layer) for s, layer in layout.weights]

    return jax.jit(grads)(lm.params, x)


def _factors(lm, layout, x):
    """Factors the way an edit computes them: only the edited blocks, from the prefix residual."""
    return jax.jit(lambda p, x: fa.edit_factors(lm.config, p, layout, x)[1])(lm.params, x)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _real_norm(layout, f):
    """Normaliser statistics of real factors, so the normalisation is exercised."""
    norm = ed.init_norm(layout)
    for g in norm:
        norm[g] = ed.update_norm(
            norm[g],
            f.u[g].reshape(-1, f.u[g].shape[-1]),
            f.d[g].reshape(-1, f.d[g].shape[-1]),
            f.m[g].reshape(-1),
        )
    return norm


@pytest.fixture(scope="module")
def tiny(smollm):
    """The tiny Llama, rank-8 hparams, its layout, an edit input, its factors (one compile for
    the whole module) and normaliser statistics of those factors."""
    lm = _tiny(smollm)
    hp = MENDHparams(rank=8)
    layout = make_layout(lm.config, hp)
    x = _edit_input(lm)
    f = _factors(lm, layout, x)
    return lm, hp, layout, x, f, _real_norm(layout, f)


def _perturbed_editor(layout, hp, seed=0):
    e = ed.init_editor(jax.random.key(seed), layout, hp)
    leaves, tree = jax.tree.flatten(e)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


# ----------------------------------------------------------------------------- factors


def test_identity_editor_gives_true_gradient_smollm(smollm):
    """Σ_t δ_t u_tᵀ == ∇W, and the identity-initialised editor without normalisation returns
    exactly it, for gate / up / down of the last three blocks of the embedded model."""
    hp = mend.METHOD.hparams("smollm2-135m", norm=False)
    layout = make_layout(smollm.config, hp)
    assert {s for s, _ in layout.weights} == {"mlp_gate", "mlp_up", "mlp_out"}
    x = _edit_input(smollm)
    factors = _factors(smollm, layout, x)
    truth = _true_grads(smollm, layout, x)
    editor = ed.init_editor(jax.random.key(0), layout, hp)
    pseudo, _ = ed.pseudo_gradients(editor, ed.init_norm(layout), layout, factors, False)
    for t, f, p in zip(truth, fa.true_gradients(factors, layout), pseudo, strict=True):
        assert float(jnp.linalg.norm(t)) > 0
        assert _rel(f, t) <= 1e-5
        assert _rel(p, t) <= 1e-5


# GPT-2's factors are also pinned in the default suite by test_mend_parity (the golden model's
# factors against eric-mitchell/mend's); this check against jax.grad compiles two more programs.
@pytest.mark.slow
def test_factors_gpt2_style(smollm):
    """Non-gated MLP with biases (GPT-2): δ of c_fc goes through act'(x W + b)."""
    lm = _tiny(smollm, "gpt2")
    layout = make_layout(lm.config, MENDHparams(rank=8))
    assert layout.weights[:2] == (("mlp_up", 1), ("mlp_out", 1))
    x = _edit_input(lm)
    for f, t in zip(
        fa.true_gradients(_factors(lm, layout, x), layout),
        _true_grads(lm, layout, x),
        strict=True,
    ):
        assert _rel(f, t) <= 1e-5


def test_padding_and_tokens_after_labels_are_masked(tiny):
    lm, _, layout, x, f, _ = tiny
    m = np.asarray(f.m["32x64"][0]).reshape(x.tokens.shape)
    assert not m[~np.asarray(x.mask)].any()  # padding
    last_label = np.asarray(x.pos).max(1) + 1
    for b in range(m.shape[0]):  # no δ after the last label token (causal)
        assert not m[b, last_label[b] + 1 :].any()


# ----------------------------------------------------------------------------- editor


def test_vmapped_editor_equals_per_layer_loop(tiny):
    _, hp, layout, _, f, norm = tiny
    editor = _perturbed_editor(layout, hp)
    vm, _ = ed.pseudo_gradients(editor, norm, layout, f, True)
    loop = ed.pseudo_gradients_loop(editor, norm, layout, f, True)
    for a, b in zip(vm, loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    # the modes matter: the same factors through another layer's scale/shift differ
    assert _rel(vm[0], vm[1]) > 1e-3


def test_update_norm_matches_sequential_welford():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(2.0, 3.0, (7, 5)), rng.normal(-1.0, 0.5, (4, 5))
    m1, m2 = np.array([1, 1, 0, 1, 1, 1, 1], bool), np.ones(4, bool)
    s = {
        "k": jnp.zeros(()),
        "u_mean": jnp.zeros(5),
        "u_m2": jnp.zeros(5),
        "d_mean": jnp.zeros(5),
        "d_m2": jnp.zeros(5),
    }
    for x, m in ((x1, m1), (x2, m2)):
        x, m = jnp.asarray(x, jnp.float32), jnp.asarray(m)
        s = ed.update_norm(s, x, x, m)
    seen = np.concatenate([x1[m1], x2])
    # the reference's per-token update_counter, one token at a time
    mean, m2_ = seen[0].copy(), np.zeros(5)
    for k, x in enumerate(seen[1:], start=2):
        new = mean + (x - mean) / k
        m2_, mean = m2_ + (x - mean) * (x - new), new
    assert float(s["k"]) == len(seen)
    np.testing.assert_allclose(s["u_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(s["u_m2"], m2_, rtol=1e-4)
    np.testing.assert_allclose(ed.norm_std(s["u_m2"], s["k"]), seen.std(0, ddof=1), rtol=1e-4)


def test_init_is_identity_and_trainable():
    layout = Layout((("mlp_out", 0), ("mlp_out", 1)), (("3x2", 3, 2, (0, 1)),))
    hp = MENDHparams(rank=4)
    e = ed.init_editor(jax.random.key(0), layout, hp)
    u, d = jnp.arange(6.0).reshape(2, 3) - 2, jnp.ones((2, 2))
    norm = ed.init_norm(layout)["3x2"]
    ut, dt = ed.transform(e["nets"]["3x2"], norm, u, d, jnp.asarray(1), False)
    np.testing.assert_array_equal(ut, u)
    np.testing.assert_array_equal(dt, d)
    # clamp(min=0) passes gradient at 0: the zero-initialised U gets a non-zero gradient
    g = jax.grad(lambda n: jnp.sum(ed.transform(n, norm, u, d, jnp.asarray(1), False)[0]))(
        e["nets"]["3x2"]
    )
    assert float(jnp.abs(g[0]["u"]).sum()) > 0


# ----------------------------------------------------------------------------- the protocol


def _state(tiny, scale=1.0):
    """A MEND state for a perturbed (non-identity) editor with real normaliser statistics."""
    lm, hp, layout, _, _, norm = tiny
    trained = ckpt.TrainedEditor(_perturbed_editor(layout, hp), norm, layout, hp, 0, {})
    return trained, method.make_state(lm, trained, scale)


REQUESTS = [
    EditRequest("{} is located in", "The Eiffel Tower", "Rome"),
    EditRequest("{}'s mother tongue is", "Danielle Darrieux", "English language"),
]


def test_compute_low_rank_equals_dense_edit_and_inverts(tiny):
    """`compute` returns ΔW_l = η_l Ũᵀ Δ̃ as factors; applied, it equals the dense edit of the
    same requests (`edit_params`, what training does); its inverse restores every param."""
    lm = tiny[0]
    trained, state = _state(tiny)
    edit, info = mend.METHOD.compute(lm, state, REQUESTS)
    assert isinstance(edit, je.WeightEdit) and edit.meta["method"] == "mend"
    assert [(d.site, d.layer) for d in edit.deltas] == list(trained.layout.weights)
    n_tokens = sum(len(r.rewrite_prompt) for r in REQUESTS)  # an upper bound
    for d in edit.deltas:  # rank = the tokens with a gradient at that weight
        assert d.dense is None and 0 < d.left.shape[1] == info["ranks"][f"{d.site}.{d.layer}"]
        assert d.left.shape[1] < n_tokens
    assert set(info) >= {"edit_loss_before", "update_norms", "edit_lrs", "edit_scale", "seconds"}

    tokens, mask, labels, n_pos = method.encode_requests(lm.tokenizer, REQUESTS)
    x = inputs.labelled(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(labels), n_pos)
    dense, rec = jax.jit(
        lambda p: method.edit_params(
            lm.config, p, trained.editor, trained.norm, trained.layout, x, True
        )
    )(lm.params)
    lm2 = je.apply(lm, edit)
    for (site, layer), norm in zip(trained.layout.weights, rec["update_norms"], strict=True):
        w0 = get_weight(lm.params, site, layer)
        want, got = get_weight(dense, site, layer), get_weight(lm2.params, site, layer)
        assert float(jnp.abs(want - w0).max()) > 0
        assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want - w0).max())
        assert info["update_norms"][f"{site}.{layer}"] == pytest.approx(float(norm), rel=1e-4)
    assert info["edit_loss_before"] == pytest.approx(float(rec["edit_loss"]), rel=1e-6)
    lm0 = je.apply(lm2, edit.invert())
    for a, b in zip(jax.tree.leaves(lm0.params), jax.tree.leaves(lm.params), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5


def test_edit_scale_is_linear_in_the_update(tiny):
    """`edit_scale` multiplies η: 0 gives a zero update, 2 doubles every ΔW."""
    lm = tiny[0]
    trained, _ = _state(tiny)
    mats = {}
    for scale in (0.0, 1.0, 2.0):
        edit, info = mend.compute(lm, method.make_state(lm, trained, scale), REQUESTS[:1])
        assert info["edit_scale"] == scale
        mats[scale] = [d.matrix() for d in edit.deltas]
    assert all(not m.any() for m in mats[0.0]) and any(np.abs(m).max() > 0 for m in mats[1.0])
    for one, two in zip(mats[1.0], mats[2.0], strict=True):
        np.testing.assert_allclose(two, 2 * one, rtol=1e-5, atol=1e-7)
    for bad in (-1.0, float("nan")):
        with pytest.raises(InputError, match="edit scale"):
            method.make_state(lm, trained, bad)
        with pytest.raises(ConfigError, match="edit_scale"):
            MENDHparams(edit_scale=bad)


def test_prepare_loads_an_editor_directory(smollm, tiny, tmp_path):
    """Through `jaxedit.methods.get`: hparams(editor=DIR) -> prepare -> compute -> apply; an
    editor is refused for another model; no editor is a clear error."""
    lm, hp = tiny[0], tiny[1]
    trained, _ = _state(tiny)
    ckpt.save_editor(tmp_path / "ed", lm, hp, trained.editor, trained.norm, step=3)
    m = je.methods.get("mend")
    assert m is mend.METHOD and "mend" in je.methods.names()
    use = hp.replace(editor=str(tmp_path / "ed"), edit_scale=0.5)
    loaded = m.prepare(lm, use)
    assert loaded.trained.step == 3 and loaded.edit_scale == 0.5
    edit, _ = m.compute(lm, loaded, REQUESTS[:1])
    want, _ = m.compute(lm, method.make_state(lm, trained, 0.5), REQUESTS[:1])
    for a, b in zip(edit.deltas, want.deltas, strict=True):
        np.testing.assert_array_equal(a.matrix(), b.matrix())
    with pytest.raises(CheckpointError, match="trained for model"):
        m.prepare(_tiny(smollm, seed=5), use)
    with pytest.raises(InputError, match="trained editor: set the hparams field editor"):
        m.prepare(lm, hp)
    with pytest.raises(CheckpointError, match="not empty"):
        ckpt.save_editor(tmp_path / "ed", lm, hp, trained.editor, trained.norm)


# ----------------------------------------------------------------------------- locality KL


def test_locality_kl_positions_on_a_hand_built_case():
    """ "all": the mean KL over every non-padding token of the locality input (the reference's
    kl_loc_loss with the attention mask); "answer": over the positions predicting its answer."""
    rng = np.random.default_rng(0)
    pre, post = rng.normal(size=(2, 1, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]], bool)  # 5 tokens + 1 padding
    labels = np.array([[0, 0, 0, 1, 1, 0]], bool)  # the answer: tokens 3 and 4

    def kl(p, q):  # KL(softmax p ‖ softmax q), by hand
        p, q = np.exp(p) / np.exp(p).sum(), np.exp(q) / np.exp(q).sum()
        return float(np.sum(p * np.log(p / q)))

    per_pos = [kl(pre[0, t], post[0, t]) for t in range(6)]
    want = {"all": np.mean(per_pos[:5]), "answer": np.mean(per_pos[2:4])}
    for positions, value in want.items():
        m = losses.loc_kl_mask(jnp.asarray(mask), jnp.asarray(labels), positions)
        got = losses.kl_loc(jnp.asarray(pre), jnp.asarray(post), m)
        assert float(got) == pytest.approx(value, rel=1e-5), positions
    assert want["all"] != pytest.approx(want["answer"], rel=1e-2)
    with pytest.raises(ConfigError, match="loc_kl_positions"):
        MENDHparams(loc_kl_positions="prompt")


def test_training_loss_follows_loc_kl_positions(smollm, tiny, cases):
    """The meta-loss's locality term is the KL the option names; both are always logged."""
    lm, hp, layout, data = _train_setup(smollm, cases)
    batch = data.take(md.batch_indices(len(data), 0, hp.batch, hp.seed))
    editor, norm = _perturbed_editor(layout, hp), tiny[5]
    seen = {}
    for positions in ("all", "answer"):
        h = hp.replace(loc_kl_positions=positions)
        _, ev = mt.jit_steps(lm.config, layout, h)
        m = {k: float(v) for k, v in ev(lm.params, editor, norm, batch).items()}
        assert m["loss/loc"] == m[f"kl/{positions}"] > 0
        total = h.c_edit * m["loss/edit"] + h.c_loc * m["loss/loc"]
        assert m["loss/total_edit"] == pytest.approx(total, rel=1e-5)
        seen[positions] = m
    assert seen["all"]["kl/all"] == pytest.approx(seen["answer"]["kl/all"], rel=1e-5)
    assert seen["all"]["kl/all"] != pytest.approx(seen["all"]["kl/answer"], rel=1e-2)


# ----------------------------------------------------------------------------- training


def _train_setup(smollm, cases):
    lm = _tiny(smollm)
    hp = MENDHparams(rank=8, batch=2, accumulate=2, lr=1e-3, lr_lr=1e-3, max_len=24)
    layout = make_layout(lm.config, hp)
    data = md.tokenize_cases(lm.tokenizer, cases, hp.max_len, hp.max_target)
    return lm, hp, layout, data


@pytest.mark.slow  # ~85 s on 2 cores: compiles the train step twice (jit and eager)
def test_jit_train_step_equals_eager(smollm, cases):
    lm, hp, layout, data = _train_setup(smollm, cases)
    # one step performs the Adam update; the edit loss also on the edit input (the resume test
    # below covers the rephrase-only loss)
    hp = hp.replace(accumulate=1, inner_loss=True)
    state = st.init_state(layout, hp)
    step_jit, _ = mt.jit_steps(lm.config, layout, hp)
    b = data.take(md.batch_indices(len(data), 0, hp.batch, hp.seed))
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
    layout = Layout((("mlp_out", 0),), (("3x2", 3, 2, (0,)),))
    for outer, expect in ((False, 1e-3), (True, 1e-2 + 1e-3)):
        hp = MENDHparams(rank=2, lr=1e-2, lr_lr=1e-3, accumulate=1, eta_outer=outer)
        e = ed.init_editor(jax.random.key(0), layout, hp)
        opt = st.make_optimizer(hp, e)
        g = jax.tree.map(jnp.ones_like, e)  # global norm < grad_clip: no clipping
        upd, _ = opt.update(g, opt.init(e), e)
        np.testing.assert_allclose(upd["edit_lrs"], -expect, rtol=1e-4)  # Adam's first step: -lr
        np.testing.assert_allclose(upd["nets"]["3x2"][0]["u"], -1e-2, rtol=1e-4)


def test_batch_indices_pure_and_cover_epochs():
    a = [md.batch_indices(10, s, 4, 3) for s in range(5)]
    b = [md.batch_indices(10, s, 4, 3) for s in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    flat = np.concatenate(a)
    assert sorted(flat[:10]) == list(range(10))  # first epoch is a permutation


@pytest.mark.slow  # ~100 s on 2 cores: trains three times
def test_resume_is_bit_identical(smollm, cases, tmp_path):
    lm, hp, _, _ = _train_setup(smollm, cases)
    kw = dict(steps=4, val_every=2, val_size=4, log_every=1, progress=False)
    full = mt.train(lm, cases, tmp_path / "full", hp, **kw)
    mt.train(lm, cases, tmp_path / "part", hp, stop_after=2, **kw)  # a "crash" after step 2
    # use-time fields (editor, edit_scale) are not part of the run: resuming with them is fine
    use = hp.replace(editor="elsewhere", edit_scale=0.5)
    resumed = mt.train(lm, cases, tmp_path / "part", use, resume=True, **kw)
    assert full["steps"] == resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    layout = make_layout(lm.config, hp)
    mgr_a = ckpt.manager(tmp_path / "full" / "checkpoints", 2)
    mgr_b = ckpt.manager(tmp_path / "part" / "checkpoints", 2)
    a, b = ckpt.restore_state(mgr_a, layout, hp), ckpt.restore_state(mgr_b, layout, hp)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    log_a = (tmp_path / "full" / "train_log.jsonl").read_text()
    log_b = (tmp_path / "part" / "train_log.jsonl").read_text()
    assert log_a == log_b  # the log too: no duplicated or lost lines
    with pytest.raises(CheckpointError, match="another model or hparams"):
        mt.train(lm, cases, tmp_path / "part", hp.replace(c_loc=2.0), resume=True, **kw)

    # the trained editor edits through the protocol
    m = je.methods.get("mend")
    state = m.prepare(lm, hp.replace(editor=str(tmp_path / "full")))
    edit, _ = m.compute(lm, state, REQUESTS[:1])
    lm2 = je.apply(lm, edit)
    assert not np.array_equal(
        get_weight(lm2.params, "mlp_out", 3), get_weight(lm.params, "mlp_out", 3)
    )

    # errors: corrupt checkpoints, missing directory
    with pytest.raises(CheckpointError, match="no such editor directory"):
        ckpt.load_editor(tmp_path / "nowhere", lm)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "full", bad)
    for f in bad.rglob("*"):
        if f.is_file() and f.name != "config.json" and f.suffix != ".jsonl":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_editor(bad, lm)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config"):
        ckpt.load_editor(bad, lm)
    # refusing to overwrite a finished run without --resume
    with pytest.raises(InputError, match="not empty"):
        mt.train(lm, cases, tmp_path / "full", hp, **kw)


# ----------------------------------------------------------------------------- bad input


def test_empty_or_bad_training_set(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="empty training set"):
        md.load_cases(tmp_path / "empty.json")
    with pytest.raises(InputError, match="not found"):
        md.load_cases(tmp_path / "missing.json")
    (tmp_path / "wrong.json").write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(InputError, match="lacks field"):
        md.load_cases(tmp_path / "wrong.json")


def test_cli_empty_training_set_exits_2(tmp_path, capsys):
    from jaxedit.cli.main import main

    (tmp_path / "empty.json").write_text("[]")
    rc = main(["mend-train", "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "empty training set" in capsys.readouterr().err


def test_hparams_through_the_one_loader(smollm):
    """Presets by name, by model (hub ids included) or JSON; no silent fallback to the paper's
    values for a model without a preset; unknown keys refused."""
    m = mend.METHOD
    for name in ("gpt2-xl", "gpt-j", "llama-7b", "smollm2-135m"):
        hp = m.hparams(name)
        assert len(hp.weights) in (6, 9) and hp.editor is None and hp.edit_scale == 1.0
        # the paper's presets keep the paper's locality KL (smollm2's measured choice: its note)
        assert hp.loc_kl_positions == ("answer" if name == "smollm2-135m" else "all")
    assert m.hparams(smollm).weights[-1] == m.hparams(smollm.name).weights[-1] == ("mlp_out", 29)
    # a hub id maps to its preset (it used to fall back silently to the paper's defaults)
    assert m.hparams("EleutherAI/gpt-j-6B").weights[0] == ("mlp_up", 25)
    with pytest.raises(InputError, match="no hyperparameter preset"):
        m.hparams("EleutherAI/gpt-neo-2.7B")
    with pytest.raises(ConfigError, match="unknown hparams keys"):
        m.hparams("smollm2-135m", edit_lrs=1.0)
    hp = m.hparams("smollm2-135m", editor="editors/x", edit_scale=0.5)
    assert (hp.editor, hp.edit_scale) == ("editors/x", 0.5)
    assert "editor" not in hp.training_dict() and "edit_scale" not in hp.training_dict()
    # an editor saved before loc_kl_positions existed was trained on answer positions
    old = {k: v for k, v in hp.training_dict().items() if k != "loc_kl_positions"}
    assert MENDHparams.from_dict(old).loc_kl_positions == "answer"


# ----------------------------------------------------------------------------- package shape


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_mend_package_has_no_cycles_or_private_imports():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    prefix = "jaxedit.methods.mend"
    graph = {}
    for name, path in modules.items():
        deps = set()
        for mod, names in _imports(path):
            assert not any(n.startswith("_") for n in names), f"{name} imports private {names}"
            assert mod != prefix, f"{name} imports the package (its __init__ imports it back)"
            if mod.startswith(prefix + "."):
                deps.add(mod.split(".")[-1])
        graph[name] = deps

    def visit(node, stack):
        assert node not in stack, f"import cycle {' -> '.join([*stack, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])

    for name in graph:
        visit(name, [])
    assert graph["checkpoint"] and "train" not in graph["checkpoint"]  # the old cycle
