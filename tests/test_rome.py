"""ROME and its building blocks: the solves on random matrices, prompts and keys, the target
value kernel (suffix steps = full forward), hparams, the edit on a tiny model (each variant's
invariant) and the acceptance edit on the embedded model (Eiffel Tower -> Rome)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

import jaxedit as je
from jaxedit import hparams as hparams_lib
from jaxedit.errors import ConfigError, InputError
from jaxedit.methods import rome
from jaxedit.methods.common import keys, linalg, target_opt, templates
from jaxedit.models.generate import next_token_logprobs, top_k
from jaxedit.models.sites import SitePatch, get_weight
from jaxedit.models.transformer import forward_jit, init_params, run_layers
from jaxedit.requests import EditRequest, from_prompt
from jaxedit.stats import DEFAULT_N_TOKENS, layer_stats

EIFFEL = EditRequest(
    prompt="{} is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)
# Same prompt and target length as EIFFEL: the same compiled shapes (no recompile per request).
LOUVRE = EditRequest(
    prompt="{} is located in the city of", subject="The Louvre", target_new="Berlin"
)
FIXED = ("{}", "The following is true. {}", "I read this today. {}")

# Depth (number of blocks) of the models each preset is written for (their HF configs).
PRESET_DEPTH = {
    "gpt2-xl": 48,
    "gpt-j": 28,
    "llama-7b": 32,
    "llama3-8b": 32,
    "qwen2.5-7b": 28,
    "smollm2-135m": 30,
}


def rome_id(lm) -> int:
    ids = lm.tokenizer.encode_continuation(" Rome")
    assert len(ids) == 1, ids
    return ids[0]


# ----------------------------------------------------------------------------- solves


def _spd(F: int, rng) -> np.ndarray:
    A = rng.standard_normal((F, 3 * F))
    return A @ A.T / (3 * F) + 0.05 * np.eye(F)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_maps_key_to_value_and_spares_orthogonal_keys(seed):
    rng = np.random.default_rng(seed)
    F, D = 48, 20
    W = rng.standard_normal((F, D)).astype(np.float32)
    C = _spd(F, rng)
    k_star = rng.standard_normal(F)
    v_star = rng.standard_normal(D) * 3
    u = linalg.spd_solve(linalg.spd_factor(C), k_star)
    np.testing.assert_allclose(C @ u, k_star, rtol=1e-9, atol=1e-9)  # u = C⁻¹k*, by a solve
    u_hat = u / np.linalg.norm(u)
    lam = linalg.rank_one_right(u_hat, k_star, v_star, k_star @ W)
    delta = je.WeightDelta("mlp_out", 0, u_hat[:, None], lam[:, None])
    W_new = W + delta.matrix()
    got = k_star.astype(np.float32) @ W_new
    assert np.linalg.norm(got - v_star) / np.linalg.norm(v_star) <= 1e-5
    # keys orthogonal to C⁻¹k* (the update's row space) see no change
    for _ in range(5):
        k = rng.standard_normal(F)
        k -= (k @ u_hat) * u_hat
        np.testing.assert_allclose(k @ W_new, k @ W, rtol=1e-5, atol=1e-5)
    # ΔW = (C⁻¹k*) Λᵀ / ((C⁻¹k*)ᵀ k*), the paper's form, of rank one
    expected = np.outer(u, (v_star - k_star @ W) / (u @ k_star))
    np.testing.assert_allclose(delta.matrix(), expected, rtol=1e-4, atol=1e-6)
    assert np.linalg.matrix_rank(delta.matrix().astype(np.float64), tol=1e-6) == 1
    # several right-hand sides at once (MEMIT's form)
    B = rng.standard_normal((F, 3))
    np.testing.assert_allclose(C @ linalg.spd_solve(linalg.spd_factor(C), B), B, atol=1e-9)


def test_singular_or_non_finite_second_moment_is_refused_and_ridge_helps():
    rng = np.random.default_rng(0)
    F = 16
    A = rng.standard_normal((F, 4))
    C = A @ A.T  # rank 4
    k = rng.standard_normal(F)
    with pytest.raises(InputError, match="singular"):
        linalg.spd_factor(C)
    f = linalg.spd_factor(C, ridge=1e-3)
    u = linalg.spd_solve(f, k)
    ridged = C + 1e-3 * np.mean(np.diag(C)) * np.eye(F)
    np.testing.assert_allclose(ridged @ u, k, rtol=1e-6, atol=1e-8)
    with pytest.raises(InputError, match="non-finite"):
        linalg.spd_factor(np.full((F, F), np.nan))
    with pytest.raises(InputError, match="right-hand side"):
        linalg.spd_solve(linalg.spd_factor(np.eye(F + 1)), k)
    with pytest.raises(InputError, match="orthogonal"):
        linalg.rank_one_right(np.eye(F)[0], np.eye(F)[1], np.ones(3), np.zeros(3))


def test_null_space_projector_annihilates_the_keys():
    rng = np.random.default_rng(0)
    F = 24
    K0 = rng.standard_normal((F, 10))  # keys spanning a 10-dim subspace
    P = linalg.null_space_projector(K0 @ K0.T, threshold=1e-8)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    np.testing.assert_allclose(P @ P, P, atol=1e-10)  # a projector
    assert round(np.trace(P)) == F - 10  # onto the complement
    np.testing.assert_allclose(K0.T @ P, 0, atol=1e-10)


def test_average_over_template_groups():
    x = np.arange(12, dtype=np.float64).reshape(1, 4, 3)  # 4 templates
    np.testing.assert_array_equal(keys.average_over_templates(x), x.mean(1))
    # MEMIT: ["{}"] and three longer templates weigh one half each
    want = 0.5 * x[:, 0] + 0.5 * x[:, 1:].mean(1)
    np.testing.assert_allclose(keys.average_over_templates(x, (1, 3)), want)
    with pytest.raises(InputError, match="groups"):
        keys.average_over_templates(x, (1, 2))


# ----------------------------------------------------------------------------- prompts and keys


def test_compose_and_subject_last_token(smollm):
    text, s, e = keys.compose("Some text. {}", "{} is located in the city of", "The Eiffel Tower")
    assert text == "Some text. The Eiffel Tower is located in the city of"
    assert text[s:e] == "The Eiffel Tower"
    ids, i = keys.encode_at_subject(
        smollm.tokenizer, "Some text. {}", EIFFEL.prompt, "The Eiffel Tower"
    )
    assert smollm.tokenizer.decode([ids[i]]).strip() == "Tower"
    # braces escaped in data-set prompts are unescaped, as str.format would
    text, s, e = keys.compose("{}", "{} uses {{braces}} in", "X")
    assert text == "X uses {braces} in" and text[s:e] == "X"


def test_target_batch_teacher_forcing(smollm):
    tok = smollm.tokenizer
    b = target_opt.target_batch(tok, EIFFEL.prompt, EIFFEL.subject, "Rome", ("{}", "Hello. {}"))
    tgt = target_opt.target_ids(tok, "Rome")
    assert tgt == [rome_id(smollm)]  # a space is prepended
    n_prompt = len(tok.encode(EIFFEL.rewrite_prompt))
    # the logits at the prompt's last token predict the first target token
    assert b.logit_pos[0, 0] == n_prompt - 1
    assert b.tokens.shape[0] == 3 and b.targets.shape[0] == 2
    assert b.weights.sum() == len(tgt) and b.targets.shape[1] == len(b.weights)
    # a multi-token target is padded to a power of two; padding has weight 0
    b3 = target_opt.target_batch(tok, EIFFEL.prompt, EIFFEL.subject, "Rio de Janeiro", ("{}",))
    n3 = len(target_opt.target_ids(tok, "Rio de Janeiro"))
    assert n3 > 2
    assert b3.weights.tolist() == [1.0] * n3 + [0.0] * (b3.targets.shape[1] - n3)
    assert b3.targets.shape[1] == 1 << (n3 - 1).bit_length()
    row = b3.tokens[0][b3.mask[0]].tolist()
    assert tok.decode(row) == EIFFEL.rewrite_prompt + tok.decode(b3.targets[0, : n3 - 1])
    kl_ids = tok.encode("The Eiffel Tower is a")
    assert tok.decode([kl_ids[b.lookup[-1]]]).strip() == "Tower"
    assert (b.logit_pos[-1] == b.lookup[-1]).all()  # KL at the subject's last token


def test_context_templates_are_seeded_and_checked(smollm):
    a = templates.sample_templates(smollm, ((3, 2),), seed=0)
    b = templates.sample_templates(smollm, ((3, 2),), seed=0)
    c = templates.sample_templates(smollm, ((3, 2),), seed=1)
    assert a == b and a != c and a[0] == "{}" and len(a) == 3
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])
    with pytest.raises(InputError, match="bare"):
        templates.check_templates(["Hi. {}", "{}"])
    with pytest.raises(InputError, match="exactly one"):
        templates.check_templates(["{}", "no placeholder"])


# ----------------------------------------------------------------------------- hparams


def test_every_preset_loads_with_a_layer_inside_its_model(smollm):
    m = je.methods.get("rome")
    assert sorted(hparams_lib.presets("rome")) == sorted(PRESET_DEPTH)
    for name, depth in PRESET_DEPTH.items():
        hp = m.hparams(name)
        assert isinstance(hp, rome.ROMEHparams)
        assert 0 <= hp.layer < depth, name
    # the embedded model maps to its preset, whose layer exists in it
    assert m.hparams(smollm) == m.hparams("smollm2-135m")
    assert m.hparams(smollm).layer < smollm.config.n_layers == PRESET_DEPTH["smollm2-135m"]


def test_hparams_overrides_and_refusals(tmp_path):
    m = je.methods.get("rome")
    hp = m.hparams("smollm2-135m", layer=3, context_templates=["{}", "Hi. {}"])
    assert hp.layer == 3 and hp.context_templates == ("{}", "Hi. {}")
    with pytest.raises(ConfigError, match="unknown"):
        m.hparams("smollm2-135m", stats_cache="x")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": 3, "rewrite_module_tmp": "transformer.h.{}.mlp"}))
    with pytest.raises(ConfigError, match="unknown"):
        m.hparams(str(bad))
    for field, value, match in [
        ("variant", "nope", "variant"),
        ("context_templates", ["Hi. {}"], "bare"),
        ("kl_prompt", "no placeholder", "kl_prompt"),
        ("mom2_n_tokens", None, "mom2_n_tokens"),
    ]:
        bad.write_text(json.dumps({"layer": 3, field: value}))
        with pytest.raises(ConfigError, match=match):
            m.hparams(str(bad))
    with pytest.raises(InputError, match="preset"):
        m.hparams("no-such-preset")


def test_one_default_statistics_size():
    import argparse
    import inspect

    from jaxedit.cli.commands import stats as stats_cmd

    p = argparse.ArgumentParser()
    stats_cmd.add_arguments(p)
    assert rome.ROMEHparams(layer=0).mom2_n_tokens == DEFAULT_N_TOKENS
    assert inspect.signature(layer_stats).parameters["n_tokens"].default == DEFAULT_N_TOKENS
    assert p.parse_args(["--layer", "0"]).tokens == DEFAULT_N_TOKENS


def test_request_and_layer_errors(smollm):
    with pytest.raises(InputError, match="not found"):
        from_prompt("The Louvre is in", "The Eiffel Tower", "Rome")
    with pytest.raises(InputError, match="empty target"):
        EditRequest(prompt="{} is in", subject="The Eiffel Tower", target_new="  ")
    with pytest.raises(InputError, match="placeholder"):
        EditRequest(prompt="The Eiffel Tower is in", subject="The Eiffel Tower", target_new="Rome")
    m = je.methods.get("rome")
    hp = m.hparams("smollm2-135m", layer=99, mom2_adjustment=False, context_templates=["{}"])
    with pytest.raises(InputError, match="out of range"):
        m.prepare(smollm, hp)
    with pytest.raises(InputError, match="needs the key statistics"):
        rome.make_state(smollm, dataclasses.replace(hp, layer=1, mom2_adjustment=True), None)


# ----------------------------------------------------------------------------- the edit (tiny)


@pytest.fixture(scope="module")
def tiny(smollm):
    """A random 3-layer model speaking SmolLM2's tokenizer: cheap to edit, real prompts."""
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


