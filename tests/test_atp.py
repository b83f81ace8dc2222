"""Attribution patching: the estimator against exact restorations (first-order exact on a tiny
model), the window sums, GradDrop's definition, the trace.json schema, --verify-top against the
exact grid's kernel, and the CLI (single fact, data set with facts.jsonl)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

from jaxedit.locate import atp
from jaxedit.locate import trace as tr
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import forward_jit, init_params

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"  # tokens 1..3: token 0 precedes the subject
T, S, SUBJ = 6, 3, (1, 3)  # tiny model: 6 tokens, 3 noise samples, subject tokens 1..2


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_llama_config(vocab_size=40)
    params = init_params(cfg, seed=3)
    # Random-init weights (std 0.02) give a nearly linear model; larger ones make the
    # first-order test meaningful (curvature the estimate must not have).
    params = jax.tree.map(lambda w: w * 4 if w.ndim >= 2 else w, params)
    tokens = jnp.asarray([[5, 17, 3, 29, 11, 8]], jnp.int32)
    mask = jnp.ones((1, T), bool)
    subj = np.zeros((T,), bool)
    subj[SUBJ[0] : SUBJ[1]] = True
    direction = np.random.default_rng(0).standard_normal((S, T, cfg.d_model)).astype(np.float32)
    direction[:, ~subj] = 0
    return cfg, params, tokens, mask, jnp.asarray(subj), direction


def _exact_effects(cfg, params, tokens, mask, subj, eps, answer, site, cells):
    """mean_s [p_s(cell restored to its clean value) - p_s], by full patched forwards."""
    L = cfg.n_layers
    last = jnp.full((S, 1), T - 1)
    clean = forward_jit(cfg, params, tokens, mask, capture=(site,), logit_positions=last[:1])
    noise = SitePatch(jnp.broadcast_to(subj[None], (S, T)), jnp.asarray(eps), jnp.asarray(True))
    tok_s, mask_s = jnp.broadcast_to(tokens, (S, T)), jnp.broadcast_to(mask, (S, T))

    def p(patch):
        out = forward_jit(cfg, params, tok_s, mask_s, patch=patch, logit_positions=last)
        return np.asarray(jax.nn.softmax(out.logits[:, 0])[:, answer], np.float64)

    base = p({"embed": noise})
    out = []
    for layer, t in cells:
        m = (np.arange(L) == layer)[:, None, None] & (np.arange(T) == t)[None, None, :]
        restore = SitePatch(jnp.asarray(m), clean.captured[site], jnp.asarray(False))
        out.append(float(np.mean(p({"embed": noise, site: restore}) - base)))
    return np.asarray(out)


def test_estimate_is_first_order_exact(tiny):
    """AtP's Î = (a_clean - a_corrupt) · ∂p/∂a is the first-order term of the exact restored
    effect: its error is second order in the noise (half the noise, a quarter of the error),
    for each site, at noised and at later tokens, low and high layers."""
    cfg, params, tokens, mask, subj, direction = tiny
    cells = [(0, 1), (1, 2), (2, 2), (0, 4), (1, 5), (2, 3)]
    errors, relative = {}, {}
    for scale in (0.0025, 0.00125):
        eps = scale * direction
        answer, _, p_s, effects = atp._atp_effects(cfg, params, tokens, mask, subj, eps)
        for site in atp.SITES:
            est = np.asarray(effects[site], np.float64).mean(1)  # [L T]
            exact = _exact_effects(cfg, params, tokens, mask, subj, eps, answer, site, cells)
            got = np.asarray([est[layer, t] for layer, t in cells])
            assert np.abs(exact).max() > 3e-4  # the test has something to measure
            errors[scale, site] = np.abs(got - exact).max()
            relative[scale, site] = errors[scale, site] / np.abs(exact).max()
    for site in atp.SITES:
        assert relative[0.00125, site] < 0.15, relative
        assert errors[0.00125, site] < 0.3 * errors[0.0025, site], errors  # not first order


def test_one_ig_step_is_plain_atp(tiny):
    """ig_steps=1 evaluates the gradient at α = 0 only: plain AtP, to the bit; more steps move
    the gradient along the path, and the corrupted p_s reported stays the α = 0 run's."""
    cfg, params, tokens, mask, subj, direction = tiny
    eps = 0.02 * direction
    plain = atp._atp_effects(cfg, params, tokens, mask, subj, eps)
    one = atp._atp_effects(cfg, params, tokens, mask, subj, eps, ig_steps=1)
    four = atp._atp_effects(cfg, params, tokens, mask, subj, eps, ig_steps=4)
    for site in atp.SITES:
        np.testing.assert_array_equal(np.asarray(one[3][site]), np.asarray(plain[3][site]))
        assert not np.allclose(np.asarray(four[3][site]), np.asarray(plain[3][site]))
    np.testing.assert_allclose(np.asarray(four[2]), np.asarray(plain[2]), rtol=1e-5)
    assert int(four[0]) == int(plain[0])


