"""`jaxedit demo`, the README's first command."""

import json

import pytest

from jaxedit.cli.main import main


def test_demo_quick_shows_what_the_model_believes(smollm, capsys, monkeypatch):
    monkeypatch.setattr("jaxedit.cli.commands.demo.load_model", lambda args: smollm)
    assert main(["demo", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    first = {row["prompt"]: row["top"][0]["token"] for row in out["predictions"]}
    assert first["The Eiffel Tower is located in the city of"] == " Paris"
    assert first["The capital of Germany is"] == " Berlin"
    assert "trace" not in out and "edit" not in out


@pytest.mark.slow  # a causal trace and three ROME edits: minutes on 2 cores
def test_full_demo_edits_the_eiffel_tower(smollm, capsys, monkeypatch):
    monkeypatch.setattr("jaxedit.cli.commands.demo.load_model", lambda args: smollm)
    assert main(["demo", "--json", "--samples", "3", "--n-facts", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["answer"] == " Paris"
    assert out["trace"]["low_score"] < out["trace"]["high_score"]
    checks = {c["prompt"]: c for c in out["edit"]["checks"]}
    assert checks["The Eiffel Tower is located in the city of"]["after"][0] == " Rome"
    assert checks["The capital of Germany is"]["after"][0] == " Berlin"
    assert "efficacy_score" in out["metrics"]["table"]
