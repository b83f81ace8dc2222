"""FT-L / FT-M (`jaxedit.methods.ft`): hparams and presets, the batch layout of both objectives,
the jitted loop against a plain eager loop over the full forward (epochs, batches, Adam, skip,
clamp, early stop), purity, the acceptance edits on the embedded model (Eiffel -> Rome), and
parity with EasyEdit's `execute_ft` (goldens from scripts/goldens_ft.py; measured agreement of
ΔW: 5e-6 (FT-L) and 7e-6 (FT-M) relative; a wrong objective, batching or epoch count is off by
0.15 to 1.3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_llama_config

import jaxedit as je
from jaxedit import hparams as hparams_lib
from jaxedit.errors import ConfigError, InputError
from jaxedit.io.checkpoint import load
from jaxedit.methods import ft
from jaxedit.methods.common.target_opt import target_ids
from jaxedit.models.generate import next_token_logprobs, top_k
from jaxedit.models.sites import get_weight, set_weight
from jaxedit.models.transformer import forward_jit, init_params
from jaxedit.requests import EditRequest, from_prompt

EIFFEL = EditRequest(
    prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"
)
LOUVRE = EditRequest(
    prompt="{} is located in the city of", subject="The Louvre", target_new="Rio de Janeiro"
)
COLOSSEUM = EditRequest(
    prompt="{} is in the country of", subject="The Colosseum", target_new="Spain"
)

# Depth of the models each preset is written for (their HF configs).
PRESET_DEPTH = {"gpt2-xl": 48, "gpt-j": 28, "llama-7b": 32, "llama3-8b": 32, "qwen2.5-7b": 28}


def rome_prob(lm) -> float:
    (rid,) = target_ids(lm.tokenizer, "Rome")
    return float(jnp.exp(next_token_logprobs(lm, [EIFFEL.rewrite_prompt])[0, rid]))


def changed_leaves(a, b) -> list[str]:
    diff = jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)
    )
    return [jax.tree_util.keystr(p) for p, d in diff if d]


# ----------------------------------------------------------------------------- hparams


def test_presets_load_with_layers_inside_their_models(smollm):
    m = je.methods.get("ft")
    assert sorted(hparams_lib.presets("ft")) == sorted([*PRESET_DEPTH, "smollm2-135m"])
    for name, depth in {**PRESET_DEPTH, "smollm2-135m": smollm.config.n_layers}.items():
        hp = m.hparams(name)
        assert isinstance(hp, ft.FTHparams) and hp.site == "mlp_out"
        assert all(0 <= layer < depth for layer in hp.layers), name
    hp = m.hparams(smollm)
    assert hp == m.hparams("smollm2-135m") and hp.objective == "target_new"
    # the references' FT-L on GPT-2 XL: layer 0 under an L∞ bound of 5e-4
    gpt2 = m.hparams("gpt2-xl")
    assert (gpt2.layers, gpt2.norm_constraint, gpt2.objective) == ((0,), 5e-4, "prompt_last")


def test_hparams_refusals():
    m = je.methods.get("ft")
    with pytest.raises(ConfigError, match="unknown hparams keys"):
        m.hparams("smollm2-135m", kl_factor=0.0)
    bad = {
        "objective": ({"objective": "ft-x"}, "objective"),
        "site": ({"site": "mlp_key"}, "no editable weight"),
        "no layers": ({"layers": ()}, "at least one layer"),
        "repeated": ({"layers": (3, 3)}, "distinct"),
        "eps": ({"norm_constraint": 0.0}, "norm_constraint"),
        "steps": ({"num_steps": 0}, "num_steps"),
        "batch": ({"batch_size": 0}, "batch_size"),
    }
    for kw, msg in bad.values():
        with pytest.raises(ConfigError, match=msg):
            ft.FTHparams(**{"layers": (1,), **kw})
    with pytest.raises(InputError, match="name a preset"):
        m.hparams()


# ----------------------------------------------------------------------------- batches


def test_batch_layout_of_both_objectives(smollm):
    tok = smollm.tokenizer
    reqs = [EIFFEL, LOUVRE, COLOSSEUM]
    p = [tok.encode(r.rewrite_prompt) for r in reqs]
    t = [target_ids(tok, r.target_new) for r in reqs]
    assert len(t[0]) == 1 and len(t[1]) >= 3  # a multi-token target
    L = ft.ft_batch(tok, reqs, "prompt_last", 2, 2048)
    M = ft.ft_batch(tok, reqs, "target_new", 2, 2048)
    N = 1 << (len(t[1]) - 1).bit_length()
    for b in (L, M):
        assert b.tokens.shape[:2] == (2, 2) and b.targets.shape == (2, 2, N)
        flat_w = b.weights.reshape(4, N)
        assert flat_w.sum(1).tolist() == [len(x) for x in t] + [0.0]  # row 3 is padding
        for i in range(3):
            assert b.targets.reshape(4, N)[i, : len(t[i])].tolist() == t[i]
    for i in range(3):
        c, r = divmod(i, 2)
        # FT-L: the prompt alone; every target token scored at its last position
        assert L.tokens[c, r][L.mask[c, r]].tolist() == p[i]
        assert (L.logit_pos[c, r] == len(p[i]) - 1).all()
        # FT-M: prompt + target[:-1]; target token j predicted at position |p| - 1 + j
        assert M.tokens[c, r][M.mask[c, r]].tolist() == p[i] + t[i][:-1]
        n = len(t[i])
        assert M.logit_pos[c, r, :n].tolist() == [len(p[i]) - 1 + j for j in range(n)]
    with pytest.raises(InputError, match="exceeds"):
        ft.ft_batch(tok, reqs, "target_new", 2, 8)
    with pytest.raises(InputError, match="empty target"):
        EditRequest(prompt="{} is in", subject="X", target_new="  ")
    with pytest.raises(InputError, match="empty target"):
        target_ids(tok, "")


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(smollm):
    """A random 3-layer model speaking SmolLM2's tokenizer: cheap to fine-tune, real prompts."""
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


