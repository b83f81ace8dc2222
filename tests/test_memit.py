"""MEMIT, EMMET and AlphaEdit: the layer loop, the solves' invariants (MEMIT and EMMET = ROME's
closed form for one layer and one request; EMMET writes every residual exactly; AlphaEdit spares
the preserved subspace), sequential state (resume == uninterrupted, foreign state refused), bad
input, and edits on the embedded model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import tiny_llama_config

import jaxedit as je
from jaxedit.errors import CheckpointError, ConfigError, InputError
from jaxedit.methods import alphaedit, emmet, memit
from jaxedit.methods.common import linalg, spread, target_cache, target_opt
from jaxedit.models.generate import top_k
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params
from jaxedit.requests import EditRequest

FIXED = ("{}", "The following is true. {}", "I read this today. {}")
REQS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} is located in the city of", "The Louvre", "Berlin"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
]


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


@pytest.fixture(scope="module")
def tiny_C():
    rng = np.random.default_rng(0)
    out = {}
    for layer in range(3):
        # a spectrum spanning 1e-4 .. 1: some directions fall under AlphaEdit's threshold
        Q, _ = np.linalg.qr(rng.standard_normal((48, 48)))
        out[layer] = (Q * np.logspace(-4, 0, 48)) @ Q.T
    return out


def tiny_hp(cls, **kw):
    base = dict(layers=(1, 2), v_num_grad_steps=6, context_templates=FIXED, z_lanes=4)
    return cls(**{**base, **kw})


def rome_update(lm, state, C, layer):
    """ROME's ΔW = C⁻¹k (z − h)ᵀ / (kᵀC⁻¹k) for the first request, from the same k, z and h the
    layer loop reads, and that k and residual z − h."""
    zs, _ = memit.target_zs(lm, state, REQS[:1])
    k = spread.request_keys(lm, layer, REQS[:1], FIXED, state.groups)[:, 0]
    h = spread.bare_outputs(lm, layer, REQS[:1])[:, 0]
    u = linalg.spd_solve(linalg.spd_factor(C), k)
    return np.outer(u, linalg.rank_one_right(u, k, zs[:, 0], h)), u @ k


def test_one_layer_one_request_is_romes_closed_form(tiny, tiny_C):
    """ΔW = (λC + kkᵀ)⁻¹ k rᵀ = C⁻¹k rᵀ / (λ + kᵀC⁻¹k): ROME's direction C⁻¹k with the
    residual scaled by kᵀC⁻¹k / (λ + kᵀC⁻¹k) (Sherman–Morrison), given the same z and C."""
    hp = tiny_hp(memit.MEMITHparams, layers=(1,), mom2_update_weight=3.0)
    state = memit.make_state(tiny, hp, tiny_C)
    edit, info = memit.compute(tiny, state, REQS[:1])
    (d,) = edit.deltas
    rome_dw, ukk = rome_update(tiny, state, tiny_C[1], 1)
    np.testing.assert_allclose(d.matrix(), ukk / (3.0 + ukk) * rome_dw, rtol=2e-4, atol=1e-7)
    assert info["requests"] == 1 and info["layers"] == [1]


def test_emmet_one_layer_one_request_is_rome(tiny, tiny_C):
    """EMMET's equality constraint for one key is ROME's: ΔW = C₀⁻¹k rᵀ / (kᵀC₀⁻¹k) exactly,
    whatever λ (it cancels) and emmet_lambda (added to D only for a batch)."""
    hp = tiny_hp(emmet.EMMETHparams, layers=(1,), mom2_update_weight=3.0, emmet_lambda=0.5)
    state = memit.make_state(tiny, hp, tiny_C)
    edit, info = emmet.METHOD.compute(tiny, state, REQS[:1])
    rome_dw, _ = rome_update(tiny, state, tiny_C[1], 1)
    np.testing.assert_allclose(edit.deltas[0].matrix(), rome_dw, rtol=2e-4, atol=1e-7)
    assert edit.meta["method"] == "emmet" and info["requests"] == 1


def test_emmet_writes_every_residual_exactly(tiny, tiny_C):
    """With emmet_lambda = 0 a batch's keys map to their residuals exactly (K_lᵀ ΔW_l = R_lᵀ),
    where MEMIT's least squares writes only part of them; emmet_lambda > 0 shrinks the writes
    to D̃ (D̃ + εI)⁻¹ R (D̃ = KᵀC₀⁻¹K)."""
    state = memit.make_state(tiny, tiny_hp(memit.MEMITHparams, layers=(1,)), tiny_C)
    K = spread.request_keys(tiny, 1, REQS, FIXED, state.groups)
    zs, _ = memit.target_zs(tiny, state, REQS)
    R = zs - spread.bare_outputs(tiny, 1, REQS)
    written, one = {}, dict(layers=(1,), mom2_update_weight=2.0)
    for name, hp in [
        ("emmet", tiny_hp(emmet.EMMETHparams, **one, emmet_lambda=0.0)),
        ("shrunk", tiny_hp(emmet.EMMETHparams, **one)),
        ("memit", tiny_hp(memit.MEMITHparams, **one)),
    ]:
        solve = (emmet.emmet_solver if name != "memit" else memit.memit_solver)(state, hp)
        written[name] = K.T @ solve(0, 1, K, R).matrix().astype(np.float64)  # [N D]
    scale = np.linalg.norm(R)
    np.testing.assert_allclose(written["emmet"], R.T, atol=2e-5 * scale)
    assert np.linalg.norm(written["memit"] - R.T) > 1e-2 * scale
    Cinv_K = np.linalg.solve(2.0 * tiny_C[1], K)
    Dt = K.T @ Cinv_K
    shrunk = Dt @ np.linalg.solve(Dt + 0.1 * np.eye(3), R.T)
    np.testing.assert_allclose(written["shrunk"], shrunk, atol=2e-5 * scale)
    assert np.linalg.norm(written["shrunk"] - R.T) > 1e-4 * scale


def test_emmet_regularised_is_memit_at_emmet_lambda_times_lambda(tiny, tiny_C):
    """For a batch, (λC)⁻¹K(Kᵀ(λC)⁻¹K + εI)⁻¹ = (ελC + KKᵀ)⁻¹K (push-through identity): EMMET
    with emmet_lambda ε is MEMIT with λ' = ελ, over the whole layer loop."""
    e_hp = tiny_hp(emmet.EMMETHparams, mom2_update_weight=20.0, emmet_lambda=0.15)
    m_hp = tiny_hp(memit.MEMITHparams, mom2_update_weight=3.0)
    e, _ = emmet.METHOD.compute(tiny, memit.make_state(tiny, e_hp, tiny_C), REQS)
    m, _ = memit.compute(tiny, memit.make_state(tiny, m_hp, tiny_C), REQS)
    assert [d.layer for d in e.deltas] == [d.layer for d in m.deltas] == [1, 2]
    for a, b in zip(e.deltas, m.deltas, strict=True):
        assert np.linalg.norm(b.matrix()) > 0
        np.testing.assert_allclose(a.matrix(), b.matrix(), atol=1e-5 * np.abs(b.matrix()).max())