@pytest.fixture(scope="module")
def tiny_C():
    A = np.random.default_rng(0).standard_normal((48, 200))
    return A @ A.T / 200


TINY_HP = rome.ROMEHparams(layer=1, v_num_grad_steps=8, context_templates=FIXED)


def test_tiny_edit_is_pure_reproducible_and_invertible(tiny, tiny_C, tmp_path):
    m = je.methods.get("rome")
    state = rome.make_state(tiny, TINY_HP, tiny_C)
    before = jax.tree.map(np.asarray, tiny.params)
    p0 = float(jnp.exp(next_token_logprobs(tiny, [EIFFEL.rewrite_prompt])[0, rome_id(tiny)]))
    edit, info = m.compute(tiny, state, [EIFFEL])
    again, _ = m.compute(tiny, state, [EIFFEL])
    # the input params are untouched; the same state gives the same edit
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, tiny.params))
    np.testing.assert_array_equal(edit.deltas[0].left, again.deltas[0].left)
    np.testing.assert_array_equal(edit.deltas[0].right, again.deltas[0].right)
    (d,) = edit.deltas
    assert (d.site, d.layer, d.left.shape, d.right.shape) == ("mlp_out", 1, (48, 1), (32, 1))
    assert abs(np.linalg.norm(d.left) - 1) < 1e-6  # û is a unit vector
    assert info["edits"][0]["steps"] >= 1 and info["layer"] == 1
    json.dumps(info)  # JSON-able
    new = je.apply(tiny, edit)
    # only the edited layer's mlp_out weight changed, by exactly û Λᵀ
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.params, tiny.params
    )
    assert sum(jax.tree.leaves(changed)) == 1
    np.testing.assert_allclose(
        get_weight(new.params, "mlp_out", 1) - get_weight(tiny.params, "mlp_out", 1),
        d.matrix(),
        atol=1e-6,
    )
    restored = je.apply(new, edit.invert())
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored.params, tiny.params
    )
    p1 = float(jnp.exp(next_token_logprobs(new, [EIFFEL.rewrite_prompt])[0, rome_id(tiny)]))
    assert p1 > p0  # " Rome" became likelier
    path = je.save_edit(edit, tmp_path / "e.safetensors")
    loaded = je.load_edit(path)
    np.testing.assert_array_equal(loaded.deltas[0].left, d.left)
    assert loaded.meta["method"] == "rome" and loaded.meta["hparams"]["layer"] == 1