def full_forward_nll(lm, params, b: ft.FTBatch) -> np.ndarray:
    """Each row's mean target NLL from the whole model's forward (no shortcut): [C B]."""
    C, B, T = b.tokens.shape
    logits = forward_jit(
        lm.config,
        params,
        jnp.asarray(b.tokens.reshape(C * B, T)),
        jnp.asarray(b.mask.reshape(C * B, T)),
        logit_positions=jnp.asarray(b.logit_pos.reshape(C * B, -1)),
    ).logits
    logp = jax.nn.log_softmax(logits, -1)
    tgt = jnp.take_along_axis(logp, jnp.asarray(b.targets.reshape(C * B, -1))[..., None], -1)
    w = b.weights.reshape(C * B, -1)
    return np.asarray(-(tgt[..., 0] * w).sum(-1) / np.maximum(w.sum(-1), 1)).reshape(C, B)


def eager_reference(lm, hp: ft.FTHparams, b: ft.FTBatch) -> tuple[np.ndarray, int]:
    """The references' loop written plainly in Python: the full forward on W⁰ + ΔW for every
    batch (only the loss and its gradient are jitted), torch Adam (L2 weight decay on W), no
    step below the early-stop loss, the L∞ clamp, and a stop after the epoch whose mean loss
    (batches weighted by their real rows) is below it."""
    w0 = jnp.stack([get_weight(lm.params, hp.site, layer) for layer in hp.layers])
    eps = np.inf if hp.norm_constraint is None else hp.norm_constraint

    @jax.jit
    @jax.value_and_grad
    def loss(delta, tokens, mask, pos, targets, w):
        params = lm.params
        for i, layer in enumerate(hp.layers):
            params = set_weight(params, hp.site, layer, w0[i] + delta[i])
        logits = forward_jit(lm.config, params, tokens, mask, logit_positions=pos).logits
        logp = jax.nn.log_softmax(logits, -1)
        tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        rows = -(tok * w).sum(-1) / jnp.maximum(w.sum(-1), 1)
        valid = w.sum(-1) > 0
        return jnp.sum(jnp.where(valid, rows, 0)) / valid.sum()

    opt = optax.adam(hp.lr)
    delta = jnp.zeros_like(w0)
    state = opt.init(delta)
    epochs = 0
    for _ in range(hp.num_steps):
        epochs += 1
        total, count = 0.0, 0
        for c in range(b.tokens.shape[0]):
            batch = (b.tokens[c], b.mask[c], b.logit_pos[c], b.targets[c], b.weights[c])
            value, grad = loss(delta, *map(jnp.asarray, batch))
            n = int((b.weights[c].sum(-1) > 0).sum())
            total, count = total + float(value) * n, count + n
            if float(value) >= hp.early_stop_loss:
                grad = grad + hp.weight_decay * (w0 + delta)
                updates, state = opt.update(grad, state)
                delta = delta + updates
            delta = jnp.clip(delta, -eps, eps)
        if total / count < hp.early_stop_loss:
            break
    return np.asarray(delta), epochs