def test_emmet_refuses_a_singular_batch(tiny, tiny_C):
    """More keys than key dimensions, two requests with one key, or dependent keys leave
    KᵀC₀⁻¹K singular: without emmet_lambda that is a clear error naming why and emmet_lambda,
    never a silent pseudo-inverse."""
    hp = tiny_hp(emmet.EMMETHparams, layers=(1,), emmet_lambda=0.0)
    state = memit.make_state(tiny, hp, tiny_C)
    rng = np.random.default_rng(1)
    K, R = rng.standard_normal((48, 50)), rng.standard_normal((tiny.config.d_model, 50))
    with pytest.raises(InputError, match=r"EMMET layer 1: .*50 keys in 48 dim.*emmet_lambda"):
        emmet.emmet_solver(state, hp)(0, 1, K, R)
    twice = np.concatenate([K[:, :2], K[:, :1]], 1)
    with pytest.raises(InputError, match="requests 0 and 2 of the batch share one key"):
        emmet.emmet_solver(state, hp)(0, 1, twice, R[:, :3])
    summed = np.stack([K[:, 0], K[:, 1], K[:, 0] + K[:, 1]], 1)
    with pytest.raises(InputError, match="linearly dependent keys"):
        emmet.emmet_solver(state, hp)(0, 1, summed, R[:, :3])
    ok = emmet.emmet_solver(state, dataclasses.replace(hp, emmet_lambda=0.1))(0, 1, K, R)
    assert np.isfinite(ok.matrix()).all() and np.linalg.norm(ok.matrix()) > 0
    with pytest.raises(ConfigError, match="emmet_lambda"):
        dataclasses.replace(hp, emmet_lambda=-1.0)
    with pytest.raises(ConfigError, match="mom2_update_weight"):
        dataclasses.replace(hp, mom2_update_weight=0.0)


