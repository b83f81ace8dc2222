"""Lifelong (sequential) evaluation: the method protocol's step / save_state / load_state,
rounds of --batch-size requests through `method.step`, the curve, the general block, the
per-round checkpoint and --resume (a resumed run = an uninterrupted one: a fake stateful
method and ROME), batch mode through the stateless compute, and `jaxedit eval` flags."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import tiny_llama_config

from jaxedit import cli, methods
from jaxedit.cli.commands import eval as eval_cmd
from jaxedit.edits import WeightDelta, WeightEdit, apply, load_edit
from jaxedit.errors import CheckpointError, InputError
from jaxedit.eval import datasets, general, runner
from jaxedit.eval.general import GeneralSuite
from jaxedit.eval.measure import case_metrics, measure
from jaxedit.locate import facts
from jaxedit.methods import alphaedit, memit, rome
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


REQS = list(facts.FACTS[:5])
# A small general suite: the runner's plumbing, not the numbers (tests/test_general.py).
SMALL = GeneralSuite.default(
    [("The Eiffel Tower is located in the city of", "Paris"), ("Apple was founded by", "Jobs")],
    "test",
    max_tokens=64,
    window=32,
    prompts=general.FLUENCY_PROMPTS[:2],
    fluency_length=16,
)


# ----------------------------------------------------------------------------- fake methods


@dataclass(frozen=True)
class CountHparams:
    step: float = 0.5


def _prepare(lm, hp, opts):
    return {"model": lm.name, "step": hp.step, "round": 0}


def _edit(lm, state, reqs):
    """Layer 0's MLP output matrix × (1 + step / (round + 1)): the edit depends on the state."""
    w = np.asarray(get_weight(lm.params, "mlp_out", 0), np.float32)
    f = state["step"] / (state["round"] + 1)
    delta = WeightDelta("mlp_out", 0, dense=f * w)
    return WeightEdit((delta,), {"method": "counter"}), {"round": state["round"], "n": len(reqs)}


def _step(lm, state, reqs):
    edit, info = _edit(lm, state, reqs)
    return edit, info, {**state, "round": state["round"] + 1}


def _save(state, path):
    path.write_text(json.dumps(state))


def _load(fresh, path):
    saved = json.loads(path.read_text())
    if (saved["model"], saved["step"]) != (fresh["model"], fresh["step"]):
        raise CheckpointError(f"{path}: state of another model or configuration")
    return {**fresh, "round": saved["round"]}


# `jaxedit eval --method counter` finds this module's METHOD through the registry (tests only).
METHOD = COUNTER = EditMethod(
    "counter",
    CountHparams,
    _prepare,
    _edit,
    default_hparams=CountHparams,
    step_fn=_step,
    save_state_fn=_save,
    load_state_fn=_load,
)


class Crash(Exception):
    pass


def never(*args):
    raise Crash


def spying(method: EditMethod, seen: list, crash_at: int | None = None) -> EditMethod:
    """`method` recording (state, model, case ids) of every step / compute; raises at call
    `crash_at` (counted over both)."""

    def wrap(fn):
        def inner(lm, state, reqs):
            seen.append((state, lm, [r.case_id for r in reqs]))
            if len(seen) == crash_at:
                raise Crash
            return fn(lm, state, reqs)

        return inner

    step = None if method.step_fn is None else wrap(method.step_fn)
    return dataclasses.replace(method, compute_fn=wrap(method.compute_fn), step_fn=step)


def evaluate(lm, reqs, method=COUNTER, state=None, **kw):
    kw.setdefault("general", False)
    if state is None:
        state = method.prepare(lm, method.hparams())
    return runner.evaluate(lm, reqs, method, state, mode="sequential", **kw)


def without_seconds(obj):
    """`obj` with every timing removed (they differ between runs)."""
    if isinstance(obj, dict):
        return {
            k: without_seconds(v)
            for k, v in obj.items()
            if "seconds" not in str(k) and k != "timing"
        }
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- protocol


