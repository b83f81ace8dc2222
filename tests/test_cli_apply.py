"""Edits on the command line: `jaxedit edit --save-edit` records the model an edit belongs to,
`jaxedit apply EDIT_FILE [--invert] --save DIR` applies or undoes it (refusing an edit of
another model with one line), `--dtype` on every command, and `edit --json` reporting p(target)
before and after for every probe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxedit import cli
from jaxedit.cli import shared as _common
from jaxedit.edit_target import stamp
from jaxedit.edits import ContextEdit, WeightDelta, WeightEdit, apply, load_edit, save_edit
from jaxedit.io.checkpoint import load
from jaxedit.models.sites import get_weight

GOLDENS = Path(__file__).parent / "goldens"
GPT2, LLAMA = str(GOLDENS / "gpt2"), str(GOLDENS / "llama")


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _w(model, layer=1):
    lm = model if not isinstance(model, str | Path) else load(str(model))
    return np.asarray(get_weight(lm.params, "mlp_out", layer), np.float32)


def _random_edit(lm, layer=1, seed=0, rank=2) -> WeightEdit:
    F, D = np.shape(get_weight(lm.params, "mlp_out", layer))
    rng = np.random.default_rng(seed)
    left = rng.normal(size=(F, rank)).astype(np.float32) * 0.1
    right = rng.normal(size=(D, rank)).astype(np.float32) * 0.1
    return WeightEdit((WeightDelta("mlp_out", layer, left, right),), {"method": "test"})


@pytest.fixture(scope="module")
def gpt2():
    return load(GPT2)


@pytest.fixture
def stamped(gpt2, tmp_path):
    """A stamped edit of the tiny GPT-2 on disk."""
    edit = _random_edit(gpt2)
    return save_edit(stamp(edit, gpt2, apply(gpt2, edit)), tmp_path / "e.safetensors")


def test_apply_then_invert_round_trip(gpt2, stamped, tmp_path, capsys):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    rc, out, err = _run(capsys, "apply", str(stamped), "--model", GPT2, "--save", str(d1))
    assert rc == 0, err
    assert "applied test edit" in out and "weights match" in out and str(d1) in out
    want = _w(apply(gpt2, load_edit(stamped)))
    np.testing.assert_array_equal(_w(d1), want)
    assert not np.allclose(_w(d1), _w(gpt2))
    np.testing.assert_array_equal(_w(d1, 0), _w(gpt2, 0))  # other layers untouched
    rc, out, err = _run(capsys, "apply", str(stamped), "--model", str(d1), "--invert",
                        "--save", str(d2), "--json")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["inverted"] and r["weights"] == ["mlp_out.1"] and r["check"] == "weights match"
    np.testing.assert_allclose(_w(d2), _w(gpt2), atol=1e-6)


@pytest.mark.parametrize("what", ["already", "not-applied", "other-model", "untracked", "context",
                                  "garbage", "shape", "layer", "save-exists"])  # fmt: skip
def test_apply_refusals_are_one_line_and_write_nothing(gpt2, stamped, tmp_path, capsys, what):
    model, extra, edit_file = GPT2, [], stamped
    message = {
        "already": "is already applied (--invert undoes it)",
        "not-applied": "is not applied: nothing to undo",
        "other-model": "is not the weight this edit was computed on",
        "untracked": "does not record the model it was made for",
        "context": "context edit",
        "garbage": "not a jaxedit edit file",
        "shape": "an edit for another model",
        "layer": "does not have",
        "save-exists": "exists and is not an empty directory",
    }[what]
    save = tmp_path / "out"
    if what == "already":
        model = str(tmp_path / "edited")
        assert _run(capsys, "apply", str(stamped), "--model", GPT2, "--save", model)[0] == 0
    elif what == "not-applied":
        extra = ["--invert"]
    elif what == "other-model":
        model = LLAMA  # same [64, 32] weight shape, other weights
    elif what == "untracked":
        edit_file = save_edit(_random_edit(gpt2), tmp_path / "u.safetensors")
    elif what == "context":
        edit_file = save_edit(ContextEdit(("New fact.",)), tmp_path / "c.safetensors")
    elif what == "garbage":
        edit_file = tmp_path / "g.safetensors"
        edit_file.write_bytes(b"\x00" * 64)
    elif what == "shape":
        bad = WeightDelta("mlp_out", 1, np.ones((48, 1), np.float32), np.ones((32, 1), np.float32))
        edit_file = save_edit(WeightEdit((bad,)), tmp_path / "s.safetensors")
        extra = ["--force"]  # the structural check holds even when forced
    elif what == "layer":
        bad = _random_edit(gpt2).deltas[0]
        bad = WeightDelta("mlp_out", 7, bad.left, bad.right)
        edit_file = save_edit(WeightEdit((bad,)), tmp_path / "l.safetensors")
    elif what == "save-exists":
        save.mkdir()
        (save / "keep.txt").write_text("x")
    rc, out, err = _run(capsys, "apply", str(edit_file), "--model", model, "--save", str(save),
                        *extra)  # fmt: skip
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err, err
    if what == "save-exists":
        assert [p.name for p in save.iterdir()] == ["keep.txt"]
    else:
        assert not save.exists()


def test_force_applies_an_edit_without_a_record(gpt2, tmp_path, capsys):
    edit = _random_edit(gpt2, seed=3)
    path = save_edit(edit, tmp_path / "u.safetensors")
    rc, out, err = _run(capsys, "apply", str(path), "--model", GPT2, "--save",
                        str(tmp_path / "d"), "--force")  # fmt: skip
    assert rc == 0 and "forced" in out, err
    np.testing.assert_array_equal(_w(tmp_path / "d"), _w(apply(gpt2, edit)))


def test_apply_with_dtype_bfloat16(gpt2, stamped, tmp_path, capsys):
    d = tmp_path / "bf16"
    rc, out, err = _run(capsys, "apply", str(stamped), "--model", GPT2, "--dtype", "bfloat16",
                        "--save", str(d), "--json")  # fmt: skip
    assert rc == 0, err  # the bfloat16-rounded weights are recognised as the same model
    lm16 = load(GPT2, dtype="bfloat16")
    want = np.asarray(get_weight(apply(lm16, load_edit(stamped)).params, "mlp_out", 1), np.float32)
    np.testing.assert_array_equal(_w(d), want)


def test_dtype_is_accepted_by_every_command_that_loads_a_model(capsys):
    from jaxedit.cli.main import _commands, build_parser

    parser = build_parser()
    for mod in _commands():
        with pytest.raises(SystemExit):
            parser.parse_args([mod.NAME, "--help"])
        usage = capsys.readouterr().out
        assert "--dtype {float32,bfloat16}" in usage, mod.NAME  # the same meaning everywhere
    args = parser.parse_args(["predict", "--prompt", "x", "--dtype", "bfloat16"])
    assert args.model_dtype == "bfloat16"
    # stats: --dtype is the params' too; C's accumulation dtype is --stats-dtype
    args = parser.parse_args(["stats", "--layer", "1", "--dtype", "bfloat16"])
    assert args.model_dtype == "bfloat16" and args.stats_dtype == "float32"
    args = parser.parse_args(["stats", "--layer", "1", "--stats-dtype", "float64"])
    assert args.model_dtype == "float32" and args.stats_dtype == "float64"
    with pytest.raises(SystemExit):
        parser.parse_args(["stats", "--layer", "1", "--dtype", "float64"])
    capsys.readouterr()


def test_stats_of_a_bfloat16_model_accumulates_in_the_stats_dtype(tmp_path, capsys):
    """`stats --dtype bfloat16 --stats-dtype float64` loads bf16 params and accumulates C in
    float64; the result names both."""
    argv = ["stats", "--model", GPT2, "--layer", "0", "--corpus", "self", "--tokens", "128",
            "--max-len", "32", "--cache", str(tmp_path), "--json"]  # fmt: skip
    rc, out, err = _run(capsys, *argv, "--dtype", "bfloat16", "--stats-dtype", "float64")
    assert rc == 0, err
    r = json.loads(out)
    assert r["model_dtype"] == "bfloat16" and r["stats_dtype"] == "float64"
    assert r["tokens"] >= 128 and r["trace"] > 0 and r["eig_max"] >= r["eig_min"]


def test_edit_save_edit_then_apply_and_invert(tmp_path, capsys, monkeypatch):
    """The whole road on a model without a preset: edit (ROME, automatic hparams, settings cut
    for speed), save the edit, apply it to the original, undo it on the result."""
    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path / "cache"))
    e, d1, d2 = tmp_path / "e.safetensors", tmp_path / "d1", tmp_path / "d2"
    rc, out, err = _run(
        capsys, "edit", "--model", GPT2, "--prompt", "{} is in", "--subject", "Paris",
        "--target", "Rome", "--set", "v_num_grad_steps=3", "--set",
        "context_template_length_params=[[2, 2]]", "--save-edit", str(e), "--save",
        str(tmp_path / "direct"), "--json",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    target = load_edit(e).meta["target"]
    layer = r["info"]["layer"]
    assert target["model"] == GPT2 and list(target["weights"]) == [f"mlp_out.{layer}"]
    assert target["config"]["n_layers"] == 2 and len(target["fingerprint"]) >= 16
    assert _run(capsys, "apply", str(e), "--model", GPT2, "--save", str(d1))[0] == 0
    # Applying the saved edit gives the model `edit --save` wrote.
    np.testing.assert_array_equal(_w(d1, layer), _w(tmp_path / "direct", layer))
    assert _run(capsys, "apply", str(e), "--model", str(d1), "--invert", "--save", str(d2))[0] == 0
    np.testing.assert_allclose(_w(d2, layer), _w(GPT2, layer), atol=1e-6)


def test_edit_json_gives_p_target_before_and_after_for_every_probe(
    smollm, data_dir, monkeypatch, capsys
):
    monkeypatch.setattr(_common, "_load", lambda *a: smollm)
    data = str(Path(data_dir) / "counterfact" / "counterfact-edit.json")
    check = "The capital of Germany is"
    rc, out, err = _run(capsys, "edit", "--method", "none", "--requests", data, "--n", "2",
                        "--show", "2", "--check", check, "--json")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    reqs = r["requests"]
    probes = r["probes"]
    kinds = [(p["request"], p["kind"]) for p in probes]
    assert kinds[:2] == [(0, "rewrite"), (1, "rewrite")]
    for i in (0, 1):
        assert (i, "paraphrase") in kinds and (i, "neighborhood") in kinds
        rewrite = probes[i]
        assert rewrite["target"] == reqs[i]["target_new"]
        assert rewrite["p_before"] == pytest.approx(r["table"][i]["before"]["p_target"])
    (c,) = [p for p in probes if p["kind"] == "check"]
    assert c["prompt"] == check and c["target"] == r["before"][-1]["top"][0]["token"]
    assert c["p_before"] == pytest.approx(r["before"][-1]["top"][0]["prob"], rel=1e-3)
    for p in probes:  # the "none" method changes nothing: every probe keeps its probability
        assert 0 < p["p_before"] <= 1 and p["p_after"] == pytest.approx(p["p_before"], rel=1e-5)