def test_memit_spreads_over_layers_and_is_pure(tiny, tiny_C):
    hp = tiny_hp(memit.MEMITHparams, mom2_update_weight=1.0)
    state = memit.make_state(tiny, hp, tiny_C)
    before = get_weight(tiny.params, "mlp_out", 1).copy()
    edit, info = memit.compute(tiny, state, REQS)
    assert [d.layer for d in edit.deltas] == [1, 2]
    np.testing.assert_array_equal(get_weight(tiny.params, "mlp_out", 1), before)
    # The residual left to write shrinks after the first layer's share is written.
    errs = [x["z_error"] for x in info["layers_info"]]
    assert errs[1] < errs[0]
    # Undo restores the weights.
    lm2 = je.apply(je.apply(tiny, edit), edit.invert())
    np.testing.assert_allclose(get_weight(lm2.params, "mlp_out", 1), before, atol=1e-6)


def test_alphaedit_spares_the_preserved_subspace(tiny, tiny_C):
    hp = tiny_hp(alphaedit.AlphaEditHparams, nullspace_threshold=1e-2, L2=1.0)
    state = alphaedit.make_state(tiny, memit.make_state(tiny, hp, tiny_C))
    edit, _, state2 = alphaedit.step(tiny, state, REQS)
    for d in edit.deltas:
        P = state.P[d.layer]
        dims = state.base.stats["nullspace_dims"][d.layer]
        assert 0 < dims < 48
        # k0 ⟂ range(P): the eigenvectors of C with eigenvalues above the threshold
        w, V = np.linalg.eigh(tiny_C[d.layer])
        K0 = V[:, w >= 1e-2]
        np.testing.assert_allclose(P @ K0, 0, atol=1e-10)
        # the share of C's trace in the null space: its eigenvalues below the threshold
        energy = state.base.stats["nullspace_energy"][d.layer]
        np.testing.assert_allclose(energy, w[w < 1e-2].sum() / w.sum(), rtol=1e-9)
        dW = d.matrix().astype(np.float64)
        out = K0.T @ dW  # rows: k0ᵀ ΔW
        assert np.linalg.norm(out, axis=1).max() <= 1e-4 * max(np.linalg.norm(dW), 1e-12) + 1e-7
        assert np.linalg.norm(dW) > 0
    assert state2.rounds == 1 and state2.edits == 3
    assert all(np.linalg.norm(state2.KpKp[x]) > 0 for x in (1, 2))