def test_step_defaults_to_compute_and_state_io_to_no_ops(tiny, tmp_path):
    none = methods.get("none")
    edit, info, state = none.step(tiny, "s", REQS[:1])
    assert isinstance(edit, WeightEdit) and not edit.deltas and state == "s"
    none.save_state("s", tmp_path / "state")
    assert not (tmp_path / "state").exists() and none.load_state("fresh", tmp_path) == "fresh"
    with pytest.raises(InputError, match="no edit requests"):
        COUNTER.step(tiny, {}, [])


def test_counter_state_round_trips_and_refuses_another_model(tiny, tmp_path):
    state = COUNTER.prepare(tiny, CountHparams())
    _, _, s1 = COUNTER.step(tiny, state, REQS[:1])
    assert s1["round"] == 1 and state["round"] == 0
    COUNTER.save_state(s1, tmp_path / "state")
    assert COUNTER.load_state(state, tmp_path / "state") == s1
    other = COUNTER.prepare(dataclasses.replace(tiny, name="other"), CountHparams())
    with pytest.raises(CheckpointError, match="another model"):
        COUNTER.load_state(other, tmp_path / "state")


def test_consolidated_keeps_small_factors_and_sums_large_ones():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    a = WeightDelta("mlp_out", 1, f(6, 1), f(4, 1))
    b = WeightDelta("mlp_out", 1, f(6, 1), f(4, 1))
    c = WeightDelta("mlp_out", 0, dense=f(6, 4))
    e = WeightEdit((a, c, b), {"method": "x"})
    one = e.consolidated()
    assert [(d.site, d.layer) for d in one.deltas] == [("mlp_out", 0), ("mlp_out", 1)]
    assert one.deltas[1].left.shape == (6, 2)  # rank 2: (6 + 4)·2 < 6·4, factors kept
    np.testing.assert_allclose(one.deltas[1].matrix(), a.matrix() + b.matrix(), atol=1e-6)
    big = WeightEdit((a, b, a)).consolidated()  # (6 + 4)·3 > 6·4: one dense sum
    assert big.deltas[0].dense is not None
    np.testing.assert_allclose(big.deltas[0].matrix(), 2 * a.matrix() + b.matrix(), atol=1e-6)
    assert one.meta == {"method": "x"} and not WeightEdit(()).consolidated().deltas


# ----------------------------------------------------------------------------- rounds


def test_rounds_of_batch_size_through_step(tiny):
    """Rounds of 2 requests (a group is never split), each `step` on the model every earlier
    round edited; every case measured on the final model."""
    grouped = [
        dataclasses.replace(r, extra={"group": g}) for r, g in zip(REQS, "abbcd", strict=True)
    ]
    seen: list = []
    res = evaluate(tiny, grouped, spying(COUNTER, seen), batch_size=2)
    ids = [r.case_id for r in grouped]
    assert [c for _, _, c in seen] == [ids[:1], ids[1:3], ids[3:5]]  # [a] [b b] [c d]
    assert [s["round"] for s, _, _ in seen] == [0, 1, 2]  # the state carried between rounds
    assert seen[0][1] is tiny and seen[1][1] is not tiny
    # the model the third round saw: layer 0 × 1.5 × 1.25
    w0 = np.asarray(get_weight(tiny.params, "mlp_out", 0))
    np.testing.assert_allclose(get_weight(seen[2][1].params, "mlp_out", 0), 1.875 * w0, rtol=1e-5)
    final = apply(seen[2][1], _edit(seen[2][1], seen[2][0], [])[0])
    pre, post = measure(tiny, grouped), measure(final, grouped)
    for case, r, p, q in zip(res["cases"], grouped, pre, post, strict=True):
        assert case["metrics"] == pytest.approx(case_metrics(r, q, p), abs=1e-6)
    assert [c["edit"]["round"] for c in res["cases"]] == [0, 1, 1, 2, 2]  # its round's info
    assert res["rounds"] == 3 and len(res["seconds"]["per_round"]) == 3
    assert res["batch_size"] == 2 and "curve" in res and res["curve"] == []


