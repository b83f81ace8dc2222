"""FT parity goldens: EasyEdit's `execute_ft` (FT-L and FT-M) on the tiny random Llama.

    git --git-dir=/path/to/zjunlp/EasyEdit/.git archive HEAD | tar -x -C /tmp/easyedit-ref
    uv run python scripts/goldens_ft.py /tmp/easyedit-ref --commit <the checkout's commit>

writes tests/goldens/methods/ft/<case>.npz (compared by `tests/test_ft_parity.py`): for each
case the reference's ΔW of the edited `down_proj` weight in jaxedit's [F, D] layout
(`delta_w`) and a JSON `meta` (requests, hparams, reference commit, versions).

The model is the tiny random Llama committed for the forward-pass goldens (`tests/goldens/
llama/`: 2 blocks, D 32, F 64, a 256-symbol byte-level tokenizer, so " Rome" is 5 tokens and
FT-L's bag-of-target-tokens loss differs from FT-M's teacher-forced one). Two requests in
batches of one (the reference's padding conventions then play no part), so each epoch takes
two Adam steps with one optimiser state.

Only `easyeditor/models/ft/{ft_main,ft_hparams}.py` and `easyeditor/util/{nethook,device,
hparams}.py` are imported, from the path given: the package `__init__` files (which import
every method and their dependencies) are replaced by empty packages with the checkout's
directories as their path. Nothing else is patched; the checkout is never copied here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
OUT = GOLDENS / "methods" / "ft"

REQUESTS = [
    {"prompt": "The Eiffel Tower is in", "target_new": "Rome"},
    {"prompt": "The Louvre is in", "target_new": "Oslo"},
]
COMMON = dict(layers=[1], num_steps=4, lr=1e-2, weight_decay=0.0, batch_size=1)
CASES = {
    "ft_l": dict(objective_optimization="prompt_last", norm_constraint=2e-2, **COMMON),
    "ft_m": dict(objective_optimization="target_new", norm_constraint=False, **COMMON),
}


def import_reference(ref: Path) -> types.ModuleType:
    """easyeditor.models.ft.ft_main from `ref`, without running the package __init__ files."""
    for name, sub in [
        ("easyeditor", ""),
        ("easyeditor.util", "util"),
        ("easyeditor.models", "models"),
        ("easyeditor.models.ft", "models/ft"),
    ]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(ref / "easyeditor" / sub)]
        sys.modules[name] = pkg
    return importlib.import_module("easyeditor.models.ft.ft_main")


def reference_case(ref: Path, case: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    ft_main = import_reference(ref)
    d = GOLDENS / "llama"
    model = AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), model_input_names=["input_ids", "attention_mask"]
    )
    tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"
    hp = ft_main.FTHyperParams(
        kl_factor=0,
        rewrite_module_tmp="model.layers.{}.mlp.down_proj.weight",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="lm_head",
        device="cpu",
        alg_name="FT",
        model_name="tiny-llama",
        **CASES[case],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        deltas = ft_main.execute_ft(model, tok, [dict(r) for r in REQUESTS], hp)
    (name,) = deltas
    assert name == f"model.layers.{CASES[case]['layers'][0]}.mlp.down_proj.weight", name
    return deltas[name].numpy().T.astype(np.float32)  # torch [D, F] -> jaxedit [F, D]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="an EasyEdit checkout (zjunlp/EasyEdit)")
    ap.add_argument("--commit", default=None, help="the checkout's commit, for the record")
    args = ap.parse_args()
    import torch
    import transformers

    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        delta_w = reference_case(args.reference, case)
        meta = {
            "reference": "zjunlp/EasyEdit easyeditor/models/ft/ft_main.py execute_ft",
            "commit": args.commit,
            "model": "tests/goldens/llama",
            "requests": REQUESTS,
            "hparams": CASES[case],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        np.savez(OUT / f"{case}.npz", delta_w=delta_w, meta=np.asarray(json.dumps(meta)))
        print(case, "|dW|max", float(np.abs(delta_w).max()), "‖dW‖", float(np.linalg.norm(delta_w)))


if __name__ == "__main__":
    main()