def test_alphaedit_resume_equals_uninterrupted_and_foreign_state_is_refused(tiny, tiny_C, tmp_path):
    hp = tiny_hp(alphaedit.AlphaEditHparams, nullspace_threshold=1e-2, L2=1.0)
    fresh = lambda h=hp: alphaedit.make_state(tiny, memit.make_state(tiny, h, tiny_C))  # noqa: E731
    # uninterrupted: two rounds
    e1, _, s1 = alphaedit.step(tiny, fresh(), REQS[:2])
    lm1 = je.apply(tiny, e1)
    e2, _, s2 = alphaedit.step(lm1, s1, REQS[2:])
    # interrupted after round 1: saved, reloaded into a freshly prepared state
    path = alphaedit.save_state(s1, tmp_path / "state.safetensors")
    r1 = alphaedit.load_state(fresh(), path)
    assert r1.rounds == 1 and r1.edits == 2
    e2r, _, s2r = alphaedit.step(je.apply(tiny, e1), r1, REQS[2:])
    for a, b in zip(e2.deltas, e2r.deltas, strict=True):
        np.testing.assert_array_equal(a.matrix(), b.matrix())
    for x in (1, 2):
        np.testing.assert_array_equal(s2.KpKp[x], s2r.KpKp[x])
    # another layer range / another threshold / another model: refused
    with pytest.raises(CheckpointError, match="layers"):
        alphaedit.load_state(fresh(dataclasses.replace(hp, layers=(2,))), path)
    with pytest.raises(CheckpointError, match="nullspace_threshold"):
        alphaedit.load_state(fresh(dataclasses.replace(hp, nullspace_threshold=5e-2)), path)
    with pytest.raises(CheckpointError, match="model"):
        alphaedit.load_state(dataclasses.replace(fresh(), model="0" * 16), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    with pytest.raises(CheckpointError):
        alphaedit.load_state(fresh(), tmp_path / "junk.safetensors")


def test_joint_with_one_layer_is_the_layer_solve(tiny, tiny_C):
    """One layer, one pass: the joint ΔW = P[K K_p] (AᵀA + L2 I)⁻¹ [R; 0] equals AlphaEdit's
    (P(KKᵀ + K_pK_pᵀ) + L2 I)⁻¹ P K Rᵀ (push-through identity), in round 1 and round 2."""
    deltas = {}
    for joint in (False, True):
        hp = tiny_hp(
            alphaedit.AlphaEditHparams,
            layers=(2,),
            nullspace_threshold=1e-2,
            L2=1.0,
            joint=joint,
            joint_passes=1,
        )
        state, lm, deltas[joint] = (
            alphaedit.make_state(tiny, memit.make_state(tiny, hp, tiny_C)),
            tiny,
            [],
        )
        for batch in (REQS[:2], REQS[2:]):
            edit, _, state = alphaedit.step(lm, state, batch)
            lm = je.apply(lm, edit)
            deltas[joint].append(edit.deltas[0].matrix())
    for a, b in zip(deltas[False], deltas[True], strict=True):
        assert np.linalg.norm(a) > 0
        np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_joint_keeps_the_earlier_edits_summed_writes_and_resumes(tiny, tiny_C, tmp_path):
    """Round 2 leaves Σ_l K_p,lᵀ ΔW_l (the earlier edits' writes, summed over the layers) at
    zero while writing its own; its state (the keys K_p) saves, resumes and is refused by a
    per-layer run."""
    hp = tiny_hp(alphaedit.AlphaEditHparams, nullspace_threshold=1e-2, L2=1e-6, joint=True)
    fresh = lambda h=hp: alphaedit.make_state(tiny, memit.make_state(tiny, h, tiny_C))  # noqa: E731
    e1, _, s1 = alphaedit.step(tiny, fresh(), REQS[:2])
    lm1 = je.apply(tiny, e1)
    e2, info, s2 = alphaedit.step(lm1, s1, REQS[2:])
    assert [x.shape for x in s2.Kp.values()] == [(48, 3), (48, 3)]
    on_earlier = sum(s1.Kp[d.layer].T @ d.matrix() for d in e2.deltas)  # [2 D]
    K2 = {x: spread.request_keys(lm1, x, REQS[2:], FIXED, s1.base.groups) for x in (1, 2)}
    on_own = sum(K2[d.layer].T @ d.matrix() for d in e2.deltas)  # [1 D]
    assert np.linalg.norm(on_earlier) <= 1e-3 * np.linalg.norm(on_own)
    residuals = info["layers_info"][-1]["pass_residuals"]
    assert len(residuals) == 2 and residuals[1] < residuals[0]
    path = alphaedit.save_state(s1, tmp_path / "joint.safetensors")
    e2r, _, s2r = alphaedit.step(lm1, alphaedit.load_state(fresh(), path), REQS[2:])
    for a, b in zip(e2.deltas, e2r.deltas, strict=True):
        np.testing.assert_array_equal(a.matrix(), b.matrix())
    np.testing.assert_array_equal(s2.Kp[2], s2r.Kp[2])
    with pytest.raises(CheckpointError, match="joint"):
        alphaedit.load_state(fresh(dataclasses.replace(hp, joint=False)), path)
    with pytest.raises(ConfigError, match="norm_penalty"):
        dataclasses.replace(hp, norm_penalty=1.0)


def test_z_cache_reuses_and_recomputes_bad_files(tiny, tiny_C, tmp_path):
    hp = tiny_hp(memit.MEMITHparams)
    state = dataclasses.replace(memit.make_state(tiny, hp, tiny_C), z_cache=str(tmp_path))
    calls = []

    def counted(reqs):
        calls.append(len(reqs))
        return target_opt.target_values(
            tiny, "resid", 2, reqs, FIXED, hp.target_settings(), (hp.kl_prompt,), lanes=4
        )

    args = (tiny, "resid", 2, REQS, FIXED, hp.target_settings(), (hp.kl_prompt,))
    first, hits = target_cache.cached_target_values(str(tmp_path), counted, *args)
    assert hits == 0 and calls == [3] and len(list(tmp_path.glob("*.npz"))) == 3
    again, hits = target_cache.cached_target_values(str(tmp_path), counted, *args)
    assert hits == 3 and calls == [3]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.v_star, b.v_star)
        assert a.steps == b.steps
    # a damaged file is recomputed, not trusted
    sorted(tmp_path.glob("*.npz"))[0].write_bytes(b"garbage")
    _, hits = target_cache.cached_target_values(str(tmp_path), counted, *args)
    assert hits == 2 and calls == [3, 1]
    # the method reads the same cache (no new computation): its z's are the cached ones
    cached, hits = target_cache.cached_target_values(str(tmp_path), counted, *args)
    assert hits == 3
    zs, _ = memit.target_zs(tiny, state, REQS)
    np.testing.assert_array_equal(zs, np.stack([t.v_star for t in cached], 1))