TINY = ft.FTHparams(layers=(1, 2), num_steps=3, lr=1e-2, batch_size=2, norm_constraint=5e-3)
REQUESTS = [EIFFEL, LOUVRE, COLOSSEUM]  # in batches of two: the second batch is padded
# FT-L on the MLP output of two layers; FT-M on the MLP input of the first block, from the
# embeddings (block 0 has no cached input); both with weight decay.
CASES = {
    "prompt_last": dataclasses.replace(TINY, weight_decay=0.1),
    "target_new": dataclasses.replace(
        TINY, objective="target_new", site="mlp_up", layers=(0, 2), weight_decay=0.1
    ),
}


@pytest.mark.parametrize(
    "objective",
    [o if i == 0 else pytest.param(o, marks=pytest.mark.slow) for i, o in enumerate(ft.OBJECTIVES)],
)  # the first objective by default (~15 s each: the eager reference is slow)
def test_jitted_loop_equals_the_eager_reference(tiny, objective):
    hp = CASES[objective]
    b = ft.ft_batch(tiny.tokenizer, REQUESTS, objective, hp.batch_size, 2048)
    edit, info = ft.compute(tiny, hp, REQUESTS)
    want, epochs = eager_reference(tiny, hp, b)
    assert info["epochs"] == epochs == 3
    assert [(d.site, d.layer) for d in edit.deltas] == [(hp.site, x) for x in hp.layers]
    got = np.stack([d.dense for d in edit.deltas])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
    assert np.abs(got).max() <= hp.norm_constraint  # the clamp is exact on ΔW
    # the reported NLLs are the full forward's on the edited model
    nll = full_forward_nll(tiny, je.apply(tiny, edit).params, b).reshape(-1)[:3]
    np.testing.assert_allclose(info["target_nll"], nll, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info["target_prob"], np.exp(-nll), rtol=1e-4)
    before = full_forward_nll(tiny, tiny.params, b).reshape(-1)[:3]
    assert (nll < before).all()  # one joint optimisation helped every request


def test_tiny_edit_is_pure_deterministic_and_stops_early(tiny, tmp_path):
    """(The same shapes and static arguments as above: nothing is compiled again.)"""
    m = je.methods.get("ft")
    hp = CASES["prompt_last"]
    before = jax.tree.map(np.asarray, tiny.params)
    state = m.prepare(tiny, hp)
    edit, info = m.compute(tiny, state, REQUESTS)
    again, _ = m.compute(tiny, state, REQUESTS)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, tiny.params))
    for a, b in zip(edit.deltas, again.deltas, strict=True):
        np.testing.assert_array_equal(a.dense, b.dense)
    assert edit.sites() == [("mlp_out", 1), ("mlp_out", 2)] and edit.deltas[0].shape == (48, 32)
    json.dumps(info)
    new = je.apply(tiny, edit)
    assert changed_leaves(new.params, tiny.params) == ["['blocks']['mlp']['down']['kernel']"]
    w_new, w_old = (p["blocks"]["mlp"]["down"]["kernel"] for p in (new.params, tiny.params))
    assert np.flatnonzero(np.abs(np.asarray(w_new - w_old)).max((1, 2))).tolist() == [1, 2]
    restored = je.apply(new, edit.invert())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), restored.params, before)
    loaded = je.load_edit(je.save_edit(edit, tmp_path / "ft.safetensors"))
    np.testing.assert_array_equal(loaded.deltas[1].dense, edit.deltas[1].dense)
    assert loaded.meta["method"] == "ft" and loaded.meta["hparams"]["objective"] == "prompt_last"
    # a loss already below the early-stop threshold: one epoch, no step
    lazy, info = m.compute(tiny, dataclasses.replace(hp, early_stop_loss=1e3), REQUESTS)
    assert info["epochs"] == 1 and not any(d.dense.any() for d in lazy.deltas)


