"""The runner: modes, baseline, known-only, files, resume, crash safety, CLI errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxedit import cli
from jaxedit.methods import legacy as methods
from jaxedit.errors import InputError
from jaxedit.eval import runner as evaluate
from jaxedit.locate import facts
from jaxedit.methods.legacy import EditResult
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight, set_weight
from jaxedit.models.transformer import init_params


@pytest.fixture(scope="module")
def tiny(smollm):
    """A 2-layer random model with the real tokenizer: runner tests need speed, not facts."""
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


REQS = facts.FACTS[:3]


def scale_edit(lm, requests):
    """A fake parameter edit: scales one MLP output matrix (changes every prediction)."""
    w = get_weight(lm.params, "mlp_out", 0)
    return EditResult(model=lm.with_params(set_weight(lm.params, "mlp_out", 0, w * 3.0)))


def leaves(params):
    return [np.array(x) for x in jax.tree.leaves(params)]


def test_independent_reverts_bit_identical(tiny, tmp_path):
    before = leaves(tiny.params)
    seen = []

    def edit(lm, reqs):
        seen.append(lm)
        return scale_edit(lm, reqs)

    res = evaluate.evaluate(tiny, REQS, edit, method="scale", out=tmp_path)
    assert all(m is tiny for m in seen)  # every edit starts from the original model
    for a, b in zip(before, leaves(tiny.params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert res["n"] == 3 and len(res["cases"]) == 3
    # the edit changed the model's scores (so the test above is not vacuous)
    moved = [
        c["metrics"]["efficacy_magnitude"] != c["baseline"]["efficacy_magnitude"]
        for c in res["cases"]
    ]
    assert all(moved)


def test_none_method_equals_baseline(tiny):
    edit = methods.get("none").prepare(tiny, None)
    res = evaluate.evaluate(tiny, REQS, edit, method="none")
    for name, s in res["metrics"].items():
        assert s["mean"] == pytest.approx(res["baseline"][name]["mean"]), name
    assert res["metrics"]["locality"]["mean"] == 1.0
    for name in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "reverse"):
        assert name in res["metrics"]


def test_baseline_measured_directly(tiny):
    """Baseline numbers equal metrics computed by hand from score_targets."""
    from jaxedit.eval import scoring as metrics

    res = evaluate.evaluate(tiny, REQS[:1], scale_edit)
    r = REQS[0]
    s = metrics.score_targets(tiny, [r.rewrite_prompt] * 2, [r.target_new, r.target_true])
    em = float(np.exp(-s.nll[0]) - np.exp(-s.nll[1]))
    assert res["baseline"]["efficacy_magnitude"]["mean"] == pytest.approx(em, abs=1e-6)
    assert res["baseline"]["reliability"]["mean"] == pytest.approx(s.token_acc[0])


def test_sequential_first_edit_equals_independent(tiny):
    ind = evaluate.evaluate(tiny, REQS[:2], scale_edit, mode="independent")
    seq = evaluate.evaluate(tiny, REQS[:2], scale_edit, mode="sequential", every=1)
    first = seq["checkpoints"][0]
    assert first["after"] == 1
    case0 = ind["cases"][0]["metrics"]
    assert set(first["metrics"]) - {"score"} == set(case0)
    for name, value in case0.items():
        assert first["metrics"][name]["mean"] == pytest.approx(value), name
    # after two accumulated edits (scale 9x) the first case differs from its independent value
    assert seq["cases"][0]["metrics"] != ind["cases"][0]["metrics"]


def test_batch_mode(tiny):
    calls = []

    def edit(lm, reqs):
        calls.append(len(reqs))
        return scale_edit(lm, reqs)

    res = evaluate.evaluate(tiny, REQS, edit, mode="batch", batch_size=2)
    assert calls == [2, 1] and len(res["cases"]) == 3


def test_known_only_reports_dropped(tiny):
    from jaxedit.eval import scoring as metrics

    res = evaluate.evaluate(tiny, facts.FACTS, scale_edit, known_only=True)
    prompts = [f.rewrite_prompt for f in facts.FACTS]
    t = metrics.score_targets(tiny, prompts, [f.target_true for f in facts.FACTS]).nll
    n = metrics.score_targets(tiny, prompts, [f.target_new for f in facts.FACTS]).nll
    expected_kept = int(np.sum(t < n))
    assert res["n"] == expected_kept
    assert res["n_dropped"] == len(facts.FACTS) - expected_kept


def test_context_is_passed_as_prefix(tiny, monkeypatch):
    seen = []
    real = evaluate.metrics.score_targets

    def spy(lm, prompts, targets, *, prefix=None, **kw):
        seen.append(prefix)
        return real(lm, prompts, targets, prefix=prefix, **kw)

    monkeypatch.setattr(evaluate.metrics, "score_targets", spy)
    ctx = lambda lm, reqs: EditResult(model=lm, context="New fact: x.\n")
    res = evaluate.evaluate(tiny, REQS[:1], ctx)
    assert seen == [None, "New fact: x.\n"]  # baseline without, edited with the prefix
    assert res["metrics"]["efficacy_magnitude"] != res["baseline"]["efficacy_magnitude"]


class Crash(Exception):
    pass


def test_files_crash_safety_and_resume(tiny, tmp_path):
    calls, crash_at = [], [2]

    def crashing(lm, reqs):
        calls.append(reqs[0].case_id)
        if len(calls) == crash_at[0]:
            raise Crash
        return scale_edit(lm, reqs)

    with pytest.raises(Crash):
        evaluate.evaluate(tiny, REQS, crashing, method="scale", out=tmp_path)
    rows = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["case_id"] == REQS[0].case_id
    with open(tmp_path / "cases.jsonl", "a") as f:
        f.write('{"case_id": "half-writ')  # a line cut by the crash

    calls.clear()
    crash_at[0] = -1
    res = evaluate.evaluate(tiny, REQS, crashing, method="scale", out=tmp_path, resume=True)
    assert calls == [REQS[1].case_id, REQS[2].case_id]  # the finished case is skipped
    assert [c["case_id"] for c in res["cases"]] == [r.case_id for r in REQS]
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "model", "data", "n", "n_dropped", "mode", "hparams", "metrics"):
        assert key in saved
    assert set(saved["metrics"]["efficacy_score"]) == {"mean", "std", "n"}
    assert {"median", "p90"} == set(saved["seconds"]["per_edit"])
    assert "| efficacy_score |" in (tmp_path / "results.md").read_text()
    # everything finished: a resumed run edits nothing, keeps the measured times, renders
    calls.clear()
    again = evaluate.evaluate(tiny, REQS, crashing, method="scale", out=tmp_path, resume=True)
    assert calls == [] and again["metrics"] == res["metrics"]
    assert again["seconds"]["per_edit"]["median"] == pytest.approx(
        float(np.median([c["seconds"] for c in res["cases"]]))
    )


def test_resume_refuses_a_different_run(tiny, tmp_path):
    evaluate.evaluate(tiny, REQS[:1], scale_edit, method="scale", out=tmp_path)
    with pytest.raises(InputError, match="different run"):
        evaluate.evaluate(tiny, REQS[:1], scale_edit, method="other", out=tmp_path, resume=True)


def test_deterministic(tiny):
    a = evaluate.evaluate(tiny, REQS[:2], scale_edit)
    b = evaluate.evaluate(tiny, REQS[:2], scale_edit)
    assert [c["metrics"] for c in a["cases"]] == [c["metrics"] for c in b["cases"]]


def test_errors(tiny):
    with pytest.raises(InputError, match="unknown mode"):
        evaluate.evaluate(tiny, REQS, scale_edit, mode="parallel")
    with pytest.raises(InputError, match="no requests"):
        evaluate.evaluate(tiny, [], scale_edit)


def test_quick_table(tiny):
    out = evaluate.quick_table(tiny, scale_edit(tiny, REQS).model, REQS)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["metric", "before", "after"]
    assert any(line.startswith("efficacy_score") for line in lines)
    assert any(line.startswith("reverse") for line in lines)


# ----------------------------------------------------------------------------- CLI


def cf(data_dir):
    return os.path.join(data_dir, "counterfact", "counterfact-edit.json")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n must be positive"),
        (["--format", "zsre"], "record 0:"),
        (["--method", "nonexistent"], "unknown method"),
    ],
)
def test_cli_errors(data_dir, capsys, extra, message):
    assert cli.main(["eval", "--data", cf(data_dir), "--n", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_and_empty_data(tmp_path, capsys):
    assert cli.main(["eval", "--data", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "e.json").write_text("[]")
    assert cli.main(["eval", "--data", str(tmp_path / "e.json")]) == 2
    assert "empty data set" in capsys.readouterr().err


def test_cli_accepts_method_flags():
    """Each registered method's flags exist on `jaxedit eval` (a test-only method here)."""

    def add(p):
        p.add_argument("--fake-strength", type=float, default=2.0)
        p.add_argument("--seed", type=int, default=99)  # clashes with eval's own: skipped

    methods.register(methods.Method("fake_for_cli", add, lambda lm, args: scale_edit))
    args = cli.build_parser().parse_args(["eval", "--fake-strength", "3", "--data", "x"])
    assert args.fake_strength == 3.0 and args.seed == 0


def test_cli_none_on_counterfact(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        ["eval", "--data", cf(data_dir), "--n", "3", "--out", str(out), "--no-progress", "--json"]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "none" and res["n"] == 3
    assert res["metrics"]["efficacy_score"]["n"] == 3
    assert (out / "results.json").exists() and (out / "results.md").exists()


@pytest.mark.slow
def test_generation_metrics(tiny):
    from jaxedit.eval import scoring as metrics

    r = facts.FACTS[0]
    tf = metrics.TfIdf.fit(["the eiffel tower is in paris", "rome is in italy", "a b c d e"])
    r2 = type(r)(**{**r.__dict__, "extra": {"reference_texts": ["Rome is a city in Italy."]}})
    m = evaluate.generation_metrics(tiny, r2, max_new_tokens=8, tfidf=tf)
    assert m["fluency"] >= 0 and 0 <= m["consistency"] <= 1