def _relative_errors(tiny, scale, ig_steps, cells):
    cfg, params, tokens, mask, subj, direction = tiny
    eps = scale * direction
    answer, _, _, effects = atp._atp_effects(
        cfg, params, tokens, mask, subj, eps, ig_steps=ig_steps
    )
    out = {}
    for site in atp.SITES:
        est = np.asarray(effects[site], np.float64).mean(1)
        exact = _exact_effects(cfg, params, tokens, mask, subj, eps, answer, site, cells)
        got = np.asarray([est[layer, t] for layer, t in cells])
        out[site] = np.abs(got - exact).mean() / np.abs(exact).mean()
    return out


def test_ig_approaches_the_exact_restoration(tiny):
    """Averaging ∂p/∂a along the path from the corrupted input to the clean one: with tiny noise
    the IG estimate is as exact as plain AtP (both first order), and at a noise where the plain
    first-order estimate is off by more than the effect itself, 8 steps cut the error to well
    under half, for each site."""
    cells = [(0, 1), (1, 2), (2, 2), (0, 4), (1, 5), (2, 3), (1, 1), (2, 5)]
    tiny_noise = _relative_errors(tiny, 0.00125, 4, cells)
    plain = _relative_errors(tiny, 0.01, 1, cells)
    ig = _relative_errors(tiny, 0.01, 8, cells)
    for site in atp.SITES:
        assert tiny_noise[site] < 0.1, tiny_noise
        assert plain[site] > 1.0, plain  # the regime IG is for
        assert ig[site] < 0.4 * plain[site], (ig, plain)


def test_window_matrix_matches_window_layers():
    W = atp.window_matrix(12, 4)
    for c in range(12):
        lo, hi = tr.window_layers(c, 4, 12)
        assert W[c].tolist() == [1.0 if lo <= j < hi else 0.0 for j in range(12)]


def test_graddrop_at_the_top_layer(tiny):
    """No block lies above the last layer's block output, so dropping any layer leaves its
    gradient alone: GradDrop's (1/(L-1)) Σ_ℓ |Î^ℓ| is L/(L-1) |Î| there, per sample. Lower
    nodes do change (the gradient through the dropped blocks is gone)."""
    cfg, params, tokens, mask, subj, direction = tiny
    L = cfg.n_layers
    eps = 0.05 * direction
    _, _, _, plain = atp._atp_effects(cfg, params, tokens, mask, subj, eps)
    _, _, _, gd = atp._atp_effects(cfg, params, tokens, mask, subj, eps, graddrop=True)
    top = np.abs(np.asarray(plain["resid"][L - 1]))
    np.testing.assert_allclose(np.asarray(gd["resid"][L - 1]), top * L / (L - 1), rtol=1e-4)
    for site in atp.SITES:
        assert (np.asarray(gd[site]) >= 0).all()
    assert not np.allclose(np.asarray(gd["resid"][0]), np.abs(np.asarray(plain["resid"][0])))


# ----------------------------------------------------------------------------- embedded model


@pytest.fixture(scope="module")
def est(smollm):
    return atp.atp_trace(smollm, PROMPT, SUBJECT, samples=2, seed=1)


def test_schema_matches_the_exact_trace(est, smollm):
    assert est["method"] == "atp" and est["graddrop"] is False
    assert est["answer"] == " Paris" and est["subject_range"] == [1, 4]
    assert est["high_score"] == pytest.approx(0.7015, abs=2e-3)
    exact_keys = {"model", "method", "prompt", "subject", "tokens", "subject_range", "answer",
                  "answer_id", "high_score", "low_score", "noise", "samples", "window", "kinds",
                  "seconds"}  # fmt: skip
    assert exact_keys <= set(est)
    for kind in tr.KINDS:
        scores = est["kinds"][kind]["scores"]
        assert scores.shape == (10, smollm.config.n_layers) and np.isfinite(scores).all()
        assert (scores[0] == est["low_score"]).all()  # before the subject: no effect
        assert not (scores[1:] == est["low_score"]).all()
    json.dumps(tr.to_json(est))  # serialisable as trace.json