@pytest.mark.parametrize("variant", ["corrected", "paper"])
@pytest.mark.parametrize("mom2", [True, False])
def test_each_variant_maps_its_key_to_v_star(tiny, tiny_C, variant, mom2):
    """corrected: the edited layer maps the template-averaged key k* to v*; paper: it maps the
    bare prompt's key to v*. u = C⁻¹k* (or k* without the second-moment adjustment)."""
    hp = dataclasses.replace(TINY_HP, variant=variant, mom2_adjustment=mom2)
    edit, _ = rome.compute(tiny, rome.make_state(tiny, hp, tiny_C if mom2 else None), [EIFFEL])
    tv = target_opt.target_value(tiny, "mlp_out", 1, EIFFEL, FIXED, hp.target_settings())
    req = [(EIFFEL.prompt, EIFFEL.subject)]
    k_before, _ = keys.subject_reprs(tiny, (1,), req, FIXED)
    k_after, out_after = keys.subject_reprs(je.apply(tiny, edit), (1,), req, FIXED)
    np.testing.assert_array_equal(k_after, k_before)  # the layer's keys do not change
    k_star = k_before[0, 0].mean(0)
    if variant == "corrected":
        mapped = out_after[0, 0].mean(0)  # W' k* + b = mean_j (W' k_j + b)
    else:
        mapped = out_after[0, 0, 0]  # the bare prompt "{}"
    assert np.linalg.norm(mapped - tv.v_star) <= 1e-4 * np.linalg.norm(tv.v_star)
    u = np.linalg.solve(tiny_C, k_star) if mom2 else k_star
    np.testing.assert_allclose(edit.deltas[0].left[:, 0], u / np.linalg.norm(u), atol=1e-6)


