"""The runner through the method protocol (modes, baseline, known-only, files, resume), the
generation metrics (ROME's decoding, consistency references), and `jaxedit eval`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

import jax
import numpy as np
import pytest

from jaxedit import cli, methods
from jaxedit.cli.commands import eval as eval_cmd
from jaxedit.edits import ContextEdit, WeightDelta, WeightEdit, apply
from jaxedit.errors import InputError
from jaxedit.eval import datasets, generation, runner, scoring
from jaxedit.eval.datasets.snippets import load_snippets
from jaxedit.eval.generation import DECODINGS, Decoding
from jaxedit.eval.measure import case_metrics, measure
from jaxedit.locate import facts
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import forward, init_params


@pytest.fixture(scope="module")
def tiny(smollm):
    """A 2-layer random model with the real tokenizer: runner tests need speed, not facts."""
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


REQS = facts.FACTS[:3]


# ----------------------------------------------------------------------------- fake methods


@dataclass(frozen=True)
class ScaleHparams:
    factor: float = 3.0


def _scale(lm, factor, requests):
    """A weight edit: multiplies layer 0's MLP output matrix by `factor` (moves every score)."""
    w = np.asarray(get_weight(lm.params, "mlp_out", 0), np.float32)
    delta = WeightDelta("mlp_out", 0, dense=(factor - 1.0) * w)
    return WeightEdit((delta,), {"method": "scale"}), {"n_requests": len(requests)}


# `jaxedit eval --method scale` finds this module's METHOD through the registry (tests only).
METHOD = SCALE = EditMethod(
    "scale", ScaleHparams, lambda lm, hp, opts: hp.factor, _scale, default_hparams=ScaleHparams
)


def fact(r) -> str:
    return f"{r.rewrite_prompt} {r.target_new}"


CONTEXT = EditMethod(
    "ctx",
    ScaleHparams,
    lambda lm, hp, opts: None,
    lambda lm, state, reqs: (ContextEdit(tuple(fact(r) for r in reqs), reserve_tokens=32), {}),
    default_hparams=ScaleHparams,
)


def spying(method: EditMethod, seen: list, crash_at: int | None = None) -> EditMethod:
    """`method`, recording (model, requests) of every compute; raises at call `crash_at`."""

    def compute(lm, state, reqs):
        seen.append((lm, [r.case_id for r in reqs]))
        if len(seen) == crash_at:
            raise Crash
        return method.compute_fn(lm, state, reqs)

    return dataclasses.replace(method, compute_fn=compute)


class Crash(Exception):
    pass


def evaluate(lm, reqs, method=SCALE, **kw):
    kw.setdefault("general", False)  # its own tests: tests/test_general.py, test_lifelong.py
    return runner.evaluate(lm, reqs, method, method.prepare(lm, method.hparams()), **kw)


def leaves(params):
    return [np.array(x) for x in jax.tree.leaves(params)]


# ----------------------------------------------------------------------------- modes