def test_bad_input(tiny, tiny_C):
    hp = tiny_hp(memit.MEMITHparams)
    state = memit.make_state(tiny, hp, tiny_C)
    clash = [REQS[0], dataclasses.replace(REQS[0], target_new="Madrid")]
    with pytest.raises(InputError, match="different targets"):
        memit.compute(tiny, state, clash)
    # the same fact twice with the same target is fine (one key, one value)
    memit.spread.check_requests([REQS[0], REQS[0]])
    # a singular system: C = 0 and fewer keys than dimensions; the ridge makes it solvable
    zero = {x: np.zeros((48, 48)) for x in range(3)}
    with pytest.raises(InputError, match="singular"):
        memit.compute(tiny, memit.make_state(tiny, hp, zero), REQS[:1])
    ridged = dataclasses.replace(hp, ridge=1e-3)
    edit, _ = memit.compute(tiny, memit.make_state(tiny, ridged, zero), REQS[:1])
    assert np.isfinite(edit.deltas[0].matrix()).all()
    with pytest.raises(ConfigError, match="increasing"):
        memit.MEMITHparams(layers=(2, 1))
    with pytest.raises(ConfigError, match="L2"):
        alphaedit.AlphaEditHparams(layers=(1,), L2=0.0)
    with pytest.raises(InputError, match="out of range"):
        memit.make_state(tiny, memit.MEMITHparams(layers=(1, 7), context_templates=FIXED), tiny_C)
    with pytest.raises(InputError, match="threshold"):
        alphaedit.make_state(
            tiny,
            memit.make_state(
                tiny, tiny_hp(alphaedit.AlphaEditHparams, nullspace_threshold=1e-9), tiny_C
            ),
        )


def test_protocol_names(smollm):
    assert {"memit", "alphaedit", "emmet"} <= set(je.methods.names())
    m = je.methods.get("alphaedit")
    assert m.hparams_cls is alphaedit.AlphaEditHparams
    for name in ("memit", "emmet"):
        hp = je.methods.get(name).hparams("smollm2-135m")
        assert hp.layers[-1] < smollm.config.n_layers
    assert je.methods.get("emmet").hparams("gpt-j").layers == (5,)


@pytest.mark.slow  # ~45 s; MEMIT on tiny models and ROME on the embedded model stay default
@pytest.mark.parametrize("name", ["memit", "emmet", "alphaedit"])
def test_edits_the_embedded_model(smollm, name, tmp_path):
    """A batch of three facts, written into layers of the embedded model at once: each
    rewrite prompt now puts its new target first."""
    m = je.methods.get(name)
    hp = m.hparams("smollm2-135m", mom2_n_tokens=2048, z_lanes=4)
    state = m.prepare(smollm, hp, cache_dir=str(tmp_path))
    edit, info = m.compute(smollm, state, REQS)
    lm2 = je.apply(smollm, edit)
    for r in REQS:
        best = top_k(lm2, r.rewrite_prompt, 1)[0]["token"]
        assert best.strip() == r.target_new, (name, r, best, info)
