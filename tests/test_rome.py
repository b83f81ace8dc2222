"""ROME: the closed form on random matrices, prompts / keys, hparams, the edit on a tiny model
and the acceptance edit on the embedded model (Eiffel Tower -> Rome)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

from jaxedit import hparams as hparams_mod
from jaxedit.errors import ConfigError, InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.methods import rome
from jaxedit.models.generate import next_token_logprobs, top_k
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params
from jaxedit.requests import EditRequest, from_prompt
from jaxedit.stats import second_moment as stats

EIFFEL = EditRequest(
    prompt="{} is located in the city of",
    subject="The Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
)


# ----------------------------------------------------------------------------- closed form


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
    u = rome.left_vector(C, k_star)
    np.testing.assert_allclose(C @ u, k_star, rtol=1e-9, atol=1e-9)  # u = C⁻¹k*, by a solve
    u_hat = u / np.linalg.norm(u)
    lam = rome.right_vector(u_hat, k_star, v_star, k_star @ W)
    rec = rome.DeltaRecord(0, u_hat.astype(np.float32), lam.astype(np.float32))
    W_new = np.asarray(W + rec.matrix())
    got = k_star.astype(np.float32) @ W_new
    assert np.linalg.norm(got - v_star) / np.linalg.norm(v_star) <= 1e-5
    # keys orthogonal to C⁻¹k* (the update's row space) see no change
    for _ in range(5):
        k = rng.standard_normal(F)
        k -= (k @ u_hat) * u_hat
        np.testing.assert_allclose(k @ W_new, k @ W, rtol=1e-5, atol=1e-5)
    # the update is rank one and ΔW = Λ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) (the paper's form)
    expected = np.outer(u, (v_star - k_star @ W) / (u @ k_star))
    np.testing.assert_allclose(np.asarray(rec.matrix()), expected, rtol=1e-4, atol=1e-6)
    assert np.linalg.matrix_rank(np.asarray(rec.matrix(), np.float64), tol=1e-6) == 1


def test_no_mom2_adjustment_uses_the_key_itself():
    k = np.arange(1.0, 5.0)
    np.testing.assert_array_equal(rome.left_vector(None, k), k)


def test_singular_or_non_finite_covariance_is_refused_and_ridge_helps():
    rng = np.random.default_rng(0)
    F = 16
    A = rng.standard_normal((F, 4))
    C = A @ A.T  # rank 4
    k = rng.standard_normal(F)
    with pytest.raises(InputError, match="singular"):
        rome.left_vector(C, k)
    u = rome.left_vector(C, k, ridge=1e-3)
    assert np.all(np.isfinite(u))
    with pytest.raises(InputError, match="non-finite"):
        rome.left_vector(np.full((F, F), np.nan), k)
    with pytest.raises(InputError, match="shape"):
        rome.left_vector(np.eye(F + 1), k)


def test_delta_record_apply_invert_save(tmp_path):
    cfg = tiny_llama_config(64)
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    rec = rome.DeltaRecord(
        1,
        rng.standard_normal(cfg.d_ff).astype(np.float32),
        rng.standard_normal(cfg.d_model).astype(np.float32),
    )
    new = rec.apply(params)
    np.testing.assert_allclose(
        get_weight(new, "mlp_out", 1),
        get_weight(params, "mlp_out", 1) + np.outer(rec.u, rec.v),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(get_weight(new, "mlp_out", 0), get_weight(params, "mlp_out", 0))
    back = rec.invert().apply(new)
    np.testing.assert_allclose(
        get_weight(back, "mlp_out", 1), get_weight(params, "mlp_out", 1), atol=1e-6
    )
    path = rome.save_deltas([rec, rec.invert()], tmp_path / "d.npz")
    loaded = rome.load_deltas(path)
    assert [r.layer for r in loaded] == [1, 1]
    np.testing.assert_array_equal(loaded[1].v, -rec.v)
    assert abs(loaded[0].norm - rec.norm) < 1e-5


# ----------------------------------------------------------------------------- prompts and keys


def test_compose_and_subject_last_token(smollm):
    text, s, e = rome.compose("Some text. {}", "{} is located in the city of", "The Eiffel Tower")
    assert text == "Some text. The Eiffel Tower is located in the city of"
    assert text[s:e] == "The Eiffel Tower"
    ids, offsets = smollm.tokenizer.encode_with_offsets(text)
    i = rome.subject_last_index(offsets, s, e)
    assert smollm.tokenizer.decode([ids[i]]).strip() == "Tower"
    # braces escaped in data-set prompts are unescaped, as str.format would
    text, s, e = rome.compose("{}", "{} uses {{braces}} in", "X")
    assert text == "X uses {braces} in" and text[s:e] == "X"
    b = rome.build_batch(smollm, EIFFEL, ["{}", "Hello. {}"], "{} is a")
    tgt = rome.target_ids(smollm, "Rome")
    assert smollm.tokenizer.decode(tgt) == " Rome"
    n_prompt = len(smollm.tokenizer.encode(EIFFEL.rewrite_prompt))
    # teacher forcing: the logits at the prompt's last token predict the first target token
    assert b.logit_pos[0, 0] == n_prompt - 1
    assert b.tokens.shape[0] == 3 and b.targets.shape[0] == 2
    assert b.weights.sum() == len(tgt) and b.targets.shape[1] == len(b.weights)
    # a multi-token target is padded to a power of two; padding has weight 0
    rio = dataclasses.replace(EIFFEL, target_new="Rio de Janeiro")
    b3 = rome.build_batch(smollm, rio, ["{}"], "{} is a")
    n3 = len(rome.target_ids(smollm, "Rio de Janeiro"))
    assert b3.weights.tolist() == [1.0] * n3 + [0.0] * (b3.targets.shape[1] - n3)
    assert b3.targets.shape[1] == 1 << (n3 - 1).bit_length()
    kl_ids = smollm.tokenizer.encode("The Eiffel Tower is a")
    assert smollm.tokenizer.decode([kl_ids[b.lookup[-1]]]).strip() == "Tower"
    assert (b.logit_pos[-1] == b.lookup[-1]).all()  # KL at the subject's last token


def test_context_templates_are_seeded(smollm):
    a = rome.context_templates(smollm, ((3, 2),), seed=0)
    b = rome.context_templates(smollm, ((3, 2),), seed=0)
    assert a == b and a[0] == "{}" and len(a) == 3
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])


# ----------------------------------------------------------------------------- hparams


def test_presets_load_and_unknown_keys_are_refused(tmp_path):
    names = hparams_mod.presets("rome")
    for n in ("gpt2-xl", "gpt-j", "llama-7b", "llama3-8b", "qwen2.5-7b", "smollm2-135m"):
        assert n in names
        rome.load_hparams(n)
    assert rome.load_hparams("gpt2-xl").layer == 17
    assert rome.load_hparams("gpt-j").layer == 5
    for n in ("llama-7b", "llama3-8b", "qwen2.5-7b"):
        hp = rome.load_hparams(n)
        assert (hp.layer, hp.v_num_grad_steps, hp.v_weight_decay) == (5, 25, 1e-3)
    raw = json.loads((hparams_mod.ROOT / "rome" / "smollm2-135m.json").read_text())
    assert "trace" in raw["description"].lower()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": 3, "rewrite_module_tmp": "transformer.h.{}.mlp"}))
    with pytest.raises(ConfigError, match="unknown"):
        rome.load_hparams(str(bad))
    bad.write_text(json.dumps({"layer": 3, "variant": "nope"}))
    with pytest.raises(ConfigError, match="variant"):
        rome.load_hparams(str(bad))
    with pytest.raises(InputError, match="no rome hparams"):
        rome.load_hparams("no-such-preset")


def test_request_errors(smollm):
    with pytest.raises(InputError, match="not found"):
        from_prompt("The Louvre is in", "The Eiffel Tower", "Rome")
    with pytest.raises(InputError, match="empty target"):
        EditRequest(prompt="{} is in", subject="The Eiffel Tower", target_new="  ")
    with pytest.raises(InputError, match="placeholder"):
        EditRequest(prompt="The Eiffel Tower is in", subject="The Eiffel Tower", target_new="Rome")
    hp = rome.load_hparams("smollm2-135m").replace(layer=99, mom2_adjustment=False)
    with pytest.raises(InputError, match="out of range"):
        rome.edit(smollm, EIFFEL, hp, templates=["{}"])


# ----------------------------------------------------------------------------- the edit (tiny)


@pytest.fixture(scope="module")
def tiny(smollm):
    """A random 3-layer model speaking SmolLM2's tokenizer: cheap to edit, real prompts."""
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


