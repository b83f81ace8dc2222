"""Bad input ends in one line on stderr (exit status 2), no traceback, no NaN and nothing
written: prompts beyond the model's positions, text that is not UTF-8, absurd sizes, existing
output directories; and `--resume` with a larger `--n` extends a run instead of refusing it.

The command-line cases run on the tiny GPT-2 golden (learned positions, 64 of them: a longer
prompt used to give NaN probabilities)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_lifelong import COUNTER, REQS, CountHparams, spying, without_seconds

import jaxedit as je
from jaxedit import cli, methods
from jaxedit.cli.commands import eval as eval_cmd
from jaxedit.errors import InputError
from jaxedit.eval import runner
from jaxedit.eval.measure import measure
from jaxedit.methods import rome

GPT2 = str(Path(__file__).parent / "goldens" / "gpt2")
LONG = "The Eiffel Tower is located in the city of " * 12  # > 64 tokens
NOT_UTF8 = "The Eiffel Tower \udcff is in"  # byte 0xff from argv (surrogateescape)


@pytest.fixture(autouse=True)
def quiet(monkeypatch, tmp_path):
    """No bars; each test runs in an empty working directory (`refused` checks it stays so)."""
    monkeypatch.setenv("JAXEDIT_PROGRESS", "0")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture(scope="module")
def gpt2():
    return je.load(GPT2)


def refused(capsys, argv: list[str], message: str, cwd: Path | None = None) -> str:
    """`jaxedit ARGV` exits 2 with exactly one line, naming `message`, and no NaN."""
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (rc, cap.err)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert message in lines[0], lines[0]
    assert "Traceback" not in cap.err and "nan" not in cap.out.lower()
    for d in {Path.cwd(), *([cwd] if cwd is not None else [])}:
        assert list(d.iterdir()) == [], list(d.iterdir())  # nothing written
    return lines[0]


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_prompt_beyond_the_positions(command, capsys):
    line = refused(capsys, [command, "--model", GPT2, "--prompt", LONG], "more than the model's")
    assert "64 positions" in line


def test_trace_prompt_beyond_the_positions_writes_nothing(capsys, tmp_path):
    out = tmp_path / "tr"
    argv = ["trace", "--model", GPT2, "--prompt", LONG, "--subject", "The Eiffel Tower"]
    refused(capsys, [*argv, "--out", str(out)], "64 positions")
    assert not out.exists()


EDIT = ["edit", "--model", GPT2, "--subject", "The Eiffel Tower", "--target", "Rome"]


def test_edit_prompt_beyond_the_positions_writes_nothing(capsys, tmp_path):
    out, e = tmp_path / "edited", tmp_path / "e.safetensors"
    argv = [*EDIT, "--prompt", "{} " + LONG, "--save", str(out), "--save-edit", str(e)]
    refused(capsys, argv, "64 positions")
    assert not out.exists() and not e.exists()


@pytest.mark.parametrize("field", ["--prompt", "--target"])
def test_edit_text_not_utf8(field, capsys, tmp_path):
    good = {"--prompt": "{} is located in the city of", "--target": "Rome"}
    argv = [*EDIT, "--prompt", good["--prompt"], "--save", str(tmp_path / "o")]
    argv = [a if i == 0 or argv[i - 1] != field else NOT_UTF8 for i, a in enumerate(argv)]
    refused(capsys, argv, "not valid UTF-8 (byte 0xff")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prompt", ["{} is in {}", "{} is in {city}", "{0} {}", "{} is in {"])
def test_edit_prompt_that_is_not_a_template(prompt, capsys, tmp_path):
    """A prompt with a second "{}" or another brace used to end in a formatting traceback."""
    argv = [*EDIT, "--prompt", prompt, "--save", str(tmp_path / "o")]
    refused(capsys, argv, "needs exactly one {}")
    assert not (tmp_path / "o").exists()


def test_edit_requests_file_not_utf8(capsys, tmp_path):
    bad = tmp_path / "edits.jsonl"
    rec = '{"prompt": "{} is in", "subject": "Zürich", "target_new": "Rome"}\n'
    bad.write_bytes(rec.encode("latin-1"))
    argv = ["edit", "--model", GPT2, "--requests", str(bad), "--save", str(tmp_path / "o")]
    line = refused(capsys, argv, "not UTF-8 text")
    assert str(bad) in line and not (tmp_path / "o").exists()


def test_stats_corpus_not_utf8(capsys, tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes("Zürich is a city.\n".encode("latin-1"))
    cache = tmp_path / "cache"
    argv = ["stats", "--model", GPT2, "--layer", "0", "--corpus", str(bad), "--cache", str(cache)]
    line = refused(capsys, argv, "not UTF-8 text (byte 0xfc at line 1")
    assert str(bad) in line and not cache.exists()


def test_learned_positions_never_give_nan(gpt2):
    """The library refuses too: scoring and a ROME edit of a prompt (with its target) longer
    than the positions, where the forward would read past the position table."""
    req = je.EditRequest("{} " + "is located in the city of " * 10, "The Eiffel Tower", "Rome")
    with pytest.raises(InputError, match="64 positions"):
        measure(gpt2, [req])
    hp = rome.ROMEHparams(layer=0, v_num_grad_steps=2, context_templates=("{}",))
    state = rome.make_state(gpt2, hp, np.eye(gpt2.config.d_ff))
    with pytest.raises(InputError, match="64 positions") as e:
        je.methods.get("rome").compute(gpt2, state, [req])
    assert "ridge" not in str(e.value)


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_prompt_not_utf8(command, capsys):
    line = refused(capsys, [command, "--model", GPT2, "--prompt", NOT_UTF8], "not valid UTF-8")
    assert "byte 0xff at character 17" in line


def test_non_utf8_argv_in_a_real_process(tmp_path):
    """Bytes that are not UTF-8 on the real command line (not a Python string): one line."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "jaxedit", "predict", "--model", GPT2.encode(), b"--prompt"]
    env = {**os.environ, "JAXEDIT_PROGRESS": "0"}
    r = subprocess.run([*argv, b"The Eiffel Tower \xff is in"], capture_output=True, env=env)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "not valid UTF-8 (byte 0xff at character 17)" in err[0]


