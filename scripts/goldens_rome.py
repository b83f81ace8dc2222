"""ROME parity goldens: kmeng01/rome's `compute_u` / `compute_v` on tiny random HF models.

    git --git-dir=/path/to/kmeng01/rome/.git archive HEAD | tar -x -C /tmp/rome-ref
    uv run python scripts/goldens_rome.py /tmp/rome-ref --commit $(git --git-dir=... rev-parse HEAD)

writes tests/goldens/methods/rome/. The committed goldens are from kmeng01/rome 0874014.
`tests/test_rome_parity.py` compares jaxedit with them always, and re-runs the reference live
(`reference_case` below) when PyTorch imports and JAXEDIT_ROME_REFERENCE names the checkout.

Needs PyTorch and transformers (the reference's code runs on them); the reference checkout is
only imported from the path given, never copied into this repository.

For each case (family × second moment) the script loads a tiny random model already committed
for the forward-pass goldens (`tests/goldens/<family>/`: HF config + safetensors + a 256-symbol
byte-level tokenizer, from `scripts/make_goldens.py`), runs the reference's `compute_u` and
`compute_v` for one request with fixed context templates and a given C (the identity, and a
seeded random SPD matrix), and writes `tests/goldens/methods/rome/<family>_<C>.npz`:

    u               compute_u's left vector: C⁻¹k* / ‖C⁻¹k*‖               [F]
    right           compute_v's right vector Λ (the "paper" variant)      [D]
    v_star, v0      v* = v₀ + δ and v₀ (recovered exactly: see below)     [D]
    delta_w         ΔW = u Λᵀ in jaxedit's [F, D] layout (`mlp_out = k @ W`)
    k_star          the template-averaged key k* (the reference's own `repr_tools`)   [F]
    wk_mean         mean over templates of W k_j + b at the subject                  [D]
    right_corrected (v* − wk_mean) / (uᵀ k*), the r-ROME ("corrected") right vector  [D]
    C               the second moment used                                [F, F] float64
    steps, loss     loss evaluations of compute_v's loop and its last printed loss
    meta            JSON: family, layer, request, templates, hparams, reference commit,
                    versions, and the patches below

compute_v returns only Λ = (v* − v_k) / (kᵀu), with (k, v_k) the bare prompt's key and output
from its `get_module_input_output_at_word`; that function is wrapped to record (k, v_k), and
v* = Λ (kᵀu) + v_k (one multiply-add in float64 on fp32 values).

What does not run as written on transformers 5 / a CPU, and the minimal run-time patch (the
checkout is never modified):
1. `rome/layer_stats.py` imports `datasets` at module level (not installed here; its legacy
   `wikipedia` script data set no longer loads either): a stub `datasets` module is inserted
   into `sys.modules` (statistics are given, never loaded).
2. `util/globals.py` reads "globals.yml" from the working directory at import: the reference
   is imported with the checkout as working directory.
3. `compute_v` hard-codes device "cuda" (`tok(...).to("cuda")`, `torch.tensor(..., device=
   "cuda")`, `torch.zeros(..., device="cuda")`): during the call the module's `torch` is a proxy
   that maps device "cuda" to "cpu", and `BatchEncoding.to("cuda")` stays on the CPU.
4. `compute_v` reads the width as `model.config.n_embd` (GPT-2's name): Llama's config gets
   `n_embd = hidden_size`.
5. `compute_u.get_inv_cov` computes Wikipedia statistics: replaced by the given C's inverse,
   as the reference computes it (`torch.inverse` in float64, then `.float()`: mom2_dtype
   "float64").
The tokenizer is a `PreTrainedTokenizerFast` over the byte-level tokenizer.json with right
padding (the reference's index arithmetic assumes it), pad id 0, and only input_ids /
attention_mask as model inputs (GPT-2 would add token_type_ids embeddings).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
OUT = GOLDENS / "methods" / "rome"

# Byte-level tokens: every row (template + prompt + target) must fit GPT-2's 64 positions.
REQUEST = {"prompt": "{} is in the city of", "subject": "The Eiffel Tower"}
TARGET = " Rome"
TEMPLATES = ("{}", "Hello. {}", "It is true. {}")
HPARAMS = dict(  # the ROME paper's values (kmeng01/rome hparams/ROME/gpt2-xl.json)
    v_num_grad_steps=20,
    v_lr=0.5,
    v_weight_decay=0.5,
    clamp_norm_factor=4.0,
    kl_factor=0.0625,
)
# family -> (edited layer, the reference's module name templates). Layer 0 of the two: δ at
# the last block's MLP could not reach the target positions (no attention above it), leaving
# only the KL term, whose gradient at δ = 0 is fp32 noise that Adam normalises into steps.
FAMILIES = {
    "gpt2": (
        0,
        dict(
            rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
            layer_module_tmp="transformer.h.{}",
            mlp_module_tmp="transformer.h.{}.mlp",
            attn_module_tmp="transformer.h.{}.attn",
            ln_f_module="transformer.ln_f",
            lm_head_module="transformer.wte",
        ),
    ),
    "llama": (
        0,
        dict(
            rewrite_module_tmp="model.layers.{}.mlp.down_proj",
            layer_module_tmp="model.layers.{}",
            mlp_module_tmp="model.layers.{}.mlp",
            attn_module_tmp="model.layers.{}.self_attn",
            ln_f_module="model.norm",
            lm_head_module="lm_head",
        ),
    ),
}
SECOND_MOMENTS = ("identity", "random")


def second_moment(kind: str, F: int, seed: int = 0) -> np.ndarray:
    """The identity, or a seeded random SPD matrix (condition number ~ 10-100)."""
    if kind == "identity":
        return np.eye(F)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((F, 2 * F))
    return A @ A.T / (2 * F) + 0.05 * np.eye(F)


# ----------------------------------------------------------------------------- the reference


def import_reference(ref: Path) -> dict[str, types.ModuleType]:
    """Import kmeng01/rome's modules from the checkout `ref` (patches 1 and 2)."""
    if "datasets" not in sys.modules:
        stub = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise RuntimeError("statistics are given to the golden run, never loaded")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(ref))
    cwd = os.getcwd()
    os.chdir(ref)
    try:
        mods = {
            name: importlib.import_module(name)
            for name in ("rome.compute_u", "rome.compute_v", "rome.repr_tools", "rome.rome_hparams")
        }
    finally:
        os.chdir(cwd)
    return mods