def test_tiny_edit_is_pure_reproducible_and_invertible(tiny):
    hp = rome.ROMEHparams(
        layer=1, v_num_grad_steps=8, mom2_adjustment=True, context_template_length_params=((4, 2),)
    )
    rng = np.random.default_rng(0)
    A = rng.standard_normal((48, 200))
    C = A @ A.T / 200
    before = jax.tree.map(np.asarray, tiny.params)
    p0 = float(jnp.exp(next_token_logprobs(tiny, [EIFFEL.rewrite_prompt])[0, 7268]))
    new, rec = rome.edit(tiny, EIFFEL, hp, stats=C)
    again, rec2 = rome.edit(tiny, EIFFEL, hp, stats=C)
    # the input params are untouched; the same seed gives the same edit
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, tiny.params))
    np.testing.assert_array_equal(rec.u, rec2.u)
    np.testing.assert_array_equal(rec.v, rec2.v)
    # the record re-applied to the original params gives exactly the returned params
    jax.tree.map(np.testing.assert_array_equal, rec.apply(tiny.params), new.params)
    restored = rec.invert().apply(new.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, tiny.params)
    # only the edited layer's mlp_out weight changed
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.params, tiny.params
    )
    assert sum(jax.tree.leaves(changed)) == 1
    p1 = float(jnp.exp(next_token_logprobs(new, [EIFFEL.rewrite_prompt])[0, 7268]))
    assert p1 > p0  # " Rome" (id 7268) became likelier
    # the paper variant uses the bare prompt's key: a different update
    _, rec_p = rome.edit(tiny, EIFFEL, hp.replace(variant="paper"), stats=C)
    assert not np.allclose(rec_p.v, rec.v)
    # sequential edits fold: the second request is edited on the first's result
    req2 = EditRequest(prompt="{} is located in", subject="The Louvre", target_new="Berlin")
    seq, recs, infos = rome.edit_many(tiny, [EIFFEL, req2], hp, stats=C)
    jax.tree.map(np.testing.assert_array_equal, rome.apply_deltas(tiny.params, recs), seq.params)
    assert len(infos) == 2 and all(i.steps >= 1 for i in infos)