def test_trace_subject_not_utf8(capsys, tmp_path):
    argv = ["trace", "--model", GPT2, "--prompt", NOT_UTF8, "--subject", "\udcff"]
    refused(capsys, [*argv, "--out", str(tmp_path / "o")], "not valid UTF-8")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- data files


def latin1_file(tmp_path: Path) -> Path:
    p = tmp_path / "facts.json"
    rec = {"prompt": "{} is in", "subject": "Zürich", "attribute": "Switzerland"}
    p.write_bytes(json.dumps([rec], ensure_ascii=False).encode("latin-1"))  # ü = 0xfc
    return p


@pytest.mark.parametrize("command", ["trace", "eval", "mend-train"])
def test_data_file_not_utf8(command, capsys, tmp_path):
    bad = latin1_file(tmp_path)
    out = tmp_path / "out"
    argv = [command, "--model", GPT2, "--data", str(bad), "--out", str(out)]
    line = refused(capsys, argv, "not UTF-8 text (byte 0xfc at line 1")
    assert str(bad) in line and not out.exists()


def test_text_files_read_as_utf8(tmp_path):
    from jaxedit.io.text import read_text

    (tmp_path / "bom.json").write_bytes("\ufeff[1]".encode())
    assert read_text(tmp_path / "bom.json") == "[1]"  # a byte-order mark is not text
    (tmp_path / "bad.txt").write_bytes(b"ok\nstill ok\nbad \xff here")
    with pytest.raises(InputError, match=r"corpus .*bad.txt: not UTF-8 text \(byte 0xff at line 3"):
        read_text(tmp_path / "bad.txt", "corpus")


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "hi", "--max-new-tokens", "100000000"], "64 positions"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "must be positive"),
        (["predict", "--prompt", "hi", "--top-k", "100000000"], "--top-k must be 1..256"),
        (["predict", "--prompt", "hi", "--top-k", "0"], "--top-k must be 1..256"),
        (["trace", "--prompt", "a b", "--subject", "a", "--samples", "100000000"], "--samples"),
        (["trace", "--data", "x.json", "--n", "0"], "--n must be >= 1"),
        (["demo", "--samples", "100000000"], "--samples must be 1..1000"),
        (["demo", "--templates", "100000"], "--templates must be 0..50"),
        (["demo", "--n-facts", "0"], "--n-facts must be 1.."),
        (["stats", "--layer", "0", "--batch-tokens", "100000000000"], "--batch-tokens"),
        (["stats", "--layer", "0", "--tokens", "0"], "--tokens must be 1.."),
        (["stats", "--layer", "0", "--max-len", "1000"], "--max-len must be 1..64"),
        (["edit", *EDIT[3:], "--prompt", "{} is", "--top-k", "100000000"], "--top-k must be 1.."),
        (["edit", "--requests", "x.json", "--n", "0"], "--n must be positive"),
        (["eval", "--data", "x.json", "--n", "0"], "--n must be positive"),
        (["eval", "--data", "CF", "--n", "2", "--batch-size", "0"], "--batch-size must be"),
        (["eval", "--data", "CF", "--n", "2", "--every", "0"], "--every must be"),
        (["demo", "--top-k", "100000000"], "--top-k must be 1..256"),
        (["mend-train", "--data", "CF", "--out", "o", "--steps", "0"], "--steps must be positive"),
        (["mend-train", "--data", "CF", "--out", "o", "--batch", "0"], "--batch must be positive"),
    ],
)
def test_absurd_sizes(argv, message, capsys, data_dir):
    cf = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    argv = [cf if a == "CF" else a for a in argv]
    refused(capsys, [*argv[:1], "--model", GPT2, *argv[1:]], message)  # in an empty directory