@pytest.mark.parametrize("batch_size, every, points", [(2, 1, [2, 4, 5]), (None, 2, [2, 4, 5])])
def test_curve_points(tiny, batch_size, every, points):
    """A point every `every` rounds (counted in rounds, a round = one case without
    --batch-size) and after the last: all cases so far on the model so far, plus general."""
    res = evaluate(tiny, REQS, batch_size=batch_size, every=every, general=SMALL)
    curve = res["curve"]
    assert [p["edits"] for p in curve] == points
    assert [p["rounds"] for p in curve] == ([1, 2, 3] if batch_size else [2, 4, 5])
    assert curve[-1]["general"] == res["general"]["edited"]
    assert curve[-1]["metrics"]["efficacy_score"]["n"] == 5
    assert curve[0]["metrics"]["efficacy_score"]["n"] == 2
    assert curve[0]["general"] != res["general"]["unedited"]  # measured on the edited model
    # the first point: the two first cases after one round of 2 (or two rounds of 1)
    m = apply(tiny, COUNTER.compute(tiny, {"step": 0.5, "round": 0}, REQS[:2])[0])
    if batch_size is None:
        m = apply(m, COUNTER.compute(m, {"step": 0.5, "round": 1}, REQS[1:2])[0])
    pre, post = measure(tiny, REQS[:2]), measure(m, REQS[:2])
    per_case = [case_metrics(r, q, p) for r, q, p in zip(REQS[:2], post, pre, strict=True)]
    want = np.mean([c["efficacy_magnitude"] for c in per_case])
    assert curve[0]["metrics"]["efficacy_magnitude"]["mean"] == pytest.approx(want, abs=1e-6)
    assert all(p["seconds"] >= 0 for p in curve)
    assert general.measure_general(m, SMALL) == pytest.approx(curve[0]["general"])


def test_general_block_edited_vs_unedited(tiny, tmp_path):
    res = evaluate(tiny, REQS[:3], general=SMALL, out=tmp_path)
    g = res["general"]
    assert g["model"] == "final"
    assert set(g["edited"]) == {"wikitext_ppl", "known_facts_acc", "fluency"}
    assert g["unedited"] == pytest.approx(general.measure_general(tiny, SMALL))
    assert g["edited"]["wikitext_ppl"] != g["unedited"]["wikitext_ppl"]
    assert res["general_setup"]["n_known_facts"] == 2
    md = (tmp_path / "results.md").read_text()
    assert "| general (final) | unedited | edited | ratio |" in md
    none = runner.evaluate(tiny, REQS[:2], methods.get("none"), None, general=SMALL)
    assert none["general"]["edited"] == none["general"]["unedited"]
    batch = runner.evaluate(
        tiny,
        REQS[:3],
        COUNTER,
        COUNTER.prepare(tiny, CountHparams()),
        mode="batch",
        batch_size=2,
        general=SMALL,
    )
    assert batch["general"]["model"] == "after the last edit"
    last = apply(tiny, COUNTER.compute(tiny, COUNTER.prepare(tiny, CountHparams()), REQS[2:3])[0])
    assert batch["general"]["edited"] == pytest.approx(general.measure_general(last, SMALL))


