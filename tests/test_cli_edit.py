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
    monkeypatch.setattr(_common, "_load", lambda name, dtype: smollm)
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


def test_edit_requests_file_is_read(tmp_path):
    from jaxedit.cli.commands.edit import read_requests
    from jaxedit.errors import InputError

    f = tmp_path / "r.jsonl"
    f.write_text(
        json.dumps({"prompt": PROMPT, "subject": SUBJECT, "target_new": "Rome"}) + "\n\n"
        + json.dumps({"prompt": "The Louvre is in", "subject": "The Louvre",
                      "target_new": {"str": "Berlin"}, "target_true": {"str": "Paris"}}) + "\n"
    )  # fmt: skip
    reqs = read_requests(str(f))
    assert [r.target_new for r in reqs] == ["Rome", "Berlin"]
    assert reqs[1].prompt == "{} is in" and reqs[1].target_true == "Paris"
    f.write_text(json.dumps({"prompt": PROMPT, "subject": SUBJECT}) + "\n")
    with pytest.raises(InputError, match="target_new"):
        read_requests(str(f))


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
