"""The method protocol, as optax shapes a transformation: explicit state, pure compute.

    m = jaxedit.methods.get("rome")
    hp = m.hparams("smollm2-135m", **overrides)   # preset name, JSON path or model
    state = m.prepare(lm, hp)                     # expensive, cacheable: statistics, editor, pool
    edit, info = m.compute(lm, state, [EditRequest(prompt, subject, target)])
    lm2 = jaxedit.apply(lm, edit)

`prepare` and `compute` never change `lm`; `compute` returns an `Edit` (data: a weight edit or
a context edit) and a JSON-able `info` dict. Every method module defines one `METHOD`.

Lifelong (sequential) editing goes round by round through `step`, which also returns the state
the next round starts from:

    for requests in rounds:
        edit, info, state = m.step(lm, state, requests)
        lm = jaxedit.apply(lm, edit)

A method whose rounds depend on earlier rounds (AlphaEdit: the keys edited so far, a round
count) sets `step_fn`; for every other method `step` is `compute` with the state unchanged.
The sequential part of a state goes to a file and back with `save_state(state, path)` /
`load_state(fresh_state, path)` (a resumable lifelong run): `load_state` receives the state a
fresh `prepare` gave and refuses a file written for another model or configuration. Without
`save_state_fn` / `load_state_fn` nothing is written and the fresh state is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    """A named editing method: its hparams dataclass, its two pure functions and, for lifelong
    editing, an optional round step and state file functions."""

    name: str
    hparams_cls: type[HP]
    prepare_fn: Callable[[LanguageModel, HP, PrepareOptions], State]
    compute_fn: Callable[[LanguageModel, State, list[EditRequest]], tuple[Edit, dict]]
    summary: str = ""
    # The hparams when no preset applies (method-level defaults that depend on no model, e.g.
    # "none"); None means presets, a JSON file or explicit fields are required.
    default_hparams: Callable[[], HP] | None = None
    # One round of lifelong editing with the state carried to the next round; None: `compute`
    # with the state unchanged (a stateless method).
    step_fn: (
        Callable[[LanguageModel, State, list[EditRequest]], tuple[Edit, dict, State]] | None
    ) = None
    # The sequential part of a state to a file and back (None: nothing to save / restore).
    save_state_fn: Callable[[State, Path], None] | None = None
    load_state_fn: Callable[[State, Path], State] | None = None

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
        """One edit of `lm` for `requests` (stateless: `state` is only read)."""
        return self.compute_fn(lm, state, _checked(requests))

    def step(
        self, lm: LanguageModel, state: State, requests: Sequence[EditRequest]
    ) -> tuple[Edit, dict, State]:
        """One round of lifelong editing: (edit, info, the state of the next round).

        `lm` is the model edited by every earlier round; apply the edit to it before the next
        round. Without `step_fn`: `compute`, and the state is returned unchanged.
        """
        requests = _checked(requests)
        if self.step_fn is None:
            edit, info = self.compute_fn(lm, state, requests)
            return edit, info, state
        return self.step_fn(lm, state, requests)

    def save_state(self, state: State, path: str | Path) -> None:
        """Write the sequential part of `state` to `path` (no-op without `save_state_fn`)."""
        if self.save_state_fn is not None:
            self.save_state_fn(state, Path(path))

    def load_state(self, state: State, path: str | Path) -> State:
        """`state` (freshly prepared) with its sequential part read back from `path`; the
        method refuses a file of another model or configuration. Without `load_state_fn`:
        `state` itself."""
        if self.load_state_fn is None:
            return state
        return self.load_state_fn(state, Path(path))


def _checked(requests: Sequence[EditRequest]) -> list[EditRequest]:
    requests = list(requests)
    if not requests:
        raise InputError("no edit requests")
    if not all(isinstance(r, EditRequest) for r in requests):
        raise InputError("requests must be jaxedit.EditRequest instances")
    return requests
