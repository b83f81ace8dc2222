"""CLI basics: predict / generate / info / convert, --help, and user errors without tracebacks.

Commands run in-process (`jaxedit.cli.main`) with the session's embedded model substituted for
the CLI's own load (the loader itself is tested in test_checkpoint / test_model_parity); one
check runs the real `python -m jaxedit` in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_checkpoint import write_gguf
from test_model_parity import GOLDENS

import jaxedit.cli.shared as common
from jaxedit.cli.main import build_parser, main
from jaxedit.io.checkpoint import DEFAULT_MODEL, load

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture
def cli(smollm, monkeypatch, capsys):
    """Run `jaxedit ARGS...` in-process -> (exit code, stdout, stderr)."""
    real_load = common.load
    fake = lambda name, dtype, **kw: (
        smollm if name == DEFAULT_MODEL and not kw.get("mesh") else real_load(name, dtype, **kw)
    )
    monkeypatch.setattr(common, "load", fake)
    common._load.cache_clear()

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    common._load.cache_clear()


def test_predict_json_schema_and_paris(cli):
    code, out, err = cli("predict", "--prompt", PROMPT, "--top-k", "3", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"model", "prompt", "tokens", "top"}
    assert r["model"] == DEFAULT_MODEL and r["prompt"] == PROMPT
    assert all(isinstance(t, str) for t in r["tokens"]) and "".join(r["tokens"]) == PROMPT
    assert len(r["top"]) == 3
    for row in r["top"]:
        assert set(row) == {"token", "id", "prob"}
        assert isinstance(row["id"], int) and 0 < row["prob"] < 1
    probs = [row["prob"] for row in r["top"]]
    assert probs == sorted(probs, reverse=True)
    assert r["top"][0]["token"] == " Paris"
    assert r["top"][0]["prob"] > 0.5


def test_predict_human_output(cli):
    code, out, _ = cli("predict", "--prompt", PROMPT)
    assert code == 0
    assert "' Paris'" in out.splitlines()[1]


def test_generate(cli):
    code, out, err = cli("generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"prompt", "completion"} and r["prompt"] == PROMPT
    assert r["completion"].startswith(" Paris")


def test_info(cli):
    code, out, _ = cli("info", "--json")
    assert code == 0
    r = json.loads(out)
    expect = {"model_type": "llama", "layers": 30, "d_model": 576, "heads": 9, "kv_heads": 3}
    assert {k: r[k] for k in expect} == expect
    assert r["vocab_size"] == 49152 and r["d_ff"] == 1536 and r["dtype"] == "float32"
    assert 130e6 < r["params"] < 140e6  # SmolLM2-135M
    code, out, _ = cli("info")
    assert "layers: 30" in out


def test_convert_orbax(cli, tmp_path):
    out_dir = tmp_path / "ckpt"
    model = str(GOLDENS / "gpt2")
    args = ("--model", model, "--out", str(out_dir))
    code, out, err = cli("convert", *args, "--format", "orbax", "--json")
    assert code == 0, err
    assert json.loads(out) == {"model": model, "format": "orbax", "out": str(out_dir)}
    assert load(out_dir).config == load(model).config
    code, out, err = cli("convert", "--model", model, "--out", str(out_dir))  # not empty now
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize("command", ("predict", "generate", "info", "convert", "demo"))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "--json" in text


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxedit ") and "error:" in lines[0]
    assert needle in lines[0], lines[0]


def test_empty_prompt(cli):
    _one_line_error(*cli("predict", "--prompt", "")[::2], "empty prompt")
    _one_line_error(*cli("generate", "--prompt", "")[::2], "empty prompt")


def test_bad_inputs(cli, tmp_path):
    _one_line_error(*cli("info", "--model", str(tmp_path / "missing"))[::2], "not found")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(GOLDENS / "llama" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _one_line_error(*cli("info", "--model", str(pickled))[::2], "pickle")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _one_line_error(*cli("info", "--model", str(bert))[::2], "unsupported architecture")
    gguf = write_gguf(tmp_path / "m.gguf", load(GOLDENS / "qwen2"), "qwen2", tokenizer=False)
    _one_line_error(*cli("info", "--model", str(gguf))[::2], "no tokenizer")
    _one_line_error(*cli("predict", "--prompt", "x", "--top-k", "0")[::2], "top-k")


def test_subprocess_error_exit_code_and_no_traceback(tmp_path):
    """The real entry point: `python -m jaxedit` exits 2 with one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "jaxedit", "predict", "--model", str(tmp_path / "x.bin")]
        + ["--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_error(proc.returncode, proc.stderr, "pickle")
    assert proc.stdout == ""
