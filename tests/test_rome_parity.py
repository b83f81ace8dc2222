"""ROME parity with kmeng01/rome's `compute_u` / `compute_v` on tiny random models.

The goldens (`tests/goldens/methods/rome/<family>_<C>.npz`, written by `scripts/goldens_rome.py`
from a reference checkout) hold the reference's u, Λ, v*, ΔW, k* and the "corrected" right
vector for one request on the tiny GPT-2 and Llama models (edit at layer 0 of 2) of
`tests/goldens/<family>/`, with fixed context templates and C = I or a random SPD C. Here
jaxedit's ROME runs with the same model, request, templates, C and hparams and must agree:

- always, against the committed goldens;
- live, when PyTorch imports and JAXEDIT_ROME_REFERENCE names a kmeng01/rome checkout: the
  reference is re-run in-process and compared with the goldens and with jaxedit.

Tolerances. Both sides run the models in fp32 (jaxedit's XLA vs torch's kernels: relative
differences ~1e-7 per op, ~1e-6 after a few blocks). k*, v₀ and u (one fp64 solve; the
reference multiplies by an fp32 inverse of C, condition number ≤ ~100 here) agree to 1e-5
relative. v* is the end of 20 Adam steps whose first update is ~lr · sign(gradient) per
coordinate: fp32 noise in the gradient moves δ by a relative ~1e-5, so v*, Λ and ΔW are
compared at 1e-4 relative (the gap to any real disagreement — a wrong step, token or sign —
is orders of magnitude: those move v* by ≥ 1e-1 relative).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_available

from jaxedit.io.checkpoint import load
from jaxedit.methods import rome
from jaxedit.methods.common import keys, target_opt
from jaxedit.requests import EditRequest

GOLDENS = Path(__file__).parent / "goldens"
CASES = sorted(p.stem for p in (GOLDENS / "methods" / "rome").glob("*.npz"))
REFERENCE_ENV = "JAXEDIT_ROME_REFERENCE"
TIGHT, LOOSE = 1e-5, 1e-4


def golden(case: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(GOLDENS / "methods" / "rome" / f"{case}.npz", allow_pickle=False) as z:
        arrays = {k: np.array(z[k]) for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return arrays, meta


@functools.cache
def tiny(family: str):
    return load(GOLDENS / family)


def ours(meta: dict, C: np.ndarray) -> dict[str, np.ndarray]:
    """jaxedit's ROME on the golden's model, request, templates, C and hparams."""
    lm = tiny(meta["family"])
    h = meta["hparams"]
    hp = rome.ROMEHparams(
        layer=meta["layer"],
        v_num_grad_steps=h["v_num_grad_steps"],
        v_lr=h["v_lr"],
        v_weight_decay=h["v_weight_decay"],
        clamp_norm_factor=h["clamp_norm_factor"],
        kl_factor=h["kl_factor"],
        kl_prompt=meta["kl_prompt"],
        context_templates=tuple(meta["templates"]),
        variant="paper",  # the reference's compute_v
    )
    r = meta["request"]
    req = EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"])
    paper, _ = rome.compute(lm, rome.make_state(lm, hp, C), [req])
    corrected_hp = dataclasses.replace(hp, variant="corrected")
    corrected, _ = rome.compute(lm, rome.make_state(lm, corrected_hp, C), [req])
    tv = target_opt.target_value(
        lm, "mlp_out", hp.layer, req, hp.context_templates, hp.target_settings(), (hp.kl_prompt,)
    )
    k_j, wk_j = keys.subject_reprs(
        lm, (hp.layer,), [(req.prompt, req.subject)], hp.context_templates
    )
    (d,), (dc,) = paper.deltas, corrected.deltas
    return {
        "u": d.left[:, 0],
        "right": d.right[:, 0],
        "v_star": tv.v_star,
        "v0": tv.v0,
        "delta_w": d.matrix(),
        "k_star": k_j[0, 0].mean(0),
        "wk_mean": wk_j[0, 0].mean(0),
        "right_corrected": dc.right[:, 0],
        "steps": np.int64(tv.steps),
    }


def assert_close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def compare(got: dict, want: dict) -> None:
    assert int(got["steps"]) == int(want["steps"])
    for name in ("k_star", "wk_mean", "v0", "u"):
        assert_close(got[name], want[name], TIGHT, name)
    for name in ("v_star", "right", "delta_w", "right_corrected"):
        assert_close(got[name], want[name], LOOSE, name)
    # the corrected update differs from the paper's by more than the tolerance (a real check)
    assert np.linalg.norm(want["right_corrected"] - want["right"]) > 10 * LOOSE * np.linalg.norm(
        want["right"]
    )


def test_goldens_exist():
    assert set(CASES) >= {"gpt2_identity", "gpt2_random", "llama_identity", "llama_random"}


@pytest.mark.parametrize("case", CASES)
def test_rome_matches_the_reference_goldens(case):
    want, meta = golden(case)
    compare(ours(meta, want["C"]), want)


def _reference_checkout() -> Path | None:
    path = os.environ.get(REFERENCE_ENV)
    return Path(path) if path and (Path(path) / "rome" / "compute_v.py").is_file() else None


@pytest.mark.torch
@pytest.mark.skipif(
    not torch_available() or _reference_checkout() is None,
    reason=f"needs PyTorch and {REFERENCE_ENV}=<a kmeng01/rome checkout>",
)
@pytest.mark.parametrize("case", CASES)
def test_rome_matches_the_reference_live(case):
    spec = importlib.util.spec_from_file_location(
        "goldens_rome", Path(__file__).parent.parent / "scripts" / "goldens_rome.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    want, meta = golden(case)
    live = script.reference_case(_reference_checkout(), meta["family"], want["C"])
    for name, value in want.items():  # the committed goldens are what the reference gives
        np.testing.assert_allclose(live[name], value, rtol=1e-6, atol=1e-9, err_msg=name)
    compare(ours(meta, want["C"]), live)