@pytest.mark.parametrize("which,layer", [("tiny", 0), ("tiny", 2), ("smollm", 4)])
def test_suffix_steps_equal_the_full_forward(which, layer, request):
    """Each v* step runs blocks l..L-1 on the positions from the last subject token on, over
    the unedited prefix cache: the same target logits as the full patched forward."""
    from jaxedit.models.sites import SitePatch
    from jaxedit.models.transformer import forward_jit, run_layers

    lm = request.getfixturevalue(which)
    cfg = lm.config
    req = dataclasses.replace(EIFFEL, target_new="Rio de Janeiro")
    b = rome.build_batch(lm, req, ["{}", "A short text. {}", "Hi. {}"], "{} is a")
    S = fine_bucket(int((b.mask.sum(1) - b.lookup).max()))
    *_, suffix = rome._clean_run(
        cfg, layer, S, lm.params, b.tokens, b.mask, b.lookup, jnp.asarray(b.logit_pos)
    )
    delta = jax.random.normal(jax.random.key(1), (cfg.d_model,)) * 3.0
    B, T = b.tokens.shape
    at = (np.arange(cfg.n_layers) == layer)[:, None, None] & (
        np.arange(T)[None, None, :] == b.lookup[None, :, None]
    )
    value = jnp.broadcast_to(delta, (cfg.n_layers, 1, 1, cfg.d_model))
    full = forward_jit(
        cfg,
        lm.params,
        jnp.asarray(b.tokens),
        jnp.asarray(b.mask),
        patch={"mlp_out": SitePatch(jnp.asarray(at), value, jnp.asarray(True))},
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
            "mlp_out": SitePatch(
                jnp.asarray(np.broadcast_to(at_s, (cfg.n_layers, B, S))), value, jnp.asarray(True)
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
def wiki_stats(smollm, data_dir, tmp_path_factory):
    hp = rome.load_hparams("smollm2-135m")
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    return stats.layer_stats(
        smollm,
        hp.layer,
        corpus,
        n_tokens=4096,
        max_len=128,
        cache_dir=tmp_path_factory.mktemp("stats"),
    )


def test_acceptance_eiffel_tower_to_rome(smollm, wiki_stats):
    """The preset on the embedded model with injected templates and a small wikitext C."""
    hp = rome.load_hparams("smollm2-135m")
    templates = ["{}", "The following is true. {}", "I read this today. {}"]
    germany = "The capital of Germany is"
    top_germany = top_k(smollm, germany, 1)[0]["token"]
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"
    new, rec = rome.edit(smollm, EIFFEL, hp, stats=wiki_stats, templates=templates)
    assert top_k(new, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Rome"
    assert top_k(new, germany, 1)[0]["token"] == top_germany
    jax.tree.map(np.testing.assert_array_equal, rec.apply(smollm.params), new.params)
    W0 = get_weight(smollm.params, "mlp_out", hp.layer)
    np.testing.assert_allclose(
        get_weight(rec.invert().apply(new.params), "mlp_out", hp.layer), W0, atol=1e-5
    )
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"  # original untouched


@pytest.mark.slow
def test_acceptance_full_preset_reproducible(smollm, wiki_stats):
    """The whole preset (21 sampled templates, 20 steps), twice under the same seed."""
    hp = rome.load_hparams("smollm2-135m")
    new, rec = rome.edit(smollm, EIFFEL, hp, stats=wiki_stats)
    new2, rec2 = rome.edit(smollm, EIFFEL, hp, stats=wiki_stats)
    np.testing.assert_array_equal(rec.v, rec2.v)
    assert top_k(new, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Rome"
    assert top_k(new, "The capital of Germany is", 1)[0]["token"] == " Berlin"