def test_low_score_and_noise_equal_the_exact_trace(est, smollm):
    exact = tr.exact_cells(smollm, PROMPT, SUBJECT, [("hidden", 0, 5)], samples=2, seed=1)
    assert float(exact[0]) == pytest.approx(est["low_score"], abs=1e-6)
    ids, (b, e) = tr.encode_fact(smollm, PROMPT, SUBJECT)[:2]
    nu = tr.noise_level("3s", smollm.params, ids[b:e])
    assert est["noise"] == pytest.approx(nu)


def test_windows_are_sums_of_layer_estimates(est, smollm):
    """mlp[t, c] - low = Σ_{j in window(c)} (per-layer estimate at j): with window 1 the
    per-layer estimates themselves, so the window-10 grid is their window sum."""
    one = atp.atp_trace(smollm, PROMPT, SUBJECT, samples=2, seed=1, window=1, kinds=["mlp"])
    per_layer = one["kinds"]["mlp"]["scores"] - one["low_score"]
    W = atp.window_matrix(smollm.config.n_layers, 10)
    np.testing.assert_allclose(
        est["kinds"]["mlp"]["scores"] - est["low_score"], per_layer @ W.T, atol=1e-6
    )


def test_exact_cells_equal_the_cell_by_cell_loop(smollm):
    cells = [("hidden", 3, 2), ("mlp", 2, 7), ("attn", 9, 20), ("hidden", 0, 4)]
    got = tr.exact_cells(smollm, PROMPT, SUBJECT, cells, samples=2, seed=1)
    ref = tr.trace_loop(smollm, PROMPT, SUBJECT, samples=2, seed=1, cells=cells)
    for cell, value in zip(cells, got, strict=True):
        assert abs(value - ref[cell]) <= 1e-5, (cell, value, ref[cell])


def test_verify_top_reruns_the_exact_patch(smollm):
    r = atp.atp_trace(smollm, PROMPT, SUBJECT, samples=2, seed=1, kinds=["hidden"], verify_top=2)
    cells = r["verified"]["hidden"]
    assert len(cells) == 2
    scores = r["kinds"]["hidden"]["scores"]
    assert cells[0]["estimate"] == pytest.approx(scores[1:].max())  # the highest first
    ref = tr.trace_loop(
        smollm, PROMPT, SUBJECT, samples=2, seed=1,
        cells=[("hidden", c["token"], c["layer"]) for c in cells],
    )  # fmt: skip
    for c in cells:
        assert c["exact"] == pytest.approx(ref[("hidden", c["token"], c["layer"])], abs=1e-5)


def test_ig_steps_on_the_embedded_model(smollm):
    """ig_steps reaches the trace (recorded in the result, same corrupted baseline as plain AtP,
    other estimates) and through trace_dataset's atp_options; bad values are refused."""
    kw = dict(samples=2, seed=1, kinds=["hidden"])
    plain = atp.atp_trace(smollm, PROMPT, SUBJECT, **kw)
    ig = atp.atp_trace(smollm, PROMPT, SUBJECT, ig_steps=2, **kw)
    assert (plain["ig_steps"], ig["ig_steps"]) == (1, 2)
    assert ig["low_score"] == pytest.approx(plain["low_score"], abs=1e-6)
    a, b = plain["kinds"]["hidden"]["scores"], ig["kinds"]["hidden"]["scores"]
    assert np.isfinite(b).all() and not np.allclose(a[1:], b[1:])
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "expect": "Paris"}]
    _, results = tr.trace_dataset(
        smollm, facts, samples=2, seed=1, kinds=["hidden"], method="atp",
        atp_options={"ig_steps": 2}, progress=False,
    )  # fmt: skip
    assert results[0]["ig_steps"] == 2
    for bad in (0, -1):
        with pytest.raises(tr.InputError, match="ig_steps"):
            atp.atp_trace(smollm, PROMPT, SUBJECT, ig_steps=bad, **kw)


def test_top_cells():
    grid = np.asarray([[9.0, 9.0], [1.0, np.nan], [3.0, 2.0]])
    assert atp.top_cells(grid, 2, first_row=1) == [(2, 0), (2, 1)]
    assert len(atp.top_cells(grid, 10, first_row=1)) == 3  # NaN never chosen


