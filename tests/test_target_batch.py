"""Batched target values (`target_values`: a request per vmapped lane, padded to common shapes)
and ENCORE's most-probable early stopping, on the embedded SmolLM2 at MEMIT's site (resid)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.errors import InputError
from jaxedit.methods.common import target_opt
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import forward_jit
from jaxedit.requests import EditRequest

SITE, LAYER = "resid", 5
TEMPLATES = ("{}", "The. {}", "A short text about it. {}")
# Different prompt lengths (token buckets 16 and 32), subject positions (3 .. 22 in the bare
# prompt) and target lengths (1 and 3 tokens: 1 and 4 target slots).
REQUESTS = (
    EditRequest(prompt="{} is in the city of", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(prompt="The language of {} is", subject="D. Darrieux", target_new="Rio de Janeiro"),
    EditRequest(
        prompt="In the year 1900, after a long journey across the sea, the famous {} was sold to",
        subject="painting Mona Lisa",
        target_new="Microsoft",
    ),
)
SETTINGS = target_opt.TargetSettings(steps=12, lr=0.5, clamp_norm_factor=0.75)
# Batched against one at a time: few enough steps to be quick on the real model, an early-stop
# loss the requests reach at different steps (5, 7, 5), so lanes stop apart.
LANE_SETTINGS = dataclasses.replace(SETTINGS, steps=7, early_stop_loss=0.5)


def lane_settings(mpes: bool) -> target_opt.TargetSettings:
    return dataclasses.replace(LANE_SETTINGS, stop_when_argmax=mpes)


@pytest.fixture(scope="module")
def one_at_a_time(smollm):
    """Each request optimised alone, per early-stopping setting; computed when first asked for
    (the default suite only asks for one of the two)."""
    runs: dict[bool, list] = {}

    def get(mpes: bool) -> list:
        if mpes not in runs:
            runs[mpes] = [
                target_opt.target_value(smollm, SITE, LAYER, r, TEMPLATES, lane_settings(mpes))
                for r in REQUESTS
            ]
        return runs[mpes]

    return get


def test_the_requests_differ_in_every_padded_shape(smollm):
    tok = smollm.tokenizer
    bs = [
        target_opt.target_batch(tok, r.prompt, r.subject, r.target_new, TEMPLATES) for r in REQUESTS
    ]
    assert len({b.tokens.shape[1] for b in bs}) == 2
    assert len({b.weights.shape[0] for b in bs}) == 2
    assert len({target_opt.suffix_length(b) for b in bs}) == 2
    assert len({int(b.lookup[0]) for b in bs}) == 3


@pytest.mark.parametrize("mpes", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_batched_equals_one_at_a_time(smollm, one_at_a_time, mpes, capsys):
    """Three requests in four lanes (one a padding copy): each request's δ, step count and loss
    are its own run's, whatever it was padded to, and in the order given."""
    batched = target_opt.target_values(
        smollm, SITE, LAYER, REQUESTS, TEMPLATES, lane_settings(mpes), lanes=4, progress=True
    )
    assert "target values" in capsys.readouterr().err  # the progress bar, on stderr
    single = one_at_a_time(mpes)
    assert len(batched) == len(REQUESTS)
    for b, s in zip(batched, single, strict=True):
        assert (b.site, b.layer) == (SITE, LAYER)
        assert (b.steps, b.target_argmax) == (s.steps, s.target_argmax)
        assert np.linalg.norm(b.v0 - s.v0) <= 1e-5 * np.linalg.norm(s.v0), np.linalg.norm(
            b.v0 - s.v0
        ) / np.linalg.norm(s.v0)
        assert np.linalg.norm(b.delta - s.delta) <= 1e-4 * np.linalg.norm(s.delta)
        np.testing.assert_allclose(b.loss, s.loss, rtol=1e-4)
    # the loop ran past the requests that stopped first (they stayed frozen)
    assert len({s.steps for s in single}) > 1
    assert not np.allclose(batched[0].delta, batched[1].delta)


def test_lanes_are_checked(smollm):
    with pytest.raises(InputError, match="lanes"):
        target_opt.target_values(smollm, SITE, LAYER, REQUESTS, TEMPLATES, SETTINGS, lanes=0)
    assert target_opt.target_values(smollm, SITE, LAYER, [], TEMPLATES, SETTINGS) == []


def argmax_on_every_template(lm, request, delta) -> bool:
    """The full forward with δ added at the subject of every template row: is each real target
    token the argmax of its teacher-forced logits?"""
    cfg = lm.config
    b = target_opt.target_batch(
        lm.tokenizer, request.prompt, request.subject, request.target_new, TEMPLATES
    )
    R = len(TEMPLATES)
    T = b.tokens.shape[1]
    at = (np.arange(cfg.n_layers) == LAYER)[:, None, None] & (
        np.arange(T)[None, :] == b.lookup[:R, None]
    )[None]  # [L R T]
    value = jnp.broadcast_to(jnp.asarray(delta, jnp.float32), (cfg.n_layers, 1, T, cfg.d_model))
    logits = forward_jit(
        cfg,
        lm.params,
        jnp.asarray(b.tokens[:R]),
        jnp.asarray(b.mask[:R]),
        patch={SITE: SitePatch(jnp.asarray(at), value, jnp.asarray(True))},
        logit_positions=jnp.asarray(b.logit_pos[:R]),
    ).logits
    real = b.weights > 0
    return bool(np.all(np.asarray(logits).argmax(-1)[:, real] == b.targets[:, real]))


# a 1-token and (slow: 25 steps, ~50 s) a 3-token target
@pytest.mark.parametrize("which", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_most_probable_early_stopping(smollm, which):
    """MPES stops at the first evaluation where every target token is the argmax on every
    template row: fewer steps than running on, the target the argmax there (checked with the
    full patched forward), not yet one evaluation earlier; the result is exactly the plain run
    stopped after as many steps. Toggling it compiles nothing new."""
    request = REQUESTS[which]
    plain = dataclasses.replace(SETTINGS, steps=25)
    mpes = dataclasses.replace(plain, stop_when_argmax=True)
    run = lambda s: target_opt.target_value(smollm, SITE, LAYER, request, TEMPLATES, s)
    full = run(plain)
    compiled = target_opt.run_steps_jit._cache_size()
    early = run(mpes)
    assert target_opt.run_steps_jit._cache_size() == compiled
    assert early.target_argmax and early.steps < full.steps
    assert argmax_on_every_template(smollm, request, early.delta)
    before = run(dataclasses.replace(plain, steps=early.steps - 1))
    assert not before.target_argmax
    assert not argmax_on_every_template(smollm, request, before.delta)
    same = run(dataclasses.replace(plain, steps=early.steps))
    np.testing.assert_array_equal(same.delta, early.delta)
    assert (same.steps, same.loss) == (early.steps, early.loss)


def test_mpes_off_changes_nothing_until_it_fires(smollm):
    """With too few steps to reach the argmax, MPES on and off give bit-identical runs."""
    s = dataclasses.replace(SETTINGS, steps=2)
    a = target_opt.target_value(smollm, SITE, LAYER, REQUESTS[1], TEMPLATES, s)
    on = dataclasses.replace(s, stop_when_argmax=True)
    b = target_opt.target_value(smollm, SITE, LAYER, REQUESTS[1], TEMPLATES, on)
    assert not a.target_argmax and a.steps == b.steps == 2
    np.testing.assert_array_equal(a.delta, b.delta)
    assert a.loss == b.loss
