"""The method protocol, as optax shapes a transformation: explicit state, pure compute.

    m = jaxedit.methods.get("rome")
    hp = m.hparams("smollm2-135m", **overrides)   # preset name, JSON path or model
    state = m.prepare(lm, hp)                     # expensive, cacheable: statistics, editor, pool
    edit, info = m.compute(lm, state, [EditRequest(prompt, subject, target)])
    lm2 = jaxedit.apply(lm, edit)

`prepare` and `compute` never change `lm`; `compute` returns an `Edit` (data: a weight edit or
a context edit) and a JSON-able `info` dict. Every method module defines one `METHOD`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from jaxedit import hparams as hparams_lib
from jaxedit.edits import Edit
from jaxedit.errors import InputError
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest

HP = TypeVar("HP")
State = Any


@dataclass(frozen=True)
class PrepareOptions:
    """Where caches live and whether to show progress: how, not what, to prepare."""

    cache_dir: str | None = None
    progress: bool = False


@dataclass(frozen=True)
class EditMethod(Generic[HP]):
    """A named editing method: its hparams dataclass and its two pure functions."""

    name: str
    hparams_cls: type[HP]
    prepare_fn: Callable[[LanguageModel, HP, PrepareOptions], State]
    compute_fn: Callable[[LanguageModel, State, list[EditRequest]], tuple[Edit, dict]]
    summary: str = ""
    # The hparams when no preset applies (method-level defaults that depend on no model, e.g.
    # "none"); None means presets, a JSON file or explicit fields are required.
    default_hparams: Callable[[], HP] | None = None

    def hparams(self, source: Any = None, /, **overrides: Any) -> HP:
        """Hparams from a preset name, a JSON file or a model (`jaxedit.hparams` rule)."""
        if source is None:
            if self.default_hparams is None:
                raise InputError(
                    f"{self.name}: name a preset ({hparams_lib.presets(self.name)}), "
                    "a JSON file or the model"
                )
            return hparams_lib.override(self.default_hparams(), **overrides)
        return hparams_lib.load(self.name, self.hparams_cls, source, **overrides)

    def prepare(
        self, lm: LanguageModel, hp: HP, *, cache_dir: str | None = None, progress: bool = False
    ) -> State:
        if not isinstance(hp, self.hparams_cls):
            raise InputError(
                f"{self.name} needs {self.hparams_cls.__name__}, not {type(hp).__name__}"
            )
        return self.prepare_fn(lm, hp, PrepareOptions(cache_dir, progress))

    def compute(
        self, lm: LanguageModel, state: State, requests: Sequence[EditRequest]
    ) -> tuple[Edit, dict]:
        requests = list(requests)
        if not requests:
            raise InputError("no edit requests")
        if not all(isinstance(r, EditRequest) for r in requests):
            raise InputError("requests must be jaxedit.EditRequest instances")
        return self.compute_fn(lm, state, requests)
