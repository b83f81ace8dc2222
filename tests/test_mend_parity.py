"""MEND parity with the reference (eric-mitchell/mend) on the tiny random GPT-2 of tests/goldens.

The golden (`tests/goldens/methods/mend/golden.npz`, written by `scripts/goldens_mend.py` with
the reference's own `GradientTransform` / `IDMLP` / `LRLinear`, hooks and loss) holds a fixed
random editor (not the identity), normaliser statistics, η, one edit input, the reference's
factors u, δ and its outputs: transformed factors, pseudo-gradients Σ_t ũ_t δ̃_tᵀ and ΔW = η ∇̃W.

Always compared (no torch needed): jaxedit's editor on the reference's factors, jaxedit's own
factors of the same model, and the whole `compute` protocol (a low-rank `WeightEdit`) against ΔW.
Live (torch importable and JAXEDIT_MEND_REPO naming a checkout of eric-mitchell/mend): the golden
is regenerated and must equal the committed one, and the reference's `kl_loc_loss` with the
attention mask (its locality KL) must equal `loc_kl_positions="all"`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_torch

from jaxedit.methods.mend import editor as mend_editor
from jaxedit.methods.mend import losses
from jaxedit.methods.mend.checkpoint import TrainedEditor
from jaxedit.methods.mend.factors import Factors, edit_factors
from jaxedit.methods.mend.hparams import Layout, MENDHparams
from jaxedit.methods.mend.inputs import labelled
from jaxedit.methods.mend.method import compute, make_state
from jaxedit.requests import EditRequest

ROOT = Path(__file__).parent
GOLDEN = ROOT / "goldens" / "methods" / "mend" / "golden.npz"
MODEL = ROOT / "goldens" / "gpt2"
WEIGHTS = (("mlp_up", 0), ("mlp_out", 0), ("mlp_up", 1), ("mlp_out", 1))  # reference order
LAYOUT = Layout(WEIGHTS, (("32x64", 32, 64, (0, 2)), ("64x32", 64, 32, (1, 3))))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def golden() -> dict:
    return dict(np.load(GOLDEN))


@pytest.fixture(scope="module")
def gpt2():
    from jaxedit.io.checkpoint import load

    return load(MODEL)


def editor_from(g: dict) -> tuple[dict, dict]:
    """(editor, normaliser) pytrees holding the golden's weights and statistics."""
    nets, norm = {}, {}
    for name, _, _, _ in LAYOUT.groups:
        nets[name] = [
            {
                k: jnp.asarray(g[f"{name}/{j}/{k}"])
                for k in ("u", "v", "bias", "mode_scale", "mode_shift")
            }
            for j in range(int(g["n_hidden"]) + 1)
        ]
        k = float(g[f"{name}/k"][0])
        # the reference keeps σ, jaxedit the M2 sum of Welford's update: σ = sqrt(M2 / (k - 1))
        norm[name] = {
            "k": jnp.asarray(k, jnp.float32),
            "u_mean": jnp.asarray(g[f"{name}/u_mean"]),
            "u_m2": jnp.asarray(np.square(g[f"{name}/u_std"]) * (k - 1)),
            "d_mean": jnp.asarray(g[f"{name}/d_mean"]),
            "d_m2": jnp.asarray(np.square(g[f"{name}/d_std"]) * (k - 1)),
        }
    return {"edit_lrs": jnp.asarray(g["eta"]), "nets": nets}, norm


def factors_from(g: dict) -> Factors:
    """The reference's factors (every token) as jaxedit's Factors, masked as jaxedit masks."""
    us, ds, ms = {}, {}, {}
    for name, _, _, members in LAYOUT.groups:
        keys = [f"{WEIGHTS[i][0]}.{WEIGHTS[i][1]}" for i in members]
        us[name] = jnp.stack([g[f"{k}/u"] for k in keys])
        ds[name] = jnp.stack([g[f"{k}/d"] for k in keys])
        ms[name] = jnp.any(us[name] != 0, -1) & jnp.any(ds[name] != 0, -1) & jnp.asarray(g["mask"])
    return Factors(us, ds, ms)


def _check_pseudo(g, factors, tol):
    editor, norm = editor_from(g)
    grads, tilde = mend_editor.pseudo_gradients(editor, norm, LAYOUT, factors, True)
    for i, (site, layer) in enumerate(WEIGHTS):
        key = f"{site}.{layer}"
        assert _rel(grads[i], g[f"{key}/pseudo_grad"]) <= tol, key
        # the editor is not the identity: the pseudo-gradient is far from the true gradient
        assert _rel(grads[i], g[f"{key}/true_grad"]) > 0.5
    for name, _, _, members in LAYOUT.groups:
        for j, i in enumerate(members):
            key = f"{WEIGHTS[i][0]}.{WEIGHTS[i][1]}"
            keep = np.asarray(factors.m[name][j])
            assert keep.sum() == len(g[f"{key}/u_tilde"])  # the tokens the reference keeps
            assert _rel(np.asarray(tilde[name][0][j])[keep], g[f"{key}/u_tilde"]) <= tol
            assert _rel(np.asarray(tilde[name][1][j])[keep], g[f"{key}/d_tilde"]) <= tol