class _CpuTorch:
    """`torch` as compute_v sees it, with device "cuda" mapped to "cpu" (patch 3)."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def _cpu(self, fn):
        def call(*a, **k):
            if k.get("device") == "cuda":
                k["device"] = "cpu"
            return fn(*a, **k)

        return call

    @property
    def zeros(self):
        return self._cpu(self._torch.zeros)

    @property
    def tensor(self):
        return self._cpu(self._torch.tensor)


@contextlib.contextmanager
def on_cpu(compute_v_module):
    import torch
    from transformers import BatchEncoding

    to = BatchEncoding.to
    BatchEncoding.to = lambda self, device, **k: to(
        self, "cpu" if device == "cuda" else device, **k
    )
    compute_v_module.torch = _CpuTorch(torch)
    try:
        yield
    finally:
        BatchEncoding.to = to
        compute_v_module.torch = torch


def tiny_model(family: str):
    """The committed tiny model of `family` and its tokenizer, as the reference expects them."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    d = GOLDENS / family
    model = AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    if not hasattr(model.config, "n_embd"):
        model.config.n_embd = model.config.hidden_size  # patch 4
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), model_input_names=["input_ids", "attention_mask"]
    )
    tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"
    return model, tok


def reference_case(ref: Path, family: str, C: np.ndarray) -> dict[str, np.ndarray]:
    """Run compute_u / compute_v of the checkout `ref` on the tiny `family` model with C."""
    import torch

    mods = import_reference(ref)
    cu, cv, repr_tools = mods["rome.compute_u"], mods["rome.compute_v"], mods["rome.repr_tools"]
    layer, modules = FAMILIES[family]
    model, tok = tiny_model(family)
    hp = mods["rome.rome_hparams"].ROMEHyperParams(
        layers=[layer],
        fact_token="subject_last",
        v_loss_layer=model.config.num_hidden_layers - 1,
        mom2_adjustment=True,
        context_template_length_params=[],
        mom2_dataset="given",
        mom2_n_samples=0,
        mom2_dtype="float64",
        **HPARAMS,
        **modules,
    )
    request = {**REQUEST, "target_new": {"str": TARGET}}
    inv = torch.inverse(torch.from_numpy(C)).float()  # patch 5
    templates = list(TEMPLATES)
    seen = {}
    original_io = cv.get_module_input_output_at_word

    def recording_io(*a, **k):
        seen["k"], seen["v_k"] = original_io(*a, **k)
        return seen["k"], seen["v_k"]

    get_inv_cov, cu.get_inv_cov = cu.get_inv_cov, lambda *a, **k: inv
    cv.get_module_input_output_at_word = recording_io
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), on_cpu(cv):
            u = cu.compute_u(model, tok, request, hp, layer, templates)
            right = cv.compute_v(model, tok, request, hp, layer, u, templates)
    finally:
        cu.get_inv_cov = get_inv_cov
        cv.get_module_input_output_at_word = original_io
    losses = [line for line in printed.getvalue().splitlines() if line.startswith("loss ")]
    u64, right64 = u.detach().double().numpy(), right.detach().double().numpy()
    k, v_k = seen["k"].detach().double().numpy(), seen["v_k"].detach().double().numpy()
    v_star = right64 * float(k @ u64) + v_k
    # k* and the mean output over the templates, with the reference's own lookup
    with torch.no_grad():
        k_j, wk_j = repr_tools.get_reprs_at_word_tokens(
            model=model,
            tok=tok,
            context_templates=[t.format(REQUEST["prompt"]) for t in templates],
            words=[REQUEST["subject"]] * len(templates),
            layer=layer,
            module_template=modules["rewrite_module_tmp"],
            subtoken="last",
            track="both",
        )
    k_star, wk_mean = k_j.double().mean(0).numpy(), wk_j.double().mean(0).numpy()
    right_corrected = (v_star - wk_mean) / float(k_star @ u64)
    return {
        "u": u64,
        "right": right64,
        "v_star": v_star,
        "v0": v_k,
        "delta_w": np.outer(u64, right64),
        "k_star": k_star,
        "wk_mean": wk_mean,
        "right_corrected": right_corrected,
        "C": C,
        "steps": np.int64(len(losses)),
        "loss": np.float64(float(losses[-1].split()[1])),
    }


