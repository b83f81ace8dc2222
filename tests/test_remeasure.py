"""`jaxedit eval --remeasure` (jaxedit.eval.remeasure): a finished sequential run measured again
on its final model gives the run's own teacher-forced numbers, plus the generated ones."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest

from jaxedit.edits import WeightDelta, WeightEdit, apply, load_edit
from jaxedit.errors import InputError
from jaxedit.eval import datasets, remeasure, report, runner
from jaxedit.eval.measure import gen_case_metrics, measure_generated
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight
from jaxedit.models.transformer import init_params


@pytest.fixture(scope="module")
def tiny(smollm):
    cfg = smollm.config.replace(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=16, d_ff=128
    )
    return LanguageModel("tiny", cfg, init_params(cfg, seed=2), smollm.tokenizer)


@dataclass(frozen=True)
class Hp:
    factor: float = 1.5


def _scale(lm, factor, requests):
    w = np.asarray(get_weight(lm.params, "mlp_out", 0), np.float32)
    return WeightEdit((WeightDelta("mlp_out", 0, dense=(factor - 1.0) * w),), {}), {}


SCALE = EditMethod("scale", Hp, lambda lm, hp, opts: hp.factor, _scale, default_hparams=Hp)


def test_remeasure_a_sequential_run(tiny, data_dir, tmp_path):
    path = os.path.join(data_dir, "counterfact", "counterfact-edit.json")
    ds = datasets.load(path, n=4)
    run_dir, out = tmp_path / "run", tmp_path / "again"
    res = runner.evaluate(
        tiny,
        ds.requests,
        SCALE,
        1.5,
        mode="sequential",
        batch_size=2,
        out=run_dir,
        general=False,
        info={"data": path, "format": "counterfact"},
    )
    assert "efficacy_gen" not in res["metrics"]
    new = remeasure.remeasure(tiny, run_dir, out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == report.as_jsonable(new["metrics"])
    for name, s in res["metrics"].items():  # the same final model: the same numbers
        assert new["metrics"][name]["mean"] == pytest.approx(s["mean"], abs=1e-9), name
        assert new["baseline"][name]["mean"] == pytest.approx(res["baseline"][name]["mean"])
    edited = apply(tiny, load_edit(remeasure.final_edit_path(run_dir, res)))
    post, pre = measure_generated(edited, ds.requests), measure_generated(tiny, ds.requests)
    for row, r, g, g0 in zip(new["cases"], ds.requests, post, pre, strict=True):
        assert row["case_id"] == r.case_id
        for name, v in gen_case_metrics(r, g, g0).items():
            assert row["metrics"][name] == v
        assert row["continuations"]["rw/0"] == g[("rw", 0)].text
    assert new["remeasured"]["from"] == str(run_dir) and (out / "results.md").exists()
    with pytest.raises(InputError, match="another --out"):
        remeasure.remeasure(tiny, run_dir, run_dir)
    with pytest.raises(InputError, match="not a finished sequential run"):
        remeasure.remeasure(tiny, out, tmp_path / "x")  # (its mode is sequential, no lifelong/)
    with pytest.raises(InputError, match="no results.json"):
        remeasure.remeasure(tiny, tmp_path, tmp_path / "y")