# ----------------------------------------------------------------------------- --out


def test_trace_refuses_an_existing_out(capsys, tmp_path):
    out = tmp_path / "tr"
    out.mkdir()
    (out / "trace.json").write_text("{}")
    argv = ["trace", "--model", GPT2, "--prompt", "a b c", "--subject", "b", "--out", str(out)]
    refused(capsys, argv, "exists and is not empty (--force to overwrite")
    assert (out / "trace.json").read_text() == "{}"


def test_demo_and_mend_train_refuse_an_existing_out(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("kept")
    refused(capsys, ["demo", "--out", str(out)], "exists and is not empty (--force")
    bad = ["mend-train", "--model", GPT2, "--data", "d.json", "--out", str(out)]
    line = refused(capsys, bad, "exists and is not empty (--resume to continue it, or choose")
    assert "--force" not in line  # mend-train has no --force
    assert (out / "x").read_text() == "kept"


def test_failed_command_leaves_no_empty_out(capsys, tmp_path):
    out = tmp_path / "tr"
    argv = ["trace", "--model", GPT2, "--prompt", "a b c", "--subject", "zz", "--out", str(out)]
    refused(capsys, argv, "does not occur in the prompt")
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_lm(smollm):
    """A 2-layer random model with the real tokenizer (as tests/test_lifelong.py's)."""
    from jaxedit.models.lm import LanguageModel
    from jaxedit.models.transformer import init_params

    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=0), smollm.tokenizer)


@pytest.fixture
def eval_tiny(tiny_lm, monkeypatch):
    monkeypatch.setattr(eval_cmd, "load_model", lambda args: tiny_lm)
    monkeypatch.setitem(methods.REGISTRY, "counter", "test_lifelong")
    return tiny_lm


