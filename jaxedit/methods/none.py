"""The unedited baseline as a method: an empty weight edit (what `jaxedit eval` compares to)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxedit.edits import WeightEdit
from jaxedit.methods.base import EditMethod


@dataclass(frozen=True)
class NoneHparams:
    """No settings."""


METHOD = EditMethod(
    name="none",
    hparams_cls=NoneHparams,
    prepare_fn=lambda lm, hp, opts: None,
    compute_fn=lambda lm, state, requests: (WeightEdit((), {"method": "none"}), {}),
    summary="no edit (the baseline)",
    default_hparams=NoneHparams,
)
