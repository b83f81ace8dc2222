"""Progress on stderr (`jaxedit.progress`): when bars show, the estimate after the first item,
the v* / z steps reported between compiled calls with the same result, bars from commands."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import tiny_llama_config

import jaxedit as je
from jaxedit import progress
from jaxedit.cli.main import main
from jaxedit.methods import rome
from jaxedit.methods.common import target_opt
from jaxedit.models.transformer import init_params
from jaxedit.requests import EditRequest

FIXED = ("{}", "The following is true. {}")
REQUESTS = (
    EditRequest(
        prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"
    ),
    EditRequest(prompt="The language of {} is", subject="D. Darrieux", target_new="Rio de Janeiro"),
    EditRequest(prompt="{} was written by", subject="Hamlet", target_new="Charles Dickens"),
)


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = tiny_llama_config(smollm.config.vocab_size)
    return je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)


def test_bars_on_a_terminal_only_unless_told(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress.wanted(stream=Stream(tty=True))
    assert not progress.wanted(stream=Stream(tty=False))  # a pipe or a log: no bar
    assert not progress.wanted(no_progress=True, stream=Stream(tty=True))
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.wanted(stream=Stream(tty=False))
    assert not progress.wanted(no_progress=True, stream=Stream(tty=False))
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.wanted(stream=Stream(tty=True))


def test_scope_sets_what_deep_loops_show():
    assert not progress.shown()  # library calls stay quiet
    with progress.scope(True):
        assert progress.shown()
        with progress.scope(False):
            assert not progress.shown()
        assert progress.shown()
    assert not progress.shown()


def test_estimate_after_the_first_item(capsys):
    with progress.bar(40, "tracing", "fact", enabled=True, estimate=True) as b:
        b.update(1)
        err = capsys.readouterr().err
        assert "the first fact took" in err and "for 40 at that pace" in err
        b.update(1)  # said once
        assert "the first fact took" not in capsys.readouterr().err
    capsys.readouterr()
    with progress.bar(40, "tracing", "fact", enabled=False, estimate=True) as b:
        b.update(1)
    assert capsys.readouterr().err == ""


def test_durations_read_naturally():
    assert progress.duration(0.25) == "250 ms"
    assert progress.duration(4.2) == "4.2 s"
    assert progress.duration(42) == "42 s"
    assert progress.duration(600) == "10.0 min"
    assert progress.duration(3 * 3600) == "3.0 h"


@pytest.mark.parametrize("lanes", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_target_steps_reported_between_calls_give_the_same_values(tiny, lanes, capsys):
    """With a bar the loop runs one step per compiled call, its state carried along: δ, steps
    and losses are exactly those of one call to the end (the same compiled loop body)."""
    settings = target_opt.TargetSettings(steps=6, lr=0.5)
    args = (tiny, "mlp_out", 1, REQUESTS, FIXED, settings)
    quiet = target_opt.target_values(*args, lanes=lanes, progress=False)
    assert capsys.readouterr().err == ""
    shown = target_opt.target_values(*args, lanes=lanes, progress=True)
    err = capsys.readouterr().err
    assert "target values L1" in err and "step" in err
    for a, b in zip(quiet, shown, strict=True):
        np.testing.assert_array_equal(a.delta, b.delta)
        assert (a.steps, a.loss, a.nll, a.target_prob) == (b.steps, b.loss, b.nll, b.target_prob)
    assert {tv.steps for tv in shown} == {6}


def test_rome_edit_shows_its_steps_under_the_command_line_scope(tiny, capsys):
    hp = rome.ROMEHparams(layer=1, v_num_grad_steps=4, context_templates=FIXED)
    state = rome.make_state(tiny, hp, np.eye(tiny.config.d_ff))
    m = je.methods.get("rome")
    m.compute(tiny, state, [REQUESTS[0]])
    assert capsys.readouterr().err == ""  # from Python: quiet
    with progress.scope(True):
        m.compute(tiny, state, [REQUESTS[0]])
    assert "target values L1" in capsys.readouterr().err


def test_demo_names_its_steps_on_stderr(smollm, capsys, monkeypatch):
    monkeypatch.setattr("jaxedit.cli.commands.demo.load_model", lambda args: smollm)
    monkeypatch.setenv(progress.ENV, "1")  # stderr is captured, not a terminal
    assert main(["demo", "--quick", "--json"]) == 0
    cap = capsys.readouterr()
    assert "demo 1/4 predictions" in cap.err
    assert json.loads(cap.out)["predictions"]  # stdout holds the JSON alone
    assert main(["demo", "--quick", "--json", "--no-progress"]) == 0
    assert "demo" not in capsys.readouterr().err


def test_trace_cells_and_the_data_set_estimate(capsys):
    """One trace shows its cells (under the command line's scope); a data-set trace shows one
    bar over the facts, no cell bars, and an estimate after the first fact."""
    from pathlib import Path

    from jaxedit.locate import trace

    gpt2 = je.load(str(Path(__file__).parent / "goldens" / "gpt2"))
    kw = dict(kinds=("hidden",), samples=2)
    trace.trace(gpt2, "hello world foo", "world", **kw)
    assert capsys.readouterr().err == ""  # from Python: quiet
    with progress.scope(True):
        trace.trace(gpt2, "hello world foo", "world", **kw)
    assert "trace cells" in capsys.readouterr().err
    facts = [{"prompt": p, "subject": s} for p, s in [("hello world foo", "world")] * 3]
    with progress.scope(True):
        trace.trace_dataset(gpt2, facts, progress=True, **kw)
    err = capsys.readouterr().err
    assert "tracing: the first fact took" in err and "for 3 at that pace" in err
    assert "trace cells" not in err


def test_statistics_sampling_shows_its_steps_with_the_same_samples(capsys):
    """The `self` corpus is sampled token by token: a bar counts the steps (a host callback
    that is in the compiled program either way, so the samples do not depend on it)."""
    from pathlib import Path

    from jaxedit.stats.corpora import load_corpus

    gpt2 = je.load(str(Path(__file__).parent / "goldens" / "gpt2"))
    kw = dict(n_tokens=40, max_len=16, seed=1)
    quiet = load_corpus(gpt2, "self", progress=False, **kw)
    assert capsys.readouterr().err == ""
    shown = load_corpus(gpt2, "self", progress=True, **kw)
    err = capsys.readouterr().err
    assert "sampling 3 x 15 tokens" in err and "15/15" in err
    assert shown.docs == quiet.docs


def test_eval_cases_show_a_bar_and_an_estimate(smollm, data_dir, tmp_path, capsys, monkeypatch):
    """`jaxedit eval` counts its cases on a bar and, after the first, estimates the whole run;
    `--no-progress` (or stderr not a terminal) shows neither."""
    import os

    from conftest import tiny_llama_config

    from jaxedit import methods
    from jaxedit.cli.commands import eval as eval_cmd

    cfg = tiny_llama_config(smollm.config.vocab_size)
    tiny = je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)
    monkeypatch.setattr(eval_cmd, "load_model", lambda args: tiny)
    monkeypatch.setitem(methods.REGISTRY, "counter", "test_lifelong")
    monkeypatch.setenv(progress.ENV, "1")  # stderr is captured, not a terminal
    data = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    argv = ["eval", "--method", "counter", "--data", data, "--n", "3", "--no-general", "--json"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "counter independent: the first case took" in err and "for 3 at that pace" in err
    assert "3/3" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "the first case took" not in capsys.readouterr().err


@pytest.mark.slow
def test_mend_training_shows_its_steps(smollm, tmp_path, capsys, monkeypatch, data_dir):
    """`jaxedit mend-train` shows a bar over its steps (a tiny random Llama with the real
    tokenizer)."""
    import os

    from conftest import tiny_llama_config

    cfg = tiny_llama_config(smollm.config.vocab_size)
    tiny = je.LanguageModel("tiny", cfg, init_params(cfg, 0), smollm.tokenizer)
    monkeypatch.setattr("jaxedit.cli.commands.mend_train.load_model", lambda args: tiny)
    hp = tmp_path / "mend.json"
    hp.write_text(json.dumps({"weights": [["mlp_out", 1]], "rank": 4, "batch": 2, "max_len": 24}))
    data = os.path.join(data_dir, "counterfact", "counterfact-train.json")
    monkeypatch.setenv(progress.ENV, "1")
    argv = ["mend-train", "--hparams", str(hp), "--data", data, "--limit", "12", "--steps", "2",
            "--val-every", "1", "--val-size", "4", "--json"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    cap = capsys.readouterr()
    assert "mend-train" in cap.err and "2/2" in cap.err
    assert json.loads(cap.out)["steps"] == 2


def test_a_terminal_of_width_zero_still_gets_a_bar(capsys, monkeypatch):
    """A pseudo-terminal that reports 0 columns (`script`, some CI runners): tqdm draws nothing
    at width 0, so the bar takes 80 columns there."""
    monkeypatch.setattr(progress, "terminal_columns", lambda stream: 0)
    with progress.scope(True), progress.bar(3, "zero-width", "it") as b:
        assert b.bar.ncols == 80 and b.bar.nrows == 20
        b.update(3)
    assert "zero-width: 100%|" in capsys.readouterr().err
    monkeypatch.setattr(progress, "terminal_columns", lambda stream: 120)
    with progress.scope(True), progress.bar(3, "sized", "it") as b:
        assert b.bar.dynamic_ncols  # follows the terminal's width