def test_eval_refuses_an_existing_out_then_force_and_resume(eval_tiny, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    data = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    argv = ["eval", "--data", data, "--n", "2", "--no-general", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused(capsys, argv, "exists and is not empty (--resume to continue it, --force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    refused(capsys, [*argv, "--resume", "--force"], "choose one")
    assert cli.main([*argv, "--force"]) == 0
    again = json.loads(capsys.readouterr().out)
    untimed = lambda r: without_seconds({k: v for k, v in r.items() if k != "timing"})
    assert untimed(again) == untimed(first)
    assert cli.main([*argv, "--resume"]) == 0
    capsys.readouterr()
    more = [*argv[:4], "3", *argv[5:], "--resume"]  # --n 3: the run extended by one case
    assert cli.main(more) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 3 and len(res["cases"]) == 3
    # the two finished cases read back as the --force run wrote them (their timings too: not
    # edited again)
    assert res["cases"][:2] == again["cases"]


def test_eval_failure_leaves_no_default_out(eval_tiny, data_dir, capsys, monkeypatch):
    """A run that fails after creating its (default) output directory, before any case is
    measured, leaves no directory: nothing there to resume (`refused`: the working directory,
    where the default runs/eval/... would be, stays empty)."""

    def boom(*args, **kwargs):
        raise InputError("the general block failed")

    monkeypatch.setattr(runner, "measure_general", boom)
    data = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    argv = ["eval", "--data", data, "--n", "2", "--known-facts-unfiltered"]
    refused(capsys, argv, "the general block failed")
    refused(capsys, [*argv, "--out", "o"], "the general block")


# ----------------------------------------------------------------------------- --resume --n


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_resume_with_more_cases_extends_the_run(tiny_lm, tmp_path, mode):
    """A run of 2 cases resumed with 4 edits only the 2 new ones and ends with the results of
    an uninterrupted run of 4 (the general block after the new last case)."""
    from jaxedit.eval.general import FLUENCY_PROMPTS, GeneralSuite

    suite = GeneralSuite.default(
        [("The Eiffel Tower is located in the city of", "Paris")],
        "test",
        max_tokens=32,
        window=16,
        prompts=FLUENCY_PROMPTS[:1],
        fluency_length=8,
    )
    state = COUNTER.prepare(tiny_lm, CountHparams())
    kw = dict(general=suite, mode=mode)
    whole = runner.evaluate(tiny_lm, REQS[:4], COUNTER, state, out=tmp_path / "whole", **kw)
    runner.evaluate(tiny_lm, REQS[:2], COUNTER, state, out=tmp_path / "r", **kw)
    seen: list = []
    more = runner.evaluate(
        tiny_lm, REQS[:4], spying(COUNTER, seen), state, out=tmp_path / "r", resume=True, **kw
    )
    assert [ids for _, _, ids in seen] == [[r.case_id] for r in REQS[2:4]]
    assert without_seconds(more) == without_seconds(whole)


# ----------------------------------------------------------------------------- hints


def command_flags() -> dict[str, set[str]]:
    from jaxedit.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {
        name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()
    }


def test_hints_name_flags_that_exist():
    """Every `--flag` a message, help text or docstring in jaxedit names is a flag of some
    command, and every `jaxedit CMD ... --flag` the README shows is one of CMD's."""
    import ast
    import re

    flags = command_flags()
    every = set().union(*flags.values())
    outside = {"--xla_force_host_platform_device_count", "--no-deps"}  # XLA's, pip's
    root = Path(__file__).resolve().parents[1]
    for f in sorted((root / "jaxedit").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z0-9]", node.value):
                    assert flag in every | outside, (str(f), flag)
    for line in (root / "README.md").read_text().splitlines():
        line = re.sub(r"\$\([^)]*\)", "", line)  # a $(jaxedit data path X) inside another
        m = re.search(r"jaxedit ([a-z-]+)(.*)", line)
        if m and m.group(1) in flags:
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z0-9]", m.group(2)):
                assert flag in flags[m.group(1)], (m.group(1), flag, line)
