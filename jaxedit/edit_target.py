"""Which model a weight edit belongs to: written into the edit when it is made, checked before
it is applied or undone.

An edit saved by `jaxedit edit --save-edit` carries, in its meta (`jaxedit.edits.save_edit`
writes meta into the file's JSON header), a `target` record:

    {"model": name, "fingerprint": the model's fingerprint (`LanguageModel.fingerprint`),
     "config": {family, n_layers, d_model, d_ff, vocab_size, dtype},
     "weights": {"mlp_out.4": {"shape": [F, D],
                               "before": {dtype: digest}, "after": {dtype: digest}}}}

A digest is sha256 over the dtype, shape and bytes of one weight matrix, before the edit (W)
and after it (W + ΔW as the edited model stores it). They are taken in the model's dtype and,
for a float32 model, of the bfloat16-rounded matrix too, so that a model loaded with
`--dtype bfloat16` from the same files is recognised. Only the matrices the edit changes are
hashed: cheap at any model size, and exactly what decides whether a delta belongs here.

`check(edit, lm, invert=False)` raises `CheckpointError` (one line) when a changed weight is
missing or of another shape, or its bytes are not the ones the edit was computed on (`after`
for `invert=True`: undoing an edit needs the edited model); `force=True` keeps only the
structural checks. An edit with no `target` (written by the Python API without `stamp`) is
refused unless forced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jaxedit.edits import WeightEdit
from jaxedit.errors import CheckpointError
from jaxedit.models.lm import LanguageModel
from jaxedit.models.sites import get_weight

TARGET_KEY = "target"


def digest(matrix) -> str:
    """sha256 (32 hex digits) over a matrix's dtype, shape and bytes."""
    a = np.ascontiguousarray(np.asarray(matrix))
    h = hashlib.sha256(f"{a.dtype.name}:{a.shape}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:32]


def _digests(matrix) -> dict[str, str]:
    """{dtype: digest} in the matrix's own dtype, plus bfloat16 for a float32 matrix."""
    import jax.numpy as jnp

    a = np.asarray(matrix)
    out = {a.dtype.name: digest(a)}
    if a.dtype == np.float32:
        out["bfloat16"] = digest(np.asarray(jnp.asarray(a).astype(jnp.bfloat16)))
    return out


def _weight(lm: LanguageModel, site: str, layer: int):
    """The [I O] weight of `site` at `layer`, or None when the model has no such weight."""
    if not 0 <= layer < lm.config.n_layers:
        return None
    try:
        return get_weight(lm.params, site, layer)
    except (KeyError, ValueError, IndexError):
        return None


def stamp(edit: WeightEdit, lm: LanguageModel, edited: LanguageModel) -> WeightEdit:
    """`edit` with its `target` record: `lm` is the model it was computed on, `edited` the model
    with it applied."""
    from jaxedit.stats.cache import model_fingerprint

    cfg = lm.config
    weights = {}
    for site, layer in edit.sites():
        w0, w1 = get_weight(lm.params, site, layer), get_weight(edited.params, site, layer)
        weights[f"{site}.{layer}"] = {
            "shape": list(np.shape(w0)),
            "before": _digests(w0),
            "after": _digests(w1),
        }
    target = {
        "model": lm.name,
        "fingerprint": model_fingerprint(lm),
        "config": {
            "family": cfg.family,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "vocab_size": cfg.vocab_size,
            "dtype": cfg.dtype,
        },
        "weights": weights,
    }
    return WeightEdit(edit.deltas, {**edit.meta, TARGET_KEY: target})


def check(
    edit: WeightEdit,
    lm: LanguageModel,
    *,
    invert: bool = False,
    force: bool = False,
    where: str | Path = "edit",
) -> str:
    """Refuse (`CheckpointError`, one line) an edit that does not belong to `lm`; returns how it
    was checked ("weights match" / "forced: ...")."""
    target = edit.meta.get(TARGET_KEY)
    made_for = f" (made for {target['model']})" if isinstance(target, dict) else ""
    for d in edit.deltas:
        w = _weight(lm, d.site, d.layer)
        if w is None:
            raise CheckpointError(
                f"{where}: changes {d.site}.{d.layer}, which {lm.name} does not have "
                f"({lm.config.n_layers} layers){made_for}"
            )
        if tuple(np.shape(w)) != tuple(d.shape):
            raise CheckpointError(
                f"{where}: its {d.site}.{d.layer} delta is {list(d.shape)}, the weight of "
                f"{lm.name} is {list(np.shape(w))}: an edit for another model{made_for}"
            )
    if force:
        return "forced: only the changed weights' shapes were checked"
    if not isinstance(target, dict) or not isinstance(target.get("weights"), dict):
        raise CheckpointError(
            f"{where}: the edit does not record the model it was made for (not written by "
            "`jaxedit edit --save-edit`); --force applies it anyway (shapes are checked)"
        )
    side = "after" if invert else "before"
    for key, rec in target["weights"].items():
        site, _, layer = key.rpartition(".")
        w = _weight(lm, site, int(layer))
        if w is None:
            raise CheckpointError(f"{where}: {lm.name} has no weight {key}{made_for}")
        have = np.asarray(w)
        got = digest(have)
        if got == rec.get(side, {}).get(have.dtype.name):
            continue
        other = "before" if invert else "after"
        if got == rec.get(other, {}).get(have.dtype.name):
            state = "is not applied: nothing to undo" if invert else "is already applied"
            raise CheckpointError(
                f"{where}: {key} of {lm.name} shows this edit {state}"
                + ("" if invert else " (--invert undoes it)")
            )
        raise CheckpointError(
            f"{where}: {key} of {lm.name} is not the weight this edit was "
            + ("applied to" if invert else "computed on")
            + f" (it was made for {target.get('model')}, fingerprint {target.get('fingerprint')});"
            " --force applies it anyway"
        )
    return "weights match"