def test_sequential_edits_fold(tiny, tiny_C):
    state = rome.make_state(tiny, TINY_HP, tiny_C)
    both, info = rome.compute(tiny, state, [EIFFEL, LOUVRE])
    first, _ = rome.compute(tiny, state, [EIFFEL])
    second, _ = rome.compute(je.apply(tiny, first), state, [LOUVRE])
    # the second request is edited on the first one's result
    np.testing.assert_allclose(both.deltas[1].right, second.deltas[0].right, rtol=1e-5, atol=1e-6)
    assert len(info["edits"]) == 2
    np.testing.assert_allclose(
        get_weight(je.apply(tiny, both).params, "mlp_out", 1),
        get_weight(je.apply(je.apply(tiny, first), second).params, "mlp_out", 1),
        atol=1e-6,
    )


def test_target_value_vmaps_over_requests(tiny):
    """The kernel is pure in arrays: requests of one shape go through `jax.vmap` (MEMIT's z
    for many requests at `resid`), each getting exactly its own run; a request that stops
    first stays frozen while the others continue."""
    runs = []
    for req in (EIFFEL, LOUVRE):
        b = target_opt.target_batch(tiny.tokenizer, req.prompt, req.subject, req.target_new, FIXED)
        S = target_opt.suffix_length(b)
        vals, logp, suffix = target_opt.clean_run(
            tiny.config, "resid", 1, S, tiny.params, b.tokens, b.mask, b.lookup, b.logit_pos
        )
        R = len(FIXED)
        runs.append((suffix, jnp.asarray(b.targets), jnp.asarray(b.weights), logp[R:], vals[0]))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *runs)
    hp = target_opt.TargetSettings().arrays()
    steps = (3, 6)
    in_axes = (0, 0, 0, 0, 0, {k: 0 if k == "steps" else None for k in hp})
    kernel = functools.partial(target_opt.optimise, tiny.config, "resid", 1, tiny.params)
    batched = jax.jit(jax.vmap(kernel, in_axes=in_axes))(
        *stacked, {**hp, "steps": jnp.asarray(steps, jnp.int32)}
    )
    for i, n in enumerate(steps):
        one = target_opt.optimise_jit(
            tiny.config, "resid", 1, tiny.params, *runs[i], {**hp, "steps": jnp.int32(n)}
        )
        assert int(batched.steps[i]) == int(one.steps) == n
        np.testing.assert_allclose(batched.delta[i], one.delta, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batched.loss[i], one.loss, rtol=1e-5)
    assert not np.allclose(batched.delta[0], batched.delta[1])


