"""ROME hparams for a model without a preset (`jaxedit.methods.common.auto_hparams`): the
layer from a causal trace of facts the model knows, the fallback depth rule, statistics scaled
to d_ff, the per-fingerprint cache, and `jaxedit edit --explain` on models with no preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jaxedit import cli, methods
from jaxedit import hparams as hparams_lib
from jaxedit.errors import InputError
from jaxedit.io.checkpoint import load
from jaxedit.locate import trace as tr
from jaxedit.locate.facts import FACTS
from jaxedit.methods.common import auto_hparams as ah

GOLDENS = Path(__file__).parent / "goldens"
PROMPT, SUBJECT = "{} is located in the city of", "The Eiffel Tower"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ah, "_CHOSEN", {})
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny():
    return load(str(GOLDENS / "llama"))


def _facts_all(lm):
    """The built-in facts without an expected answer: traced whatever the model predicts."""
    facts = [{"prompt": f.rewrite_prompt, "subject": f.subject, "expect": None} for f in FACTS]
    return facts, "test facts", len(facts)


def test_the_fallback_depth_rule_comes_from_the_shipped_presets():
    for preset, (layer, n_layers) in ah.PRESET_DEPTHS.items():
        raw = json.loads((Path(hparams_lib.ROOT) / "rome" / f"{preset}.json").read_text())
        assert raw["layer"] == layer, preset
        assert 0 <= layer < n_layers
    assert set(ah.PRESET_DEPTHS) == set(hparams_lib.presets("rome"))
    ratios = sorted(layer / n for layer, n in ah.PRESET_DEPTHS.values())
    assert ratios[0] <= ah.FALLBACK_DEPTH <= ratios[-1]
    assert abs(ah.FALLBACK_DEPTH - 1 / 6) < 0.01
    # About L/6, inside the model, and the presets' own layer for the 7B models.
    assert [ah.fallback_layer(n) for n in (1, 2, 12, 28, 32, 48)] == [0, 0, 2, 5, 5, 8]


def test_statistics_and_templates_scale_with_the_model():
    assert ah.stats_tokens(1536) == 15360  # SmolLM2: 10 × F, already a multiple of 1,024
    assert ah.stats_tokens(64) == 1024 and ah.stats_tokens(4096) == 40960
    assert ah.stats_tokens(11008) % 1024 == 0 and ah.stats_tokens(11008) >= 110080
    assert ah.templates_for(64) == [[5, 10]] and ah.templates_for(8192) == [[5, 10], [10, 10]]
    assert [ah.window_for(n) for n in (2, 12, 30, 48)] == [1, 4, 10, 10]


def test_a_tiny_random_model_gets_the_fallback_and_it_is_cached(tiny, cache, monkeypatch):
    hp = methods.get("rome").hparams(tiny)
    c = ah.chosen(tiny)
    assert c.rule == "fallback" and hp.layer == c.layer == ah.fallback_layer(2) == 0
    assert "answers 0 of the 10 candidate facts" in c.reason and c.aie is None
    assert hp.mom2_corpus == "self" and hp.mom2_n_samples is None
    assert hp.mom2_n_tokens == ah.stats_tokens(tiny.config.d_ff) == 1024
    assert hp.context_template_length_params == ((5, 10),)  # 64 positions: short templates
    path = ah.cache_file(c.fingerprint)
    assert json.loads(path.read_text())["layer"] == 0
    # Read back from the file in a fresh process (no trace): the same choice.
    monkeypatch.setattr(ah, "_CHOSEN", {})
    monkeypatch.setattr(ah, "_trace_choice", lambda lm, fp: pytest.fail("not cached"))
    assert ah.choose_layer(tiny) == c
    # --set overrides still apply on top of the automatic choice.
    assert methods.get("rome").hparams(tiny, layer=1).layer == 1


def test_a_bad_or_foreign_cache_file_is_recomputed(tiny, cache, monkeypatch):
    c = ah.choose_layer(tiny)
    path = ah.cache_file(c.fingerprint)
    calls = []
    real = ah._trace_choice
    monkeypatch.setattr(ah, "_trace_choice", lambda lm, fp: calls.append(fp) or real(lm, fp))
    for text in ("{not json", json.dumps({**json.loads(path.read_text()), "window": 7})):
        path.write_text(text)
        monkeypatch.setattr(ah, "_CHOSEN", {})
        assert dataclasses.replace(ah.choose_layer(tiny), seconds=0.0) == dataclasses.replace(
            c, seconds=0.0
        )
    assert len(calls) == 2 and json.loads(path.read_text())["window"] == c.window


def test_the_layer_is_the_peak_of_the_traced_effect(tiny, cache, monkeypatch):
    monkeypatch.setattr(ah, "_facts", _facts_all)
    monkeypatch.setattr(ah, "MIN_EFFECT", -1.0)  # a random model's effects are tiny: take any
    c = ah.choose_layer(tiny, refresh=True)
    summary, _ = tr.trace_dataset(
        tiny,
        _facts_all(tiny)[0],
        kinds=("mlp",),
        classes=(ah.CLASS,),
        window=ah.window_for(2),
        progress=False,
        limit=ah.N_FACTS,
    )
    assert c.rule == "trace" and len(c.facts) == len(FACTS)
    assert len(c.aie) == tiny.config.n_layers
    assert c.layer == tr.peak_layer(summary, "mlp", ah.CLASS) == int(np.argmax(c.aie))
    np.testing.assert_allclose(c.aie, summary["kinds"]["mlp"][ah.CLASS]["mean"], atol=1e-5)
    assert f"peaks at layer {c.layer}" in c.reason
    # The same trace with no effect worth the name: the fallback, saying why.
    monkeypatch.setattr(ah, "MIN_EFFECT", 2.0)
    c = ah.choose_layer(tiny, refresh=True)
    assert c.rule == "fallback" and "peaks at only" in c.reason and c.aie is not None


def test_only_rome_is_chosen_automatically(tiny, cache):
    with pytest.raises(InputError, match="no hyperparameter preset"):
        methods.get("memit").hparams(tiny)
    with pytest.raises(InputError, match="no hyperparameter preset"):
        methods.get("rome").hparams("some-org/unknown-model")  # a name, not a loaded model
    assert ah.chosen(tiny) is None  # nothing was traced for those


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_edit_of_a_model_without_a_preset_names_the_layer(cache, capsys):
    model = str(GOLDENS / "gpt2")
    common = ["edit", "--model", model, "--prompt", PROMPT, "--subject", SUBJECT]
    fast = ["--target", "Rome", "--set", "v_num_grad_steps=4", "--set",
            "context_template_length_params=[[3, 2]]"]  # fmt: skip
    rc, out, err = _run(capsys, *common, *fast, "--json", "--explain")
    assert rc == 0, err
    r = json.loads(out)
    origin = r["hparams_origin"]
    assert origin["kind"] == "automatic" and origin["choice"]["rule"] == "fallback"
    layer = origin["choice"]["layer"]
    assert r["info"]["layer"] == layer == r["hparams"]["layer"] and r["edit"]["weights"] == [
        f"mlp_out.{layer}"
    ]
    assert "fallback depth" in origin["explanation"]
    rewrite = r["probes"][0]
    assert rewrite["kind"] == "rewrite" and rewrite["p_after"] > rewrite["p_before"]
    # The text output names the layer and the rule (and --explain the reasons).
    rc, out, err = _run(capsys, *common, *fast, "--explain")
    assert rc == 0, err
    assert f"layer {layer} of 2, the fallback depth rule" in out and "median relative depth" in out


FAMILIES = sorted(p.name for p in GOLDENS.iterdir() if (p / "config.json").is_file())


# One family in the fast suite (GPT-2's CLI road is the test above); each other family compiles
# its own trace, statistics and v* programs (about a minute each on a loaded 2-core CPU).
@pytest.mark.parametrize(
    "family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_edit_just_works_on_every_tiny_golden(family, cache, capsys, monkeypatch):
    """`jaxedit edit --model DIR` on each family's tiny golden (no preset names any of them):
    ROME hparams are chosen (the fallback: random weights know no fact), the layer is named,
    the choice is cached under the model's fingerprint and read back by a second run."""
    model = str(GOLDENS / family)
    argv = ["edit", "--model", model, "--prompt", PROMPT, "--subject", SUBJECT, "--target",
            "Rome", "--set", "v_num_grad_steps=4", "--set",
            "context_template_length_params=[[3, 2]]", "--json"]  # fmt: skip
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    r = json.loads(out)
    c = r["hparams_origin"]["choice"]
    assert r["hparams_origin"]["kind"] == "automatic" and c["n_layers"] == 2
    assert c["rule"] == "fallback" and c["layer"] == ah.fallback_layer(2)  # random: no fact known
    assert r["edit"]["weights"] == [f"mlp_out.{c['layer']}"] == [f"mlp_out.{r['hparams']['layer']}"]
    assert r["probes"][0]["p_after"] > r["probes"][0]["p_before"]
    cached = json.loads(ah.cache_file(c["fingerprint"]).read_text())
    assert cached["layer"] == c["layer"] and cached["model"] == c["model"]
    # A new process: the choice comes from the file, no new trace.
    monkeypatch.setattr(ah, "_CHOSEN", {})
    monkeypatch.setattr(ah, "_trace_choice", lambda lm, fp: pytest.fail("not cached"))
    rc, out, err = _run(capsys, *argv[:-1], "--explain")
    assert rc == 0, err
    assert f"layer {c['layer']} of 2" in out and str(ah.cache_file(c["fingerprint"])) in out


@pytest.mark.slow
def test_our_exported_smollm2_is_edited_without_a_preset(smollm, cache, tmp_path, capsys):
    """The acceptance run: `jaxedit convert --out D` (no preset matches D), then `jaxedit edit
    --model D ...`: the layer comes from a trace of the built-in facts (the preset's layer 4)
    and " Rome" becomes the top-1 answer."""
    from jaxedit.io.checkpoint import save_hf

    d = save_hf(smollm, tmp_path / "D")
    with pytest.raises(InputError):
        hparams_lib.preset_for_model(str(d))
    rc, out, err = _run(
        capsys, "edit", "--model", str(d), "--prompt", PROMPT, "--subject", SUBJECT,
        "--target", "Rome", "--json",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    c = r["hparams_origin"]["choice"]
    assert c["rule"] == "trace" and c["layer"] == 4 and len(c["facts"]) >= ah.MIN_FACTS
    assert r["edit"]["weights"] == ["mlp_out.4"]
    assert r["after"][0]["top"][0]["token"] == " Rome"
    assert r["hparams"]["mom2_n_tokens"] == 15360 and r["hparams"]["mom2_corpus"] == "self"