def test_trace_dataset_atp(smollm):
    facts = [
        {"prompt": PROMPT, "subject": SUBJECT, "expect": "Paris"},
        {"prompt": PROMPT, "subject": SUBJECT, "expect": "Rome"},  # the model says Paris
    ]
    summary, results = tr.trace_dataset(
        smollm, facts, samples=2, noise=0.1, method="atp", progress=False
    )
    assert summary["method"] == "atp"
    assert (summary["n_facts"], summary["n_skipped"]) == (1, 1)
    r = results[0]
    mean = summary["kinds"]["mlp"]["last subject token"]["mean"]
    np.testing.assert_allclose(mean, r["kinds"]["mlp"]["scores"][3] - r["low_score"], atol=1e-6)
    with pytest.raises(tr.InputError, match="method"):
        tr.trace_dataset(smollm, facts, method="gradient")


@pytest.fixture
def cli_model(smollm, monkeypatch):
    monkeypatch.setattr("jaxedit.cli.commands.trace.load_model", lambda args: smollm)


def test_cli_atp_single_fact(cli_model, capsys, tmp_path):
    from jaxedit.cli.main import main

    argv = ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2", "--seed", "1"]
    argv += ["--method", "atp", "--verify-top", "1", "--out", str(tmp_path / "o"), "--json"]
    assert main([*argv, "--no-compile-cache"]) == 0
    out = json.loads(capsys.readouterr().out)
    on_disk = json.load(open(tmp_path / "o" / "trace.json"))
    assert out["method"] == on_disk["method"] == "atp"
    assert out["ig_steps"] == on_disk["ig_steps"] == 1  # the CLI's default: plain AtP
    assert set(on_disk["verified"]) == set(tr.KINDS)
    assert {"compile_s", "run_s", "trace_s"} <= set(out["timing"])
    for kind in tr.KINDS:
        assert (tmp_path / "o" / f"trace_{kind}.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--verify-top", "2"], "--method atp"),
        (["--method", "atp", "--verify-top", "-1"], ">= 0"),
        (["--ig-steps", "2"], "--method atp"),
        (["--method", "atp", "--ig-steps", "0"], "--ig-steps must be >= 1"),
    ],
)
def test_cli_atp_errors(cli_model, capsys, tmp_path, extra, message):
    from jaxedit.cli.main import main

    argv = ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--out", str(tmp_path / "o")]
    assert main([*argv, *extra, "--no-compile-cache"]) == 2
    assert message in capsys.readouterr().err


def test_cli_dataset_writes_facts_jsonl(cli_model, capsys, tmp_path):
    from jaxedit.cli.main import main

    data = tmp_path / "facts.json"
    facts = [
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Paris"},
        {"prompt": "The Louvre is located in the city of", "subject": "The Louvre",
         "attribute": "Paris"},
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Rome"},
    ]  # fmt: skip
    data.write_text(json.dumps(facts))
    argv = ["trace", "--data", str(data), "--samples", "2", "--method", "atp", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-compile-cache"]) == 0
    summary = json.load(open(tmp_path / "o" / "summary.json"))
    lines = (tmp_path / "o" / "facts.jsonl").read_text().splitlines()
    assert summary["method"] == "atp" and len(lines) == summary["n_facts"] >= 1
    grids = [json.loads(line) for line in lines]
    assert [g["prompt"] for g in grids] == [f["prompt"] for f in facts[: len(grids)]]
    for g in grids:
        assert g["method"] == "atp" and len(g["kinds"]["hidden"]["scores"]) == len(g["tokens"])


def test_heatmap_of_an_atp_result(tmp_path):
    from jaxedit.locate import plots

    rng = np.random.default_rng(0)
    result = {
        "method": "atp",
        "tokens": ["The", " E", "iffel", " is"],
        "subject_range": [1, 3],
        "answer": " Paris",
        "low_score": 0.01,
        "window": 10,
        "kinds": {k: {"scores": rng.random((4, 6))} for k in tr.KINDS},
        "verified": {"mlp": [{"token": 2, "layer": 3, "estimate": 0.9, "exact": 0.5}]},
    }
    ax = plots.heatmap(result, "mlp")
    assert ax.get_title().startswith("AtP estimate")
    (marker,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert marker.get_xydata().tolist() == [[3.5, 2.5]]
    paths = plots.save_heatmaps(result, str(tmp_path))
    assert len(paths) == 3
