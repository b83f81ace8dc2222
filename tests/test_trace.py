"""Causal tracing: the paper's invariants on the embedded model, the batched grid against the
cell-by-cell procedure, subject location, token classes, averages, plots and the CLI."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.errors import InputError
from jaxedit.io.tokenizer import fine_bucket
from jaxedit.locate import trace as tr
from jaxedit.models.sites import SitePatch, make_patch
from jaxedit.models.transformer import forward_jit

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"  # tokens 1..3 (" E", "iffel", " Tower"): token 0 precedes the subject
ROWS = [0, 3, 9]  # before the subject, last subject token, last token
SAMPLES = 2


@pytest.fixture(scope="module")
def small(smollm):
    return tr.trace(smollm, PROMPT, SUBJECT, samples=SAMPLES, rows=ROWS, seed=1)


def test_clean_answer_and_ranges(small, smollm):
    assert small["answer"] == " Paris"
    assert small["high_score"] == pytest.approx(0.7015, abs=2e-3)
    assert small["subject_range"] == [1, 4]
    assert small["tokens"][1:4] == [" E", "iffel", " Tower"]
    assert small["low_score"] < 0.5 * small["high_score"]
    for kind in tr.KINDS:
        scores = small["kinds"][kind]["scores"]
        assert scores.shape == (10, smollm.config.n_layers)
        assert np.isfinite(scores[ROWS]).all()
        others = [i for i in range(10) if i not in ROWS]
        assert np.isnan(scores[others]).all()  # rows not asked for are not computed


def test_restoring_last_hidden_state_gives_high_score(small):
    assert abs(small["kinds"]["hidden"]["scores"][-1, -1] - small["high_score"]) <= 1e-4


def test_restoring_before_subject_leaves_the_corrupted_score(smollm):
    """Noise only at the subject tokens and causal attention: the states of a token before the
    subject are the same in the clean and the corrupted runs, so restoring them (any site, any
    layers) leaves p(answer) at the corrupted value, which is what lets `trace` skip those cells.
    Computed here with `forward` and patches alone (own noise draws), not read off the grid."""
    cfg, params = smollm.config, smollm.params
    ids, (b, e) = tr.locate_subject(smollm.tokenizer, PROMPT, SUBJECT)
    T, S, L = len(ids), 3, cfg.n_layers
    last = jnp.full((S, 1), T - 1)
    clean = forward_jit(
        cfg, params, jnp.asarray([ids]), capture=tuple(tr.SITE.values()), logit_positions=last[:1]
    )
    answer = int(jnp.argmax(clean.logits[0, 0]))
    tokens = jnp.asarray(np.broadcast_to(np.asarray(ids, np.int32), (S, T)))
    emb = np.asarray(params["embed"], np.float32)[ids[b:e]]
    eps = np.zeros((S, T, cfg.d_model), np.float32)
    eps[:, b:e] = 3 * emb.std() * np.random.default_rng(7).standard_normal((S, e - b, cfg.d_model))
    subject = np.zeros((S, T), bool)
    subject[:, b:e] = True
    noise = SitePatch(jnp.asarray(subject), jnp.asarray(eps), jnp.asarray(True))

    def p_answer(restore: dict) -> float:
        out = forward_jit(
            cfg, params, tokens, patch={"embed": noise, **restore}, logit_positions=last
        )
        return float(jnp.mean(jax.nn.softmax(out.logits[:, 0])[:, answer]))

    def restored(site: str, token: int | list[int], layers) -> float:
        value = clean.captured[site]  # [L 1 T X], broadcast over the S corrupted rows
        return p_answer({site: make_patch(cfg, site, (S, T), layers, token, value)})

    low, high = p_answer({}), float(jax.nn.softmax(clean.logits[0, 0])[answer])
    assert low < 0.5 * high  # the noise bites
    for site in tr.SITE.values():
        for layers in (np.arange(L) >= 0, [0], [L // 2], [L - 1]):
            for token in range(b):
                assert abs(restored(site, token, layers) - low) <= 1e-6, (site, token, layers)
    # The same patches elsewhere do move the score (the check has power): the subject's block-0
    # outputs bring most of it back, the last token's last block output all of it.
    assert restored("resid", list(range(b, e)), [0]) > low + 0.5 * (high - low)
    assert abs(restored("resid", T - 1, [L - 1]) - high) <= 1e-4


def test_pre_subject_cells_agree_with_the_cell_by_cell_loop(small, smollm):
    """The rows `trace` fills without computing equal the ones the original procedure
    computes cell by cell (same noise draws)."""
    ref = tr.trace_loop(
        smollm, PROMPT, SUBJECT, samples=SAMPLES, seed=1, cells=[("hidden", 0, 3), ("mlp", 0, 0)]
    )
    for (kind, i, layer), v in ref.items():
        assert abs(v - small["kinds"][kind]["scores"][i, layer]) <= 1e-5


def test_grid_equals_cell_by_cell_loop(small, smollm):
    L = smollm.config.n_layers
    cells = [
        ("hidden", 3, 0),
        ("hidden", 3, 7),
        ("hidden", 3, L - 1),
        ("hidden", 9, 12),
        ("mlp", 3, 0),  # window clipped at the bottom
        ("mlp", 3, 8),
        ("mlp", 9, L - 1),  # clipped at the top
        ("attn", 3, 5),
        ("attn", 9, 20),
        ("attn", 9, 0),
    ]
    ref = tr.trace_loop(smollm, PROMPT, SUBJECT, samples=SAMPLES, seed=1, cells=cells)
    for (kind, i, layer), v in ref.items():
        got = small["kinds"][kind]["scores"][i, layer]
        assert abs(got - v) <= 1e-5, (kind, i, layer, got, v)


def test_zero_noise_gives_high_score_everywhere(smollm):
    # Same shapes as the fixture (samples, rows): the compiled programs are reused.
    r = tr.trace(smollm, PROMPT, SUBJECT, samples=SAMPLES, noise=0.0, rows=[3, 9])
    assert r["low_score"] == pytest.approx(r["high_score"], abs=1e-4)
    for kind in tr.KINDS:
        scores = r["kinds"][kind]["scores"][[3, 9]]
        np.testing.assert_allclose(scores, r["high_score"], atol=1e-4)


def test_noise_draws_are_paired_and_seeded(small, smollm):
    again = tr.trace(smollm, PROMPT, SUBJECT, samples=SAMPLES, rows=[9], seed=1)
    assert again["low_score"] == small["low_score"]
    for kind in tr.KINDS:
        np.testing.assert_allclose(
            again["kinds"][kind]["scores"][9], small["kinds"][kind]["scores"][9], atol=1e-6
        )
    other = tr.trace(smollm, PROMPT, SUBJECT, samples=SAMPLES, rows=[9], seed=2)
    assert other["low_score"] != small["low_score"]


def test_noise_level_is_three_sigma_of_subject_embeddings(small, smollm):
    ids, (b, e) = tr.locate_subject(smollm.tokenizer, PROMPT, SUBJECT)
    emb = np.asarray(smollm.params["embed"], np.float32)[ids[b:e]]
    assert small["noise"] == pytest.approx(3 * emb.std(), rel=1e-5)
    assert tr.noise_level("s2", smollm.params, ids[b:e]) == pytest.approx(2 * emb.std(), rel=1e-5)
    assert tr.noise_level(0.25, smollm.params, ids[b:e]) == 0.25
    assert tr.noise_level("0.5", smollm.params, ids[b:e]) == 0.5
    with pytest.raises(InputError):
        tr.noise_level("loud", smollm.params, ids[b:e])
    with pytest.raises(InputError):
        tr.noise_level(-1.0, smollm.params, ids[b:e])


# ----------------------------------------------------------------------------- subject location


def test_locate_subject_uses_offsets(smollm):
    tok = smollm.tokenizer
    assert tr.locate_subject(tok, PROMPT, "The Eiffel Tower")[1] == (0, 4)
    assert tr.locate_subject(tok, PROMPT, " Eiffel Tower")[1] == (1, 4)  # leading space
    assert tr.locate_subject(tok, PROMPT, "Tower")[1] == (3, 4)
    # A subject that ends inside a token still claims that whole token.
    assert tr.locate_subject(tok, PROMPT, "Eiff")[1] == (1, 3)


def test_locate_subject_sentencepiece_style():
    """Offsets of a Metaspace (SentencePiece-style) tokenizer, where '▁Tower' spans the word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["▁The", "▁Eiffel", "▁Tower", "▁is", "▁in", "▁Paris"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="▁The"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()

    class Wrapped:
        def encode_with_offsets(self, text):
            enc = tok.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]

    assert tr.locate_subject(Wrapped(), "The Eiffel Tower is in", "Eiffel Tower")[1] == (1, 3)
    assert tr.locate_subject(Wrapped(), "The Eiffel Tower is in", "The Eiffel")[1] == (0, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(subject="Big Ben"), "does not occur"),
        (dict(prompt="The Eiffel Tower", subject="The Eiffel Tower"), "whole prompt"),
        (dict(subject="   "), "empty subject"),
        (dict(window=0), "window"),
        (dict(samples=0), "samples"),
        (dict(kinds=["mlp", "ffn"]), "kinds"),
    ],
)
def test_errors(smollm, kwargs, message):
    args = dict(prompt=PROMPT, subject=SUBJECT) | kwargs
    prompt, subject = args.pop("prompt"), args.pop("subject")
    with pytest.raises(InputError, match=message):
        tr.trace(smollm, prompt, subject, **args)


