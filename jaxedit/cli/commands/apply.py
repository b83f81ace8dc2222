"""jaxedit apply: apply (or undo) a saved weight edit and save the model.

    jaxedit edit --model M --prompt ... --save-edit e.safetensors    # the edit alone
    jaxedit apply e.safetensors --model M --save M-edited            # M + ΔW
    jaxedit apply e.safetensors --model M-edited --invert --save M2  # M-edited − ΔW = M

The edit file is what `jaxedit edit --save-edit` writes (`jaxedit.edits.save_edit`); it records
the model it was made for and the digests of the weights it changes before and after
(`jaxedit.edit_target`). Before anything is loaded beyond the model, the edit is checked: a
delta for a weight the model lacks or of another shape, or for other weights than the model's
(for `--invert`: than the edited model's), is refused with one line; `--force` keeps only the
shape checks. A context edit (IKE) changes no weight and is refused. The model is written as an
HF directory (`jaxedit.io.checkpoint.save_hf`, atomic).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxedit.cli.shared import load_model
from jaxedit.edit_target import check
from jaxedit.edits import WeightEdit, apply, load_edit
from jaxedit.errors import InputError
from jaxedit.io.checkpoint import save_hf

NAME = "apply"
HELP = "apply (or --invert) an edit saved by `jaxedit edit --save-edit` and save the model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("edit_file", metavar="EDIT_FILE", help="the edit (jaxedit edit --save-edit)")
    p.add_argument("--save", required=True, metavar="DIR", help="write the model here (HF dir)")
    p.add_argument("--invert", action="store_true", help="undo the edit instead (on --model)")
    p.add_argument(
        "--force",
        action="store_true",
        help="skip the check that --model is the model the edit was made for (shapes still "
        "checked)",
    )


def run(args) -> dict:
    save = Path(args.save)
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise InputError(f"--save {save}: exists and is not an empty directory")
    path = Path(args.edit_file)
    if not path.is_file():
        raise InputError(f"{path}: edit file not found")
    edit = load_edit(path)
    if not isinstance(edit, WeightEdit):
        raise InputError(f"{path}: a context edit (IKE) changes no weight: no model to save")
    if not edit.deltas:
        raise InputError(f"{path}: the edit changes no weight")
    lm = load_model(args)
    how = check(edit, lm, invert=args.invert, force=args.force, where=path)
    edited = apply(lm, edit.invert() if args.invert else edit)
    saved = save_hf(edited, save)
    return {
        "edit": str(path),
        "model": lm.name,
        "inverted": bool(args.invert),
        "weights": [f"{site}.{layer}" for site, layer in edit.sites()],
        "norm": edit.norm(),
        "method": edit.meta.get("method"),
        "made_for": (edit.meta.get("target") or {}).get("model"),
        "check": how,
        "saved": str(saved),
    }


def render(r: dict) -> str:
    verb = "undid" if r["inverted"] else "applied"
    made = f" (made for {r['made_for']})" if r["made_for"] else ""
    return (
        f"{verb} {r['method'] or 'the'} edit {r['edit']}{made} on {r['model']}: "
        f"{', '.join(r['weights'])}, |ΔW| = {r['norm']:.4g}; {r['check']}\n"
        f"  saved: {r['saved']}"
    )