@pytest.mark.parametrize(
    "which,site,layer", [("tiny", "mlp_out", 0), ("tiny", "resid", 2), ("smollm", "mlp_out", 4)]
)
def test_suffix_steps_equal_the_full_forward(which, site, layer, request):
    """Each target-value step runs blocks l..L-1 on the positions from the last subject token
    on, over the unedited prefix cache: the same target logits as the full patched forward
    (at mlp_out for ROME's v*, at resid for MEMIT's z)."""
    lm = request.getfixturevalue(which)
    cfg = lm.config
    b = target_opt.target_batch(
        lm.tokenizer,
        EIFFEL.prompt,
        EIFFEL.subject,
        "Rio de Janeiro",
        ("{}", "A short text. {}", "Hi. {}"),
    )
    S = target_opt.suffix_length(b)
    *_, suffix = target_opt.clean_run(
        cfg, site, layer, S, lm.params, b.tokens, b.mask, b.lookup, b.logit_pos
    )
    delta = jax.random.normal(jax.random.key(1), (cfg.d_model,)) * 3.0
    B, T = b.tokens.shape
    at = (np.arange(cfg.n_layers) == layer)[:, None, None] & (
        np.arange(T)[None, None, :] == b.lookup[None, :, None]
    )
    value = jnp.broadcast_to(delta, (cfg.n_layers, 1, T, cfg.d_model))
    full = forward_jit(
        cfg,
        lm.params,
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        patch={site: SitePatch(jnp.asarray(at), value, jnp.asarray(True))},
        logit_positions=jnp.asarray(b.logit_pos),
    ).logits
    at_s = (np.arange(cfg.n_layers) == layer)[:, None, None] & (np.arange(S) == 0)[None, None]
    short = run_layers(
        cfg,
        lm.params,
        suffix.h,
        suffix.mask,
        layer,
        patch={
            site: SitePatch(
                jnp.asarray(np.broadcast_to(at_s, (cfg.n_layers, B, S))),
                value[:, :, :S],
                jnp.asarray(True),
            )
        },
        logit_positions=suffix.logit_pos,
        positions=suffix.positions,
        cache=suffix.cache,
    )
    assert S < T  # the point: fewer positions per step
    np.testing.assert_allclose(np.asarray(short), np.asarray(full), atol=2e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def acceptance_hp(data_dir):
    """The preset with a small local wikitext C and three fixed templates (quick, offline)."""
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    return je.methods.get("rome").hparams(
        "smollm2-135m",
        mom2_corpus=corpus,
        mom2_n_tokens=4096,
        mom2_max_len=128,
        context_templates=FIXED,
    )


def test_acceptance_eiffel_tower_to_rome(smollm, acceptance_hp, tmp_path):
    """The issue's API block on the embedded model."""
    m = je.methods.get("rome")
    germany = "The capital of Germany is"
    top_germany = top_k(smollm, germany, 1)[0]["token"]
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"
    state = m.prepare(smollm, acceptance_hp, cache_dir=str(tmp_path / "stats"))
    edit, info = m.compute(smollm, state, [EIFFEL])
    lm2 = je.apply(smollm, edit)
    assert top_k(lm2, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Rome"
    assert top_k(lm2, germany, 1)[0]["token"] == top_germany
    assert info["stats_tokens"] == 4096 and info["stats_from_cache"] is False
    lm0 = je.apply(lm2, edit.invert())
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), lm0.params, smollm.params
    )
    path = je.save_edit(edit, tmp_path / "edit.safetensors")
    loaded = je.load_edit(path)
    assert len(loaded.deltas) == len(edit.deltas) == 1
    for a, b in zip(loaded.deltas, edit.deltas, strict=True):
        assert (a.site, a.layer) == (b.site, b.layer)
        np.testing.assert_array_equal(a.left, b.left)
        np.testing.assert_array_equal(a.right, b.right)
    jax.tree.map(np.testing.assert_array_equal, je.apply(smollm, loaded).params, lm2.params)
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"  # original untouched
    again = m.prepare(smollm, acceptance_hp, cache_dir=str(tmp_path / "stats"))
    assert again.stats["from_cache"] is True


@pytest.mark.slow
def test_acceptance_full_preset_reproducible(smollm, data_dir, tmp_path):
    """The whole preset (21 sampled templates, 20 steps), twice under the same seed."""
    m = je.methods.get("rome")
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    hp = m.hparams("smollm2-135m", mom2_corpus=corpus, mom2_n_tokens=4096, mom2_max_len=128)
    state = m.prepare(smollm, hp, cache_dir=str(tmp_path))
    edit, _ = m.compute(smollm, state, [EIFFEL])
    edit2, _ = m.compute(smollm, m.prepare(smollm, hp, cache_dir=str(tmp_path)), [EIFFEL])
    np.testing.assert_array_equal(edit.deltas[0].right, edit2.deltas[0].right)
    lm2 = je.apply(smollm, edit)
    assert top_k(lm2, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Rome"
    assert top_k(lm2, "The capital of Germany is", 1)[0]["token"] == " Berlin"