def test_independent_resume_keeps_the_general_block(tiny, tmp_path):
    """A finished independent run resumed reads the last edited model's block from the log;
    without that line (a crash before it) the last case is edited again to measure it."""
    kw = dict(general=SMALL, out=tmp_path)
    state = COUNTER.prepare(tiny, CountHparams())
    whole = runner.evaluate(tiny, REQS[:3], COUNTER, state, **kw)
    seen: list = []
    again = runner.evaluate(tiny, REQS[:3], spying(COUNTER, seen), state, resume=True, **kw)
    assert seen == [] and without_seconds(again) == without_seconds(whole)
    rows = (tmp_path / "cases.jsonl").read_text().splitlines()
    last = {"general": whole["general"]["edited"], "after": str(REQS[2].case_id)}
    assert json.loads(rows[-1]) == last
    (tmp_path / "cases.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    third = runner.evaluate(tiny, REQS[:3], spying(COUNTER, seen), state, resume=True, **kw)
    assert [ids for _, _, ids in seen] == [[REQS[2].case_id]]
    assert third["general"]["edited"] == pytest.approx(whole["general"]["edited"])


def test_batch_mode_is_stateless_compute(tiny):
    """Batch mode never calls `step` (each chunk from the unedited model, the fresh state)."""
    seen: list = []
    boom = dataclasses.replace(COUNTER, step_fn=never)
    res = runner.evaluate(
        tiny,
        REQS,
        spying(boom, seen),
        {"model": "tiny", "step": 0.5, "round": 0},
        mode="batch",
        batch_size=2,
        general=False,
    )
    assert len(seen) == 3 and all(s["round"] == 0 and m is tiny for s, m, _ in seen)
    assert len(res["cases"]) == 5 and "curve" not in res


def test_contradicting_cases_are_skipped_and_max_cases_caps(tiny):
    """One (prompt, subject) with two targets cannot share a solve or a lifelong model: the
    later case is skipped and counted; --max-cases caps what remains."""
    clash = dataclasses.replace(REQS[0], target_new=REQS[0].target_new + "x", case_id="clash")
    reqs = [*REQS[:2], clash, *REQS[2:]]
    seen: list = []
    for mode in ("batch", "sequential"):
        res = runner.evaluate(
            tiny,
            reqs,
            spying(COUNTER, seen),
            COUNTER.prepare(tiny, COUNTER.hparams()),
            mode=mode,
            batch_size=10,
            general=False,
            max_cases=4,
        )
        assert res["n_conflicts"] == 1
        assert [c["case_id"] for c in res["cases"]] == [r.case_id for r in REQS[:4]]
    with pytest.raises(InputError, match="max-cases"):
        evaluate(tiny, REQS, max_cases=0)


# ----------------------------------------------------------------------------- resume


def test_checkpoint_after_every_round(tiny, tmp_path):
    evaluate(tiny, REQS, batch_size=2, out=tmp_path)
    root = tmp_path / "lifelong"
    p = json.loads((root / "progress.json").read_text())
    assert p["rounds_done"] == 3 and p["checkpoint"] == "round-000003"
    assert p["round_case_ids"] == [[r.case_id for r in REQS[i : i + 2]] for i in (0, 2, 4)]
    assert sorted(x.name for x in root.iterdir()) == ["progress.json", "round-000003"]
    assert json.loads((root / "round-000003" / "state").read_text())["round"] == 3
    (delta,) = load_edit(root / "round-000003" / "edit.safetensors").deltas  # consolidated
    w0 = np.asarray(get_weight(tiny.params, "mlp_out", 0))
    np.testing.assert_allclose(delta.dense, (1.5 * 1.25 * (1 + 0.5 / 3) - 1) * w0, rtol=1e-5)


@pytest.mark.parametrize("crash_at", [2, 3])
def test_resume_equals_uninterrupted(tiny, tmp_path, crash_at):
    kw = dict(batch_size=2, every=1, general=SMALL, info={"data": "facts"})
    whole = evaluate(tiny, REQS, out=tmp_path / "a", **kw)
    seen: list = []
    with pytest.raises(Crash):
        evaluate(tiny, REQS, spying(COUNTER, seen, crash_at), out=tmp_path / "b", **kw)
    seen.clear()
    res = evaluate(tiny, REQS, spying(COUNTER, seen), out=tmp_path / "b", resume=True, **kw)
    # only the rounds after the last checkpoint ran, from the restored state
    assert [s["round"] for s, _, _ in seen] == list(range(crash_at - 1, 3))
    assert without_seconds(res) == without_seconds(whole)
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert without_seconds(saved) == without_seconds(whole)
    rows = [json.loads(x) for x in (tmp_path / "b" / "cases.jsonl").read_text().splitlines()]
    assert [r["curve"]["rounds"] for r in rows if "curve" in r] == [1, 2, 3]  # no duplicate
    assert [r["case_id"] for r in rows if "case_id" in r] == [r.case_id for r in REQS]
    seen.clear()  # a finished run resumed: no round again, the same results
    again = evaluate(tiny, REQS, spying(COUNTER, seen), out=tmp_path / "b", resume=True, **kw)
    assert seen == [] and without_seconds(again) == without_seconds(whole)


def test_resume_refuses_other_rounds(tiny, tmp_path):
    evaluate(tiny, REQS, batch_size=2, out=tmp_path)
    with pytest.raises(InputError, match=r"different run \(\['batch_size'\]\)"):
        evaluate(tiny, REQS, batch_size=3, out=tmp_path, resume=True)
    shuffled = [REQS[1], REQS[0], *REQS[2:]]
    with pytest.raises(InputError, match="not this run's first rounds"):
        evaluate(tiny, shuffled, batch_size=2, out=tmp_path, resume=True)
    with pytest.raises(InputError, match="needs the output directory"):
        evaluate(tiny, REQS, batch_size=2, resume=True)


def test_rome_resume_equals_uninterrupted(tiny, tmp_path):
    """A real method (ROME, low-rank factors accumulating) interrupted and resumed."""
    hp = rome.ROMEHparams(
        layer=1, v_num_grad_steps=4, mom2_adjustment=False, context_templates=("{}", "A. {}")
    )
    m, state = methods.get("rome"), rome.make_state(tiny, hp, None)
    whole = evaluate(tiny, REQS[:4], m, state, batch_size=2, out=tmp_path / "a")
    seen: list = []
    with pytest.raises(Crash):
        evaluate(tiny, REQS[:4], spying(m, seen, 2), state, batch_size=2, out=tmp_path / "b")
    res = evaluate(tiny, REQS[:4], m, state, batch_size=2, out=tmp_path / "b", resume=True)
    assert without_seconds(res) == without_seconds(whole)
    moved = [
        c["metrics"]["efficacy_magnitude"] != c["baseline"]["efficacy_magnitude"]
        for c in res["cases"]
    ]
    assert all(moved)
    (d,) = load_edit(tmp_path / "b" / "lifelong" / "round-000002" / "edit.safetensors").deltas
    assert d.left.shape[1] == 4  # four rank-one edits kept as factors


def test_alphaedit_resume_equals_uninterrupted(smollm, tmp_path):
    """The lifelong method the protocol is for: AlphaEdit's state (accumulated K_pK_pᵀ, round
    count) saved after every round, restored on --resume."""
    cfg = tiny_llama_config(smollm.config.vocab_size)
    lm = LanguageModel("tiny3", cfg, init_params(cfg, 0), smollm.tokenizer)
    rng = np.random.default_rng(0)
    C = {}
    for layer in range(3):  # a spectrum 1e-4 .. 1: some directions under the threshold
        Q, _ = np.linalg.qr(rng.standard_normal((48, 48)))
        C[layer] = (Q * np.logspace(-4, 0, 48)) @ Q.T
    hp = alphaedit.AlphaEditHparams(
        layers=(1, 2), v_num_grad_steps=4, context_templates=("{}", "A. {}"), z_lanes=2,
        nullspace_threshold=1e-2, L2=1.0, cache_z=False,
    )  # fmt: skip
    m, state = methods.get("alphaedit"), alphaedit.make_state(lm, memit.make_state(lm, hp, C))
    reqs = REQS[:4]
    whole = evaluate(lm, reqs, m, state, batch_size=2, every=1, out=tmp_path / "a")
    seen: list = []
    with pytest.raises(Crash):
        evaluate(lm, reqs, spying(m, seen, 2), state, batch_size=2, out=tmp_path / "b", every=1)
    res = evaluate(lm, reqs, m, state, batch_size=2, every=1, out=tmp_path / "b", resume=True)
    assert without_seconds(res) == without_seconds(whole)
    assert [c["edit"]["round"] for c in res["cases"]] == [1, 1, 2, 2]
    assert any(c["metrics"]["efficacy_magnitude"] != c["baseline"]["efficacy_magnitude"]
               for c in res["cases"])  # fmt: skip


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_tiny(tiny, monkeypatch):
    monkeypatch.setattr(eval_cmd, "load_model", lambda args: tiny)
    monkeypatch.setitem(methods.REGISTRY, "counter", __name__)
    return tiny


def cf(data_dir):
    return os.path.join(data_dir, "counterfact", "counterfact-edit.json")


def test_cli_sequential_rounds_curve_and_resume(cli_tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "eval",
        "--data",
        cf(data_dir),
        "--n",
        "5",
        "--method",
        "counter",
        "--no-progress",
        "--mode",
        "sequential",
        "--batch-size",
        "2",
        "--every",
        "2",
        "--out",
        str(out),
        "--no-general",
        "--json",
    ]
    assert cli.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rounds"] == 3 and [p["edits"] for p in res["curve"]] == [4, 5]
    assert res["general"] is None and res["general_setup"] is None
    assert (out / "lifelong" / "progress.json").exists()
    assert cli.main([*args, "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert without_seconds(again) == without_seconds(res)


def test_cli_general_flags(cli_tiny, data_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: seen.update(kw) or {"n": 0})
    base = ["eval", "--data", cf(data_dir), "--n", "3", "--out", str(tmp_path / "o"), "--json"]
    base += ["--cache-dir", str(tmp_path / "cache")]
    assert cli.main(base) == 0  # by default: candidates, for the runner to filter
    suite = seen["general"]
    assert suite.known_n == general.N_KNOWN_FACTS and len(suite.facts) > 1000
    assert "not edited" in suite.facts_source and suite.cache_dir == str(tmp_path / "cache")
    firsts = {r.rewrite_prompt for r in datasets.load(cf(data_dir), n=3).requests}
    assert not firsts & {p for p, _ in suite.facts}
    kept = [suite.facts[5]]
    monkeypatch.setattr(general, "known_to", lambda lm, cands, n: (kept, 7))
    got = general.with_known_facts(suite, cli_tiny)
    assert got.facts == tuple(kept) and got.known_n is None
    assert got.facts_source.endswith("1 known to the unedited model of 7 scored")
    assert cli.main([*base, "--known-facts-unfiltered"]) == 0
    suite = seen["general"]
    assert suite.ppl_name == "wikitext_ppl" and suite.max_tokens == general.PPL_TOKENS
    assert len(suite.facts) == general.N_KNOWN_FACTS and "not edited" in suite.facts_source
    assert suite.known_n is None
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some other text to measure the perplexity of, long enough.")
    known = os.path.join(data_dir, "counterfact", "known_1000.json")
    flags = [
        "--ppl-corpus",
        str(corpus),
        "--ppl-tokens",
        "100",
        "--known-facts",
        known,
        "--n-known-facts",
        "30",
        "--known-facts-unfiltered",
    ]
    assert cli.main([*base, *flags]) == 0
    suite = seen["general"]
    assert (suite.ppl_name, suite.text_source, suite.max_tokens) == ("ppl", str(corpus), 100)
    assert len(suite.facts) == 30 and suite.facts_source == known
    assert cli.main([*base, "--no-general"]) == 0 and seen["general"] is False
    assert cli.main([*base, "--mode", "sequential", "--batch-size", "4", "--every", "3"]) == 0
    assert (seen["mode"], seen["batch_size"], seen["every"]) == ("sequential", 4, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-general", "--known-facts", "k.json"], "--no-general skips"),
        (["--n-known-facts", "0"], "--n-known-facts must be positive"),
        (["--every", "2"], "--every needs --mode sequential"),
        (["--batch-size", "2"], "--batch-size needs --mode sequential"),
        (["--mode", "batch", "--resume"], "independent and sequential modes only"),
    ],
)
def test_cli_errors(cli_tiny, data_dir, capsys, extra, message):
    assert cli.main(["eval", "--data", cf(data_dir), "--n", "2", "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