def test_independent_reverts_bit_identical(tiny, tmp_path):
    before, seen = leaves(tiny.params), []
    res = evaluate(tiny, REQS, spying(SCALE, seen), out=tmp_path)
    assert all(lm is tiny for lm, _ in seen)  # every edit starts from the original model
    for a, b in zip(before, leaves(tiny.params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert res["n"] == 3 and len(res["cases"]) == 3
    assert res["cases"][0]["edit"] == {"n_requests": 1}  # compute's info, per case
    moved = [
        c["metrics"]["efficacy_magnitude"] != c["baseline"]["efficacy_magnitude"]
        for c in res["cases"]
    ]
    assert all(moved)  # the edit changed the scores: the check above is not vacuous


def test_none_method_reuses_the_baseline(tiny, monkeypatch):
    """`none` computes an empty weight edit: the baseline's scores are reused, not re-measured."""
    calls = []
    real = runner.measure
    monkeypatch.setattr(runner, "measure", lambda lm, reqs: calls.append(1) or real(lm, reqs))
    res = evaluate(tiny, REQS, methods.get("none"))
    assert len(calls) == 1  # the baseline only
    for name, s in res["metrics"].items():
        assert s["mean"] == pytest.approx(res["baseline"][name]["mean"]), name
    assert res["metrics"]["locality"]["mean"] == 1.0
    for name in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "reverse"):
        assert name in res["metrics"]


def test_baseline_measured_directly(tiny):
    """Baseline numbers equal metrics computed by hand from score_targets."""
    res = evaluate(tiny, REQS[:1])
    r = REQS[0]
    s = scoring.score_targets(tiny, [r.rewrite_prompt] * 2, [r.target_new, r.target_true])
    em = float(np.exp(-s.nll[0]) - np.exp(-s.nll[1]))
    assert res["baseline"]["efficacy_magnitude"]["mean"] == pytest.approx(em, abs=1e-6)
    assert res["baseline"]["reliability"]["mean"] == pytest.approx(s.token_acc[0])


def test_sequential_weight_edits_add_up(tiny):
    ind = evaluate(tiny, REQS[:2], mode="independent")
    seq = evaluate(tiny, REQS[:2], mode="sequential", every=1)
    first = seq["curve"][0]
    assert (first["edits"], first["rounds"]) == (1, 1) and len(seq["curve"]) == 2
    case0 = ind["cases"][0]["metrics"]
    assert set(first["metrics"]) - {"score"} == set(case0)
    for name, value in case0.items():
        assert first["metrics"][name]["mean"] == pytest.approx(value), name
    # after both edits the model is apply(apply(lm, e1), e2): layer 0's W scaled 3 x 3
    lm1 = apply(tiny, SCALE.compute(tiny, 3.0, REQS[:1])[0])
    lm2 = apply(lm1, SCALE.compute(lm1, 3.0, REQS[1:2])[0])
    w0, w2 = (np.asarray(get_weight(m.params, "mlp_out", 0)) for m in (tiny, lm2))
    np.testing.assert_allclose(w2, 9 * w0, rtol=1e-5)
    pre = measure(tiny, REQS[:1])[0]
    want = case_metrics(REQS[0], measure(lm2, REQS[:1])[0], pre)
    for name, value in want.items():
        assert seq["cases"][0]["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_sequential_context_edits_compose_into_one_context(tiny, monkeypatch):
    """IKE sequential: one well-formed context with every fact so far (was: contexts joined,
    '…Prompt: New Fact: …'), measured as the model `apply` gives."""
    measured = []
    real = runner.measure
    monkeypatch.setattr(runner, "measure", lambda lm, reqs: measured.append(lm) or real(lm, reqs))
    res = evaluate(tiny, REQS, CONTEXT, mode="sequential")
    text = measured[-1].context_text()
    assert text.count("Prompt:") == 1 and text.endswith("Prompt: ")
    assert text == "".join(f"New Fact: {fact(r)}\n" for r in REQS) + "Prompt: "
    edited = tiny
    for r in REQS:
        edited = apply(edited, CONTEXT.compute(edited, None, [r])[0])
    pre, post = measure(tiny, REQS), measure(edited, REQS)
    for case, r, p, q in zip(res["cases"], REQS, pre, post, strict=True):
        assert case["metrics"] == pytest.approx(case_metrics(r, q, p))
        assert case["metrics"]["efficacy_magnitude"] != case["baseline"]["efficacy_magnitude"]


def test_batch_mode_keeps_groups_whole(tiny):
    grouped = [dataclasses.replace(r, extra={"group": g}) for r, g in zip(REQS, "aab", strict=True)]
    for reqs, size, want in ((REQS, 2, [2, 1]), (grouped, 1, [2, 1]), (grouped, 3, [3])):
        seen = []
        res = evaluate(tiny, reqs, spying(SCALE, seen), mode="batch", batch_size=size)
        assert [len(ids) for _, ids in seen] == want and len(res["cases"]) == 3


def test_known_only_reports_dropped(tiny):
    res = evaluate(tiny, facts.FACTS, known_only=True)
    prompts = [f.rewrite_prompt for f in facts.FACTS]
    t = scoring.score_targets(tiny, prompts, [f.target_true for f in facts.FACTS]).nll
    n = scoring.score_targets(tiny, prompts, [f.target_new for f in facts.FACTS]).nll
    expected_kept = int(np.sum(t < n))
    assert res["n"] == expected_kept
    assert res["n_dropped"] == len(facts.FACTS) - expected_kept


def test_files_crash_safety_and_resume(tiny, tmp_path):
    info = {"data": "facts", "hparams": {"factor": 3.0}}
    seen: list = []
    with pytest.raises(Crash):
        evaluate(tiny, REQS, spying(SCALE, seen, crash_at=2), out=tmp_path, info=info)
    rows = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["case_id"] == REQS[0].case_id
    with open(tmp_path / "cases.jsonl", "a") as f:
        f.write('{"case_id": "half-writ')  # a line cut by the crash

    seen.clear()
    res = evaluate(tiny, REQS, spying(SCALE, seen), out=tmp_path, resume=True, info=info)
    assert [ids for _, ids in seen] == [[REQS[1].case_id], [REQS[2].case_id]]  # 1st skipped
    assert [c["case_id"] for c in res["cases"]] == [r.case_id for r in REQS]
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "model", "data", "n", "n_dropped", "mode", "metrics"):
        assert key in saved
    assert saved["hparams"] == {"factor": 3.0}
    assert set(saved["metrics"]["efficacy_score"]) == {"mean", "std", "n"}
    assert {"median", "p90"} == set(saved["seconds"]["per_edit"])
    assert "| efficacy_score |" in (tmp_path / "results.md").read_text()
    # everything finished: a resumed run edits nothing, keeps the measured times, renders
    seen.clear()
    again = evaluate(tiny, REQS, spying(SCALE, seen), out=tmp_path, resume=True, info=info)
    assert seen == [] and again["metrics"] == res["metrics"]
    assert again["seconds"]["per_edit"]["median"] == pytest.approx(
        float(np.median([c["seconds"] for c in res["cases"]]))
    )


def test_resume_refuses_a_different_run(tiny, tmp_path):
    evaluate(tiny, REQS[:1], out=tmp_path, info={"hparams": {"factor": 3.0}})
    other = dataclasses.replace(SCALE, name="other")
    with pytest.raises(InputError, match=r"different run \(\['method'\]\)"):
        evaluate(
            tiny, REQS[:1], other, out=tmp_path, resume=True, info={"hparams": {"factor": 3.0}}
        )
    with pytest.raises(InputError, match=r"different run \(\['hparams'\]\)"):
        evaluate(tiny, REQS[:1], out=tmp_path, resume=True, info={"hparams": {"factor": 2.0}})


def test_deterministic(tiny):
    a = evaluate(tiny, REQS[:2])
    b = evaluate(tiny, REQS[:2])
    assert [c["metrics"] for c in a["cases"]] == [c["metrics"] for c in b["cases"]]


def test_errors(tiny):
    with pytest.raises(InputError, match="unknown mode"):
        evaluate(tiny, REQS, mode="parallel")
    with pytest.raises(InputError, match="no requests"):
        evaluate(tiny, [])
    with pytest.raises(InputError, match="independent and sequential modes only"):
        evaluate(tiny, REQS, mode="batch", resume=True)
    with pytest.raises(InputError, match="--batch-size must be positive"):
        evaluate(tiny, REQS, mode="sequential", batch_size=0)
    with pytest.raises(InputError, match="--every needs --mode sequential"):
        evaluate(tiny, REQS, every=2)


def test_quick_table(tiny):
    out = runner.quick_table(tiny, apply(tiny, SCALE.compute(tiny, 3.0, REQS)[0]), REQS)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["metric", "before", "after"]
    assert any(line.startswith("efficacy_score") for line in lines)
    assert any(line.startswith("reverse") for line in lines)


# ----------------------------------------------------------------------------- generation

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux speaks"]


def own_tokens(lm, prompt: str) -> int:
    return len(lm.tokenizer.encode(prompt)) - (1 if lm.tokenizer.add_bos else 0)


def test_default_decoding_samples_top_k5_for_100_tokens(tiny):
    """ROME's generate_fast: 100 tokens per text (prompt included), each sampled among the 5
    most likely next tokens; seeded (was: greedy, 40 new tokens)."""
    dec = DECODINGS[generation.DEFAULT_DECODING]
    ids = generation.generate_ids(tiny, PROMPTS, dec)
    ranks = []
    for p, new in zip(PROMPTS, ids, strict=True):
        assert len(new) == 100 - own_tokens(tiny, p)
        seq = tiny.tokenizer.encode(p) + new
        logits = np.asarray(forward(tiny.config, tiny.params, jax.numpy.asarray([seq])).logits[0])
        start = len(seq) - len(new) - 1  # the logits at this position predict new[0]
        for j, t in enumerate(new):
            row = logits[start + j]
            ranks.append(int(np.sum(row > row[t])))
    assert max(ranks) < 5  # always among the top 5 ...
    assert np.mean(np.array(ranks) > 0) > 0.3  # ... and sampled, not the argmax
    assert generation.generate_ids(tiny, PROMPTS, dec) == ids  # the same seed, the same text
    other = generation.generate_ids(tiny, PROMPTS, dataclasses.replace(dec, seed=1))
    assert other != ids


def test_greedy_decoding_reads_the_models_context(tiny):
    """Greedy (top-k 1) with a context edit: the context is read before the prompt (through
    the prefix KV cache) and not counted in the length; the ids equal the plain model's on
    the joined text."""
    lm2 = apply(tiny, ContextEdit(("The Eiffel Tower is located in the city of Rome",), (), 16))
    dec = Decoding(top_k=1, max_out_len=own_tokens(tiny, PROMPTS[0]) + 10)
    (ids,) = generation.generate_ids(lm2, PROMPTS[:1], dec)
    joined = lm2.context_text() + PROMPTS[0]
    plain = Decoding(top_k=1, max_out_len=own_tokens(tiny, joined) + 10)
    assert len(ids) == 10 and generation.generate_ids(tiny, [joined], plain) == [ids]


@pytest.mark.slow
def test_generation_metrics_with_snippets(tiny, data_dir, tmp_path):
    """Fluency for every case; consistency where the attribute snippets have references."""
    f = os.path.join(data_dir, "counterfact", "original_format", "most_orthogonal.json")
    # two generation prompts each (of ten): the shapes of the test above, compiled once
    reqs = [
        dataclasses.replace(r, generation_prompts=r.generation_prompts[:2])
        for r in datasets.load(f, n=2).requests
    ]
    r0 = reqs[0]
    snips = tmp_path / "snips.json"
    snips.write_text(
        json.dumps(
            [
                {
                    "relation_id": r0.extra["relation_id"],
                    "target_id": r0.extra["target_new_id"],
                    "samples": [{"name": "Brel", "text": "Jacques Brel was a Belgian singer."}],
                },
                {"relation_id": "P0", "target_id": "Q0", "samples": [{"text": "unrelated"}]},
            ]
        )
    )
    dec = DECODINGS[generation.DEFAULT_DECODING]
    res = evaluate(tiny, reqs, generation=dec, snippets=load_snippets(snips))
    c0, c1 = res["cases"]
    for c in (c0, c1):
        assert c["metrics"]["fluency"] > 0 and c["baseline"]["fluency"] > 0
        assert len(c["generated"]) == 2
    assert 0 <= c0["metrics"]["consistency"] <= 1 and "consistency" in c0["baseline"]
    assert "consistency" not in c1["metrics"]  # no snippet of its (relation, target_new)
    assert res["metrics"]["consistency"]["n"] == 1
    assert res["decoding"] == {"top_k": 5, "max_out_len": 100, "seed": 0}
    # `none` changes nothing: the edited texts are the unedited ones
    none = evaluate(tiny, reqs[:1], methods.get("none"), generation=dec)
    assert none["cases"][0]["metrics"]["fluency"] == none["cases"][0]["baseline"]["fluency"]
    with pytest.raises(InputError, match="add --generation"):
        evaluate(tiny, reqs, snippets=load_snippets(snips))
    flat = datasets.load(os.path.join(data_dir, "counterfact", "counterfact-edit.json"), n=2)
    with pytest.raises(InputError, match="no request matches a snippet"):
        evaluate(tiny, flat.requests, generation=dec, snippets=load_snippets(snips))


# ----------------------------------------------------------------------------- CLI


def cf(data_dir):
    return os.path.join(data_dir, "counterfact", "counterfact-edit.json")


@pytest.fixture
def cli_tiny(tiny, monkeypatch):
    """`jaxedit eval` on the tiny model, with the test-only `scale` method registered."""
    monkeypatch.setattr(eval_cmd, "load_model", lambda args: tiny)
    monkeypatch.setitem(methods.REGISTRY, "scale", __name__)
    return tiny


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n must be positive"),
        (["--format", "zsre"], "record 0:"),
        (["--method", "scale", "--set", "nope=1"], "nope"),
        (["--snippets", "s.json"], "add --generation"),
    ],
)
def test_cli_errors(cli_tiny, data_dir, capsys, extra, message):
    assert cli.main(["eval", "--data", cf(data_dir), "--n", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_unknown_method(data_dir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--data", cf(data_dir), "--method", "nonexistent"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_missing_and_empty_data(tmp_path, capsys):
    assert cli.main(["eval", "--data", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "e.json").write_text("[]")
    assert cli.main(["eval", "--data", str(tmp_path / "e.json")]) == 2
    assert "empty data set" in capsys.readouterr().err


def test_cli_none_on_counterfact(cli_tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--data", cf(data_dir), "--n", "3", "--out", str(out), "--no-progress"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    # A random model knows none of the candidate facts: no known_facts_acc, and it says so
    assert cli.main([*args, "--n-known-facts", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "known_facts_acc" not in res["general"]["edited"]
    assert res["general_setup"]["n_known_facts"] == 0
    assert "0 known to the unedited model of 80 scored" in res["general_setup"]["known_facts"]
    shutil.rmtree(out)
    # unfiltered (the measure of earlier runs): 200 other records of the file
    assert cli.main([*args, "--known-facts-unfiltered", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "none" and res["n"] == 3 and res["hparams"] == {}
    assert res["metrics"]["efficacy_score"]["n"] == 3
    assert (out / "results.json").exists() and (out / "results.md").exists()
    # the general block by default: `none` changes nothing; 200 other records of the file
    g = res["general"]
    assert g["edited"] == g["unedited"] and set(g["edited"]) == {
        "wikitext_ppl",
        "known_facts_acc",
        "fluency",
    }
    assert res["general_setup"]["n_known_facts"] == 200
    assert "| general (after the last edit) |" in (out / "results.md").read_text()


def test_cli_method_through_the_protocol(cli_tiny, data_dir, tmp_path, capsys):
    """A method's settings come from its hparams dataclass (--set), recorded as JSON."""
    args = ["eval", "--data", cf(data_dir), "--n", "2", "--out", str(tmp_path), "--no-progress"]
    args += ["--no-general"]
    assert cli.main([*args, "--method", "scale", "--set", "factor=2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "scale" and res["hparams"] == {"factor": 2.0}
    w = np.asarray(get_weight(cli_tiny.params, "mlp_out", 0))
    lm2 = apply(cli_tiny, SCALE.compute(cli_tiny, 2.0, REQS[:1])[0])
    assert np.allclose(np.asarray(get_weight(lm2.params, "mlp_out", 0)), 2 * w)
    reqs = datasets.load(cf(data_dir), n=2).requests
    want = case_metrics(reqs[0], measure(lm2, reqs[:1])[0], measure(cli_tiny, reqs[:1])[0])
    got = res["cases"][0]["metrics"]
    # the teacher-forced metrics equal a direct measure; *_gen (on by default for --n <= 200)
    # are the generation-based ones, tested in test_generation_metrics.py
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert set(got) - set(want) == {k for k in got if k.endswith("_gen")}


def test_cli_generation_flags(cli_tiny, data_dir, tmp_path, monkeypatch):
    """--decoding / --gen-length / --seed make the decoding; --snippets is loaded and passed."""
    rome = os.path.join(data_dir, "counterfact", "original_format", "most_orthogonal.json")
    snips = tmp_path / "snips.json"
    snips.write_text(json.dumps([{"relation_id": "P27", "target_id": "Q31", "samples": []}]))
    seen = {}
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: seen.update(kw) or {"n": 0})
    args = ["eval", "--data", rome, "--n", "1", "--out", str(tmp_path / "o"), "--json"]
    gen = ["--generation", "--decoding", "greedy", "--gen-length", "20", "--seed", "3"]
    assert cli.main([*args, *gen, "--snippets", str(snips)]) == 0
    assert seen["generation"] == Decoding(top_k=1, max_out_len=20, seed=3)
    assert seen["snippets"].path == str(snips)
    assert cli.main([*args, "--generation"]) == 0
    assert seen["generation"] == Decoding(top_k=5, max_out_len=100, seed=0)  # ROME's
    assert seen["snippets"] is None
    assert cli.main(args) == 0 and seen["generation"] is None
