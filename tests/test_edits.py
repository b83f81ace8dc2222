"""The edit record: apply / invert / compose / save / load, context edits, the method protocol."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config
from jaxtyping import TypeCheckError

import jaxedit as je
from jaxedit import hparams as hparams_lib
from jaxedit.edits import ContextEdit, Demonstration, WeightDelta, WeightEdit
from jaxedit.errors import CheckpointError, ConfigError, InputError
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params

F, D = 48, 32  # tiny_llama_config: d_ff, d_model


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


def _rank_one(site: str, layer: int, seed: int, rank: int = 1) -> WeightDelta:
    rng = np.random.default_rng(seed)
    i, o = (F, D) if site == "mlp_out" else (D, F)
    return WeightDelta(site, layer, rng.standard_normal((i, rank)), rng.standard_normal((o, rank)))


def _edit() -> WeightEdit:
    rng = np.random.default_rng(9)
    return WeightEdit(
        (
            _rank_one("mlp_out", 1, 0),
            _rank_one("mlp_up", 2, 1, rank=3),
            _rank_one("mlp_out", 1, 2),  # a second delta of the same weight adds up
            WeightDelta("mlp_gate", 0, dense=rng.standard_normal((D, F))),
        ),
        {"method": "test"},
    )


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def test_apply_adds_each_delta_to_its_weight_only(tiny):
    before = _np(tiny.params)
    edit = _edit()
    lm2 = je.apply(tiny, edit)
    # the input model is untouched
    jax.tree.map(np.testing.assert_array_equal, _np(tiny.params), before)
    d = edit.deltas
    want_out = before["blocks"]["mlp"]["down"]["kernel"][1] + d[0].matrix() + d[2].matrix()
    np.testing.assert_allclose(get_weight(lm2.params, "mlp_out", 1), want_out, atol=1e-6)
    want_up = before["blocks"]["mlp"]["up"]["kernel"][2] + d[1].left @ d[1].right.T
    np.testing.assert_allclose(get_weight(lm2.params, "mlp_up", 2), want_up, atol=1e-6)
    np.testing.assert_allclose(
        get_weight(lm2.params, "mlp_gate", 0),
        before["blocks"]["mlp"]["gate"]["kernel"][0] + d[3].dense,
        atol=1e-6,
    )
    # every other layer and every other weight is bit-identical
    np.testing.assert_array_equal(
        get_weight(lm2.params, "mlp_out", 0), before["blocks"]["mlp"]["down"]["kernel"][0]
    )
    np.testing.assert_array_equal(lm2.params["embed"], before["embed"])
    assert edit.sites() == [("mlp_gate", 0), ("mlp_out", 1), ("mlp_up", 2)]


def test_apply_donated_equals_apply_and_consumes_only_the_edited_stacks(tiny):
    """`donate=True` gives the same model; the edited stacks of the input are deleted (their
    buffers reused), every other weight is shared and intact."""
    edit = _edit()
    want = je.apply(tiny, edit)
    own = tiny.with_params(jax.tree.map(jnp.array, tiny.params))  # copies: `tiny` is shared
    got = je.apply(own, edit, donate=True)
    jax.tree.map(np.testing.assert_array_equal, _np(got.params), _np(want.params))
    mlp = own.params["blocks"]["mlp"]
    assert all(mlp[w]["kernel"].is_deleted() for w in ("down", "up", "gate"))
    assert not own.params["embed"].is_deleted()
    assert got.params["embed"] is own.params["embed"]
    # a refused edit (its second site names a layer the model lacks) consumes nothing
    own = tiny.with_params(jax.tree.map(jnp.array, tiny.params))
    bad = WeightEdit((_rank_one("mlp_out", 1, 3), _rank_one("mlp_up", tiny.config.n_layers, 4)))
    with pytest.raises(InputError, match="layers"):
        je.apply(own, bad, donate=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(own.params))


def test_invert_restores_and_compose_equals_sequence(tiny):
    e1, e2 = _edit(), WeightEdit((_rank_one("mlp_out", 1, 5), _rank_one("mlp_out", 0, 6)))
    lm2 = je.apply(je.apply(tiny, e1), e2)
    back = je.apply(lm2, je.compose([e1, e2]).invert())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back.params, tiny.params)
    once = je.apply(tiny, e1.compose(e2))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), once.params, lm2.params)
    assert je.apply(tiny, WeightEdit(())) is tiny


def test_save_load_round_trips_exactly(tmp_path):
    edit = _edit()
    path = je.save_edit(edit, tmp_path / "e.safetensors")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    back = je.load_edit(path)
    assert isinstance(back, WeightEdit) and back.meta == {"method": "test"}
    assert len(back.deltas) == len(edit.deltas)
    for a, b in zip(edit.deltas, back.deltas, strict=True):
        assert (a.site, a.layer) == (b.site, b.layer)
        np.testing.assert_array_equal(a.matrix(), b.matrix())
    ctx = ContextEdit(("Paris is in Italy.",), (Demonstration("copy", "x\n\n", 0.5, 3),), 7)
    assert je.load_edit(je.save_edit(ctx, tmp_path / "c.safetensors")) == ctx
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_edit_files_and_shapes_are_refused(tmp_path, tiny):
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a jaxedit edit file"):
        je.load_edit(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        je.load_edit(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="shape"):  # an edit made for a wider model
        je.apply(tiny, WeightEdit((WeightDelta("mlp_out", 0, dense=np.zeros((F + 1, D))),)))
    with pytest.raises(InputError, match="layers"):
        je.apply(tiny, WeightEdit((WeightDelta("mlp_out", 7, dense=np.zeros((F, D))),)))
    with pytest.raises(InputError, match="left and right"):
        WeightDelta("mlp_out", 0, left=np.zeros((F, 1)))
    # mismatched ranks: our own error, or jaxtyping's when shapes are checked at runtime
    with pytest.raises((InputError, TypeCheckError)):
        WeightDelta("mlp_out", 0, left=np.zeros((F, 2)), right=np.zeros((D, 1)))
    with pytest.raises(ValueError, match="no editable weight"):
        WeightDelta("resid", 0, dense=np.zeros((D, D)))
    with pytest.raises(InputError, match="composes only"):
        _edit().compose(ContextEdit(("f",)))


def test_context_edits_compose_and_fit(smollm):
    tok = smollm.tokenizer
    d = [
        Demonstration("copy", f"New Fact: fact {i}.\nPrompt: fact {i}.\n\n", i / 10)
        for i in range(4)
    ]
    a = ContextEdit(("A is in B.",), tuple(d[:2]), reserve_tokens=10)
    b = ContextEdit(("C is in D.",), (d[1], d[2], d[3]), reserve_tokens=12)
    ab = a.compose(b)
    assert ab.facts == ("A is in B.", "C is in D.") and ab.reserve_tokens == 12
    assert [x.text for x in ab.demonstrations] == [d[0].text, d[1].text, d[2].text, d[3].text]
    text = ab.render(tok, 10_000)
    assert text.endswith("New Fact: A is in B.\nNew Fact: C is in D.\nPrompt: ")
    assert text.count("Prompt: ") == 5  # four demonstrations and the query lead, no nesting
    # a tight budget drops the earliest (least similar) demonstrations first, never a fact
    one_demo = len(tok.encode(d[3].text + ab.head())) + ab.reserve_tokens
    kept, dropped = ab.fit(tok, one_demo)
    assert dropped == 3 and kept == (d[3],)
    with pytest.raises(InputError, match="more than"):
        ab.fit(tok, len(tok.encode(ab.head())))
    with pytest.raises(InputError, match="changes no weight"):
        ab.invert()


def test_apply_context_edit_joins_the_models_context(tiny):
    a, b = ContextEdit(("A is in B.",)), ContextEdit(("C is in D.",))
    lm2 = je.apply(je.apply(tiny, a), b)
    assert tiny.context is None and lm2.params is tiny.params
    assert lm2.context.facts == ("A is in B.", "C is in D.")
    assert lm2.context_text() == "New Fact: A is in B.\nNew Fact: C is in D.\nPrompt: "


def test_registry_and_hparams_loader(tmp_path, smollm):
    assert {"ike", "mend", "none", "rome"} <= set(je.methods.names())
    with pytest.raises(InputError, match="unknown method"):
        je.methods.get("nope")
    none = je.methods.get("none")
    edit, info = none.compute(smollm, none.prepare(smollm, none.hparams()), [_request()])
    assert isinstance(edit, WeightEdit) and edit.deltas == ()
    with pytest.raises(InputError, match="no edit requests"):
        none.compute(smollm, None, [])
    # the model -> preset rule: exact identifiers from models.json, nothing borrowed
    assert hparams_lib.preset_for_model(smollm) == "smollm2-135m"
    assert hparams_lib.preset_for_model("EleutherAI/gpt-j-6B") == "gpt-j"
    assert hparams_lib.preset_for_model("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m"
    for unknown in ("EleutherAI/gpt-j-6B-finetuned", "gpt2", "my-model"):
        with pytest.raises(InputError, match="no hyperparameter preset"):
            hparams_lib.preset_for_model(unknown)
    hf_dir = tmp_path / "exported"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"_name_or_path": "openai-community/gpt2-xl"}))
    assert hparams_lib.preset_for_model(str(hf_dir)) == "gpt2-xl"


def test_parse_assignments_types_values():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class HP:
        k: int = 8
        demos: str | None = None
        mix: tuple[float, ...] = (1.0,)
        flag: bool = False
        lr: float = 0.5
        ridge: float | None = None

    got = hparams_lib.parse_assignments(HP, ["k=32", "demos=12", "mix=[4,12,16]", "flag=true"])
    assert got == {"k": 32, "demos": "12", "mix": [4, 12, 16], "flag": True}
    assert hparams_lib.override(HP(), **got).mix == (4, 12, 16)
    hp = hparams_lib.build(HP, {"lr": 1, "ridge": 0, "k": 3}, "test")  # JSON writes 1 for 1.0
    assert (type(hp.lr), type(hp.ridge), type(hp.k)) == (float, float, int)
    assert type(hparams_lib.override(HP(), lr=2).lr) is float
    with pytest.raises(InputError, match="no such key"):
        hparams_lib.parse_assignments(HP, ["kk=1"])
    with pytest.raises(InputError, match="key=value"):
        hparams_lib.parse_assignments(HP, ["k"])
    with pytest.raises(ConfigError, match="unknown"):
        hparams_lib.override(HP(), kk=1)


def _request():
    return je.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome")