def test_bad_layers_sites_and_requests(tiny):
    m = je.methods.get("ft")
    with pytest.raises(InputError, match=r"layers \[3\] out of range 0..2"):
        m.prepare(tiny, ft.FTHparams(layers=(1, 3)))
    with pytest.raises(InputError, match="out of range"):
        m.compute(tiny, ft.FTHparams(layers=(7,)), [EIFFEL])
    no_gate = tiny.with_params(
        {**tiny.params, "blocks": {**tiny.params["blocks"], "mlp": {"down": {}, "up": {}}}}
    )
    with pytest.raises(InputError, match="no mlp_gate weight"):
        m.prepare(no_gate, ft.FTHparams(layers=(0,), site="mlp_gate"))
    with pytest.raises(InputError, match="no edit requests"):
        m.compute(tiny, TINY, [])


# ----------------------------------------------------------------------------- embedded model


def test_ft_m_preset_makes_rome_top_1(smollm):
    """The smollm2 preset (FT-M at layer 4): only that weight changes, `smollm` is untouched."""
    m = je.methods.get("ft")
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"
    hp = m.hparams(smollm)
    edit, info = m.compute(smollm, m.prepare(smollm, hp), [EIFFEL])
    lm2 = je.apply(smollm, edit)
    assert top_k(lm2, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Rome"
    assert info["target_prob"][0] > 0.9 and info["epochs"] < hp.num_steps  # stopped early
    assert top_k(lm2, "The capital of Germany is", 1)[0]["token"] == " Berlin"
    assert changed_leaves(lm2.params, smollm.params) == ["['blocks']['mlp']['down']['kernel']"]
    assert edit.sites() == [("mlp_out", hp.layers[0])]
    assert top_k(smollm, EIFFEL.rewrite_prompt, 1)[0]["token"] == " Paris"  # input untouched


def test_ft_l_respects_the_bound_and_raises_rome(smollm):
    """FT-L with the references' GPT-2 XL bound: |ΔW| ≤ ε everywhere, p(Rome) goes up."""
    hp = je.methods.get("ft").hparams(
        "smollm2-135m", objective="prompt_last", norm_constraint=5e-4, num_steps=4
    )
    edit, info = ft.compute(smollm, hp, [EIFFEL])
    (d,) = edit.deltas
    assert np.abs(d.dense).max() <= 5e-4 and info["max_abs_delta"] == pytest.approx(5e-4)
    lm2 = je.apply(smollm, edit)
    w = [get_weight(p, "mlp_out", hp.layers[0]) for p in (lm2.params, smollm.params)]
    assert float(jnp.abs(w[0] - w[1]).max()) <= 5e-4 + 1e-7
    p0, p1 = rome_prob(smollm), rome_prob(lm2)
    assert p1 > 3 * p0 and info["target_prob"][0] == pytest.approx(p1, rel=1e-3)


# ----------------------------------------------------------------------------- parity

GOLDEN_FT = Path(__file__).parent / "goldens" / "methods" / "ft"


@pytest.mark.parametrize("case", ["ft_l", "ft_m"])
def test_parity_with_easyedit(case):
    """EasyEdit's `execute_ft` (scripts/goldens_ft.py) on the tiny random Llama: two requests
    with 5-token targets in batches of one, 4 epochs, Adam lr 1e-2 (FT-L: |ΔW| ≤ 2e-2)."""
    golden = np.load(GOLDEN_FT / f"{case}.npz")
    meta = json.loads(str(golden["meta"]))
    ref_hp = meta["hparams"]
    lm = load(str(Path(__file__).parent / "goldens" / "llama"))
    requests = [
        from_prompt(r["prompt"], r["prompt"].split(" is")[0], r["target_new"])
        for r in meta["requests"]
    ]
    eps = ref_hp["norm_constraint"]
    hp = ft.FTHparams(
        layers=tuple(ref_hp["layers"]),
        objective=ref_hp["objective_optimization"],
        num_steps=ref_hp["num_steps"],
        lr=ref_hp["lr"],
        weight_decay=ref_hp["weight_decay"],
        norm_constraint=eps if eps else None,
        batch_size=ref_hp["batch_size"],
    )
    edit, info = ft.compute(lm, hp, requests)
    got, want = edit.deltas[0].dense, golden["delta_w"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel
    assert info["epochs"] == hp.num_steps
