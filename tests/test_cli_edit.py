"""`jaxedit edit` and `jaxedit stats` through the CLI entry point (in-process, shared model)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import torch_available

import jaxedit as je
from jaxedit import cli
from jaxedit.cli import shared as _common
from jaxedit.io.checkpoint import load_hf_dir

PROMPT = "{} is located in the city of"
SUBJECT = "The Eiffel Tower"
TEMPLATES = ["{}", "The following is true. {}", "I read this today. {}"]


@pytest.fixture
def use_smollm(smollm, monkeypatch):
    monkeypatch.setattr(_common, "_load", lambda *args: smollm)
    return smollm


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "The Louvre is in", "--subject", SUBJECT, "--target", "Rome"], "not found"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--target", " "], "empty target"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "Rome", "--set", "layer=99"],
         "out of range"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "Rome", "--set", "layr=3"],
         "no such key"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "Rome", "--hparams", "gpt-9"],
         "no hyperparameter preset"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--target", "Rome", "--set", "demos=x.json",
          "--method", "ike"], "x.json"),
        (["--prompt", PROMPT, "--subject", SUBJECT], "required"),
    ],
)  # fmt: skip
def test_edit_errors_exit_2_without_traceback(use_smollm, capsys, tmp_path, argv, message):
    save, edit_file = tmp_path / "out", tmp_path / "e.safetensors"
    rc, out, err = _run(capsys, "edit", *argv, "--save", str(save), "--save-edit", str(edit_file))
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not save.exists() and not edit_file.exists()  # nothing saved


def test_unknown_method_is_refused_by_the_parser(use_smollm, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["edit", "--method", "nope", "--prompt", PROMPT])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_edit_refuses_non_empty_save_dir(use_smollm, capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    rc, _, err = _run(capsys, "edit", "--prompt", PROMPT, "--subject", SUBJECT, "--target",
                      "Rome", "--save", str(tmp_path))  # fmt: skip
    assert rc == 2 and "not empty" in err


@pytest.mark.slow  # writes the whole model; test_cli_apply covers --save-edit by default
def test_edit_json_save_and_edit_file(use_smollm, capsys, tmp_path, data_dir):
    smollm = use_smollm
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    rc, out, err = _run(
        capsys, "edit", "--method", "rome", "--prompt", PROMPT, "--subject", SUBJECT,
        "--target", "Rome", "--check", "The capital of Germany is",
        "--set", f"context_templates={json.dumps(TEMPLATES)}", "--set", f"mom2_corpus={corpus}",
        "--set", "mom2_n_tokens=4096", "--cache-dir", str(tmp_path / "cache"),
        "--save", str(tmp_path / "model"), "--save-edit", str(tmp_path / "e.safetensors"),
        "--json",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["method"] == "rome" and r["model"] == smollm.name
    assert r["request"] == {"prompt": PROMPT, "subject": SUBJECT, "target_new": "Rome",
                            "target_true": None}  # fmt: skip
    assert [b["prompt"] for b in r["before"]] == [
        "The Eiffel Tower is located in the city of",
        "The capital of Germany is",
    ]
    assert r["before"][0]["top"][0]["token"] == " Paris"
    assert r["after"][0]["top"][0]["token"] == " Rome"
    assert r["after"][1]["top"][0]["token"] == r["before"][1]["top"][0]["token"]
    layer = je.methods.get("rome").hparams("smollm2-135m").layer
    assert r["edit"]["weights"] == [f"mlp_out.{layer}"] and r["edit"]["norm"] > 0
    assert r["hparams"]["context_templates"] == TEMPLATES and r["info"]["templates"] == 3
    assert set(r["seconds"]) == {"prepare", "edit"}
    # the saved edit re-applied to the original params equals the saved model's weights
    edited = je.apply(smollm, je.load_edit(r["saved_edit"]))
    saved = load_hf_dir(tmp_path / "model")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), saved.params, edited.params
    )
    assert (tmp_path / "model" / "config.json").exists()
    if torch_available():  # transformers reads the edited model and says " Rome" too
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
        ids = smollm.tokenizer.encode("The Eiffel Tower is located in the city of")
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert smollm.tokenizer.decode([int(logits.argmax())]) == " Rome"


def _write_jsonl(path, *records, raw: str = "") -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw)
    return str(path)


R1 = {"prompt": PROMPT, "subject": SUBJECT, "target_new": "Rome"}
R2 = {"prompt": "The Louvre is in", "subject": "The Louvre", "target_new": {"str": "Berlin"},
      "target_true": {"str": "Paris"}}  # fmt: skip
R3 = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"}


def test_requests_file_formats(tmp_path, data_dir):
    from jaxedit.cli.commands.edit import read_requests
    from jaxedit.eval import datasets

    # JSON lines (blank lines skipped), ROME's {"str"} targets, "target" for target_new
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(R1) + "\n\n" + json.dumps(R2) + "\n" + json.dumps(R3) + "\n")
    reqs = read_requests(f)
    assert [r.target_new for r in reqs] == ["Rome", "Berlin", "English"]
    assert reqs[1].prompt == "{} is in" and reqs[1].target_true == "Paris"
    assert reqs[0].target_true is None
    assert [r.target_new for r in read_requests(f, n=2)] == ["Rome", "Berlin"]
    # the same records as a JSON list give the same requests
    g = tmp_path / "r.json"
    g.write_text(json.dumps([R1, R2, R3], indent=1))
    assert read_requests(g) == reqs
    # a data-set file goes through jaxedit.eval.datasets.load (EasyEdit CounterFact here)
    cf = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    got = read_requests(cf, n=3)
    want = datasets.load(cf, n=3).requests
    assert got == want and len(got) == 3
    assert got[0].subject == "Danielle Darrieux" and got[0].target_true == "French"
    assert got[0].paraphrase_prompts  # the data set's fields come along


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("  \n\n", "empty file"),
        ("[]", "no requests"),
        (json.dumps(R1) + "\n" + json.dumps(R3) + "\n{oops\n", "line 3: not JSON"),
        (json.dumps(R1) + "\n\n" + json.dumps({"prompt": PROMPT, "subject": SUBJECT}) + "\n",
         "line 3: missing string field(s) ['target_new']"),
        (json.dumps([R1, {**R3, "target": ""}]), "record 1: empty target"),
        (json.dumps([R1, "x"]), "record 1: expected a JSON object"),
        (json.dumps({**R1, "prompt": "The Louvre is in"}), "line 1: subject 'The Eiffel Tower' "
         "not found"),
        (json.dumps({"known_id": 0, "prompt": "x", "subject": "y", "attribute": "z"}),
         "known_1000"),
        (json.dumps({"question": "?"}), "not a request"),
        ("3", "expected JSON objects"),
    ],
)  # fmt: skip
def test_requests_file_errors_name_the_line(tmp_path, content, message):
    from jaxedit.cli.commands.edit import read_requests
    from jaxedit.errors import InputError

    f = tmp_path / "r.jsonl"
    f.write_text(content)
    with pytest.raises(InputError) as e:
        read_requests(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_requests_file_missing_and_bad_n(tmp_path):
    from jaxedit.cli.commands.edit import read_requests
    from jaxedit.errors import InputError

    with pytest.raises(InputError, match="file not found"):
        read_requests(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="--n must be positive"):
        read_requests(_write_jsonl(tmp_path / "r.jsonl", R1), n=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", PROMPT], "not both"),
        (["--target", "Rome"], "not both"),
        (["--n", "0"], "--n must be positive"),
    ],
)
def test_edit_requests_cli_errors(use_smollm, capsys, tmp_path, extra, message):
    f = _write_jsonl(tmp_path / "r.jsonl", R1)
    save, edit_file = tmp_path / "out", tmp_path / "e.safetensors"
    rc, _, err = _run(capsys, "edit", "--method", "none", "--requests", f, *extra,
                      "--save", str(save), "--save-edit", str(edit_file))  # fmt: skip
    assert rc == 2 and message in err and "Traceback" not in err
    assert not save.exists() and not edit_file.exists()


def test_edit_cli_missing_requests_file_and_n_without_file(use_smollm, capsys, tmp_path):
    rc, _, err = _run(capsys, "edit", "--requests", str(tmp_path / "nope.jsonl"))
    assert rc == 2 and "file not found" in err and "Traceback" not in err
    rc, _, err = _run(capsys, "edit", "--prompt", PROMPT, "--subject", SUBJECT, "--target",
                      "Rome", "--n", "3")  # fmt: skip
    assert rc == 2 and "--n" in err and "--requests" in err


def test_edit_requests_table_json_and_text(use_smollm, capsys, tmp_path, data_dir):
    """Method "none" through --requests: all requests in one call, the table of the first
    --show ones agrees with the top-k lists and with scoring the targets directly, and the
    edit file is written."""
    from jaxedit.eval.scoring import score_targets

    f = _write_jsonl(tmp_path / "r.jsonl", R1, R2, R3)
    argv = ["edit", "--method", "none", "--requests", f, "--show", "2",
            "--check", "The capital of Germany is",
            "--save-edit", str(tmp_path / "e.safetensors")]  # fmt: skip
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["n_requests"] == 3 and len(r["requests"]) == 3 and r["requests_file"] == f
    assert r["requests"][2]["target_new"] == "English"
    assert [t["prompt"] for t in r["table"]] == [
        "The Eiffel Tower is located in the city of",
        "The Louvre is in",
    ]
    assert [b["prompt"] for b in r["before"]][-1] == "The capital of Germany is"
    assert len(r["before"]) == len(r["after"]) == 3  # the 2 shown rewrites + the check
    want = score_targets(use_smollm, [t["prompt"] for t in r["table"]], ["Rome", "Berlin"]).prob
    for t, b, w in zip(r["table"], r["before"][:2], want, strict=True):
        assert t["before"]["top1"] == b["top"][0]["token"]
        assert t["before"]["p_target"] == pytest.approx(float(w), rel=1e-5)
        assert t["after"] == t["before"]  # "none" changes nothing
    assert r["table"][0]["before"]["top1"] == " Paris" and r["table"][0]["before"]["p_target"] < 0.1
    assert os.path.exists(r["saved_edit"]) and je.load_edit(r["saved_edit"]).deltas == ()
    rc, text, err = _run(capsys, *argv[:-2])  # the text form: header, table rows, the check
    assert rc == 0, err
    assert "3 request(s) edited in one call" in text and "first 2 of 3" in text
    assert "The Louvre is in" in text and "Danielle" not in text
    assert "'The capital of Germany is'" in text
    # a data-set file with --n
    cf = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    rc, out, err = _run(capsys, "edit", "--method", "none", "--requests", cf, "--n", "2",
                        "--show", "1", "--json")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    assert r["n_requests"] == 2 and r["request"]["target_true"] == "French"
    assert r["table"][0]["prompt"] == "The mother tongue of Danielle Darrieux is"


@pytest.mark.slow
def test_edit_requests_memit_one_solve(use_smollm, capsys, tmp_path, data_dir):
    """MEMIT writes three facts in one call: p(target_new) rises for each, the edit touches
    the preset's layers once each, and the saved edit reproduces the table's numbers."""
    from jaxedit.eval.scoring import score_targets

    f = _write_jsonl(tmp_path / "r.jsonl", R1, {**R2, "prompt": "{} is in the city of"}, R3)
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    rc, out, err = _run(
        capsys, "edit", "--method", "memit", "--requests", f,
        "--set", "v_num_grad_steps=4", "--set", "mom2_n_tokens=2048",
        "--set", f"mom2_corpus={corpus}", "--set", f"context_templates={json.dumps(TEMPLATES)}",
        "--cache-dir", str(tmp_path / "cache"), "--save-edit", str(tmp_path / "e.safetensors"),
        "--json",
    )  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)
    layers = je.methods.get("memit").hparams("smollm2-135m").layers
    assert r["edit"]["weights"] == [f"mlp_out.{x}" for x in layers]
    assert r["info"]["requests"] == 3 and r["n_requests"] == 3
    assert len(r["table"]) == 3
    for t in r["table"]:
        assert t["after"]["p_target"] > 5 * t["before"]["p_target"], t
    edited = je.apply(use_smollm, je.load_edit(r["saved_edit"]))
    got = score_targets(edited, [t["prompt"] for t in r["table"]], ["Rome", "Berlin", "English"])
    np.testing.assert_allclose(got.prob, [t["after"]["p_target"] for t in r["table"]], rtol=1e-4)


def test_stats_command(use_smollm, capsys, tmp_path, data_dir):
    corpus = os.path.join(data_dir, "wikitext", "wiki.test.raw")
    args = ["stats", "--layer", "1", "--corpus", corpus, "--tokens", "256", "--max-len", "64",
            "--cache", str(tmp_path), "--json"]  # fmt: skip
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    r = json.loads(out)
    assert r["tokens"] == 256 and r["from_cache"] is False and r["eig_min"] >= -1e-4
    rc, out, _ = _run(capsys, *args)
    assert json.loads(out)["from_cache"] is True
    rc, _, err = _run(capsys, "stats", "--layer", "30", "--cache", str(tmp_path))
    assert rc == 2 and "out of range" in err