def test_pseudo_gradients_on_reference_factors(golden):
    """The editor alone: same factors in, same pseudo-gradients out (fp32)."""
    _check_pseudo(golden, factors_from(golden), 1e-5)


def test_factors_and_pseudo_gradients_of_the_model(golden, gpt2):
    """jaxedit's own u, δ (no hooks: captured site + grad of an added zero) equal the reference
    hooks' on the same model and input, and so do the pseudo-gradients built on them."""
    x = labelled(
        jnp.asarray(golden["ids"]), jnp.asarray(golden["mask"]), jnp.asarray(golden["labels"]), 16
    )
    loss, f = edit_factors(gpt2.config, gpt2.params, LAYOUT, x)
    assert abs(float(loss) - float(golden["loss"])) <= 1e-5 * abs(float(golden["loss"]))
    for name, _, _, members in LAYOUT.groups:
        for j, i in enumerate(members):
            key = f"{WEIGHTS[i][0]}.{WEIGHTS[i][1]}"
            assert _rel(f.u[name][j], golden[f"{key}/u"]) <= 1e-4, key
            assert _rel(f.d[name][j], golden[f"{key}/d"]) <= 1e-4, key
    _check_pseudo(golden, f, 1e-4)


def test_compute_gives_the_reference_delta(golden, gpt2):
    """The protocol end to end: `compute` on the request returns low-rank deltas whose
    products are the reference's ΔW = η Σ_t ũ_t δ̃_tᵀ."""
    req = EditRequest("{} is located in", "The Eiffel Tower", "Rome city")
    ids = gpt2.tokenizer.encode(req.rewrite_prompt) + gpt2.tokenizer.encode_continuation(
        " Rome city"
    )
    assert ids == golden["ids"][0].tolist()  # the same edit input
    editor, norm = editor_from(golden)
    hp = MENDHparams(weights=WEIGHTS, rank=int(golden["rank"]), n_hidden=int(golden["n_hidden"]))
    trained = TrainedEditor(editor, norm, LAYOUT, hp, 0, {})
    edit, info = compute(gpt2, make_state(gpt2, trained), [req])
    assert [(d.site, d.layer) for d in edit.deltas] == list(WEIGHTS)
    for d in edit.deltas:
        key = f"{d.site}.{d.layer}"
        assert d.left.shape[1] == len(golden[f"{key}/u_tilde"])  # rank = kept tokens
        assert _rel(d.matrix(), golden[f"{key}/delta_w"]) <= 1e-4, key
        assert info["update_norms"][key] == pytest.approx(
            float(np.linalg.norm(golden[f"{key}/delta_w"])), rel=1e-4
        )


# ----------------------------------------------------------------------------- live reference


def _reference_repo() -> Path:
    repo = os.environ.get("JAXEDIT_MEND_REPO")
    if not repo or not (Path(repo) / "algs" / "mend.py").is_file():
        pytest.skip("set JAXEDIT_MEND_REPO to a checkout of eric-mitchell/mend")
    return Path(repo)


def _script():
    path = ROOT.parent / "scripts" / "goldens_mend.py"
    spec = importlib.util.spec_from_file_location("goldens_mend", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@requires_torch
@pytest.mark.torch
def test_live_reference_regenerates_the_golden(golden):
    live = _script().compute(_reference_repo())
    assert set(live) == set(golden) - {"ref_commit"}
    for k, v in live.items():
        np.testing.assert_allclose(v, golden[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _check_pseudo(live, factors_from(live), 1e-5)


@requires_torch
@pytest.mark.torch
def test_live_reference_locality_kl_is_all_positions():
    """The reference's `kl_loc_loss(pre, post, mask=attention_mask)` is loc_kl_positions="all"."""
    import torch

    _, ref_losses = _script().import_reference(_reference_repo())
    rng = np.random.default_rng(0)
    pre, post = rng.normal(size=(2, 2, 7, 11)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], bool)
    labels = np.zeros_like(mask)
    labels[:, 3] = True  # an answer token: "answer" would read position 2 only
    ref = ref_losses.kl_loc_loss(torch.tensor(pre), torch.tensor(post), torch.tensor(mask))
    ours = losses.kl_loc(
        jnp.asarray(pre),
        jnp.asarray(post),
        losses.loc_kl_mask(jnp.asarray(mask), jnp.asarray(labels), "all"),
    )
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