def test_window_layers_match_reference_formula():
    # ROME: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    for w in (1, 4, 5, 10):
        for layer in range(30):
            lo, hi = tr.window_layers(layer, w, 30)
            assert lo == max(0, layer - w // 2) and hi == min(30, layer + math.ceil(w / 2))
            assert lo <= layer < hi


def test_plan_cells_covers_grid_once():
    plan = tr.plan_cells(6, tr.KINDS, [9, 12, 15], 16, 4)
    cells = np.concatenate(list(plan.values()))
    assert len(cells) == 3 * 3 * 6
    assert len({tuple(c[:3]) for c in cells}) == len(cells)
    for suffix, group in plan.items():
        assert (16 - group[:, 1] <= suffix).all()  # every restored position inside the suffix
        assert (np.diff(group[:, 5]) >= 0).all()  # sorted by start layer
        assert (group[:, 5] <= group[:, 3] + (group[:, 0] == 0)).all()


def test_suffix_buckets_are_tight_and_few():
    sizes = [fine_bucket(n) for n in range(1, 257)]
    assert all(s >= n for n, s in zip(range(1, 257), sizes, strict=True))
    # at most a third of a suffix is padding, and 256 lengths need only 16 programs
    assert all(3 * (s - n) < s for n, s in zip(range(1, 257), sizes, strict=True))
    assert len(set(sizes)) == 16


# ----------------------------------------------------------------------------- data sets


def test_token_classes():
    c = tr.token_classes(9, (2, 5))
    assert c["first subject token"] == [2]
    assert c["middle subject tokens"] == [3]
    assert c["last subject token"] == [4]
    assert c["first subsequent token"] == [5]
    assert c["further tokens"] == [6, 7]
    assert c["last token"] == [8]
    one = tr.token_classes(4, (0, 1))
    assert one["first subject token"] == one["last subject token"] == [0]
    assert one["middle subject tokens"] == []


def test_average_effects_mean_and_ci():
    rng = np.random.default_rng(0)
    results = []
    for _ in range(5):
        scores = rng.random((6, 4))
        results.append(
            {"subject_range": [1, 3], "low_score": 0.1, "kinds": {"mlp": {"scores": scores}}}
        )
    out = tr.average_effects(results)["mlp"]
    rows = np.stack([r["kinds"]["mlp"]["scores"][2] - 0.1 for r in results])
    np.testing.assert_allclose(out["last subject token"]["mean"], rows.mean(0))
    np.testing.assert_allclose(out["last subject token"]["ci95"], 1.96 * rows.std(0) / math.sqrt(5))
    further = np.concatenate([r["kinds"]["mlp"]["scores"][4:5] - 0.1 for r in results])
    np.testing.assert_allclose(out["further tokens"]["mean"], further.mean(0))
    assert "middle subject tokens" not in out  # a two-token subject has no middle
    assert out["first subsequent token"]["n"] == 5


def test_load_facts_formats(data_dir):
    known = tr.load_facts(os.path.join(data_dir, "counterfact", "known_1000.json"), 3)
    assert known[0] == {
        "prompt": "Vinson Massif is located in the continent of",
        "subject": "Vinson Massif",
        "expect": "Antarctica",
    }
    orig = tr.load_facts(
        os.path.join(data_dir, "counterfact", "original_format", "most_orthogonal.json"), 2
    )
    assert all("{}" not in f["prompt"] and f["subject"] in f["prompt"] for f in orig)
    assert all(isinstance(f["expect"], str) for f in orig)
    easy = tr.load_facts(os.path.join(data_dir, "counterfact", "counterfact-edit.json"), 2)
    assert all(f["subject"] in f["prompt"] and f["expect"] for f in easy)


def test_answer_matches_first_token(smollm):
    paris = smollm.tokenizer.encode_continuation(" Paris")[0]
    assert tr.answer_matches(smollm.tokenizer, paris, "Paris")
    assert not tr.answer_matches(smollm.tokenizer, paris, "Rome")


def test_trace_dataset_skips_wrong_predictions(smollm):
    facts = [
        {"prompt": PROMPT, "subject": SUBJECT, "expect": "Paris"},
        {"prompt": PROMPT, "subject": SUBJECT, "expect": "Rome"},  # the model says Paris
        {"prompt": PROMPT, "subject": "Big Ben", "expect": "Paris"},  # not in the prompt
    ]
    summary, results = tr.trace_dataset(
        smollm,
        facts,
        samples=SAMPLES,
        noise=0.1,
        classes=["last token"],
        progress=False,
    )
    assert (summary["n_facts"], summary["n_skipped"], summary["n_invalid"]) == (1, 1, 1)
    mean = summary["kinds"]["mlp"]["last token"]["mean"]
    np.testing.assert_allclose(
        mean, results[0]["kinds"]["mlp"]["scores"][-1] - results[0]["low_score"], atol=1e-6
    )


# ----------------------------------------------------------------------------- plots and CLI


def test_plots(small, tmp_path):
    from jaxedit.locate import plots

    paths = plots.save_heatmaps(small, str(tmp_path), "png")
    assert [os.path.basename(p) for p in paths] == [f"trace_{k}.png" for k in tr.KINDS]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    summary = {
        "n_facts": 1,
        "n_skipped": 0,
        "kinds": tr.average_effects([small], ["last subject token", "last token"]),
    }
    path = plots.save_average_effects(summary, str(tmp_path / "avg.pdf"))
    assert open(path, "rb").read(4) == b"%PDF"


@pytest.fixture
def cli_model(smollm, monkeypatch):
    from jaxedit.cli import shared as _common

    # `_load`, not `load_model`: command modules bind `load_model` when first imported
    monkeypatch.setattr(_common, "_load", lambda *args: smollm)
    monkeypatch.setattr("jaxedit.cli.commands.trace.load_model", lambda args: smollm)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", PROMPT, "--subject", "Big Ben"], "does not occur"),
        (["--prompt", PROMPT, "--subject", PROMPT], "whole prompt"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--window", "0"], "window"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--samples", "0"], "samples"),
        (["--prompt", PROMPT], "--prompt and --subject"),
    ],
)
def test_cli_errors(cli_model, capsys, tmp_path, argv, message):
    from jaxedit.cli.main import main

    assert main(["trace", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_single_fact(cli_model, capsys, tmp_path):
    from jaxedit.cli.main import main

    argv = ["trace", "--prompt", PROMPT, "--subject", "The Eiffel Tower", "--samples", "3"]
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    on_disk = json.load(open(tmp_path / "trace.json"))
    assert out["answer"] == on_disk["answer"] == " Paris"
    assert out["high_score"] == pytest.approx(0.70, abs=0.01)
    assert out["low_score"] < 0.3
    assert len(out["kinds"]["mlp"]["scores"]) == len(out["tokens"]) == 10
    hidden = np.asarray(out["kinds"]["hidden"]["scores"])
    assert abs(hidden[-1, -1] - out["high_score"]) <= 1e-4
    for kind in tr.KINDS:
        assert (tmp_path / f"trace_{kind}.png").exists()


@pytest.mark.slow
def test_cli_dataset(cli_model, capsys, tmp_path):
    from jaxedit.cli.main import main

    data = tmp_path / "facts.json"
    facts = [
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Paris"},
        {"prompt": PROMPT, "subject": SUBJECT, "attribute": "Rome"},
    ]
    data.write_text(json.dumps(facts))
    argv = ["trace", "--data", str(data), "--n", "5", "--kinds", "mlp", "--samples", "2"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.load(open(tmp_path / "summary.json"))
    assert (summary["n_facts"], summary["n_skipped"]) == (1, 1)
    assert len(summary["kinds"]["mlp"]["last subject token"]["mean"]) == summary["layers"]
    assert (tmp_path / "average_effects.png").exists()
    assert "1 facts traced, 1 skipped" in capsys.readouterr().out