def meta(ref: Path, family: str, kind: str, commit: str | None = None) -> dict:
    import torch
    import transformers

    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            commit = ""
    return {
        "reference": "kmeng01/rome rome/compute_u.py, rome/compute_v.py",
        "reference_commit": commit or "unknown (not a git checkout; pass --commit)",
        "family": family,
        "layer": FAMILIES[family][0],
        "second_moment": kind,
        "request": {**REQUEST, "target_new": TARGET},
        "templates": list(TEMPLATES),
        "hparams": HPARAMS,
        "kl_prompt": "{} is a",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "patches": [
            "stub `datasets` module (layer_stats is imported, never run)",
            "imported with the checkout as working directory (globals.yml)",
            "device 'cuda' mapped to 'cpu' inside compute_v",
            "config.n_embd = hidden_size for non-GPT-2 configs",
            "get_inv_cov -> torch.inverse(C in float64).float()",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", type=Path, help="a kmeng01/rome checkout (its root directory)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--commit", default=None, help="the checkout's commit (for an archive)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        F = json.loads((GOLDENS / family / "config.json").read_text())
        F = F.get("n_inner") or F.get("intermediate_size")
        for kind in SECOND_MOMENTS:
            arrays = reference_case(args.reference.resolve(), family, second_moment(kind, F))
            path = args.out / f"{family}_{kind}.npz"
            info = json.dumps(meta(args.reference.resolve(), family, kind, args.commit), indent=1)
            np.savez_compressed(path, meta=np.array(info), **arrays)
            print(
                f"{path.relative_to(ROOT)}: steps {int(arrays['steps'])}, loss "
                f"{float(arrays['loss']):.4f}, |u|={np.linalg.norm(arrays['u']):.3f}, "
                f"|v*-v0|={np.linalg.norm(arrays['v_star'] - arrays['v0']):.4f}"
            )


if __name__ == "__main__":
    main()
