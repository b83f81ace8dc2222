"""Registry of editing methods, so `jaxedit edit` / `jaxedit eval` dispatch without knowing them.

A method is a pure function `(lm, requests, hparams) -> EditResult`: it returns new params (or,
for in-context methods, a context to prepend) and a small record; the input model is untouched.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxedit.errors import InputError
from jaxedit.models.lm import LanguageModel


@dataclass(frozen=True)
class EditResult:
    model: LanguageModel  # the edited model (same params for in-context methods)
    record: Any = None  # method-specific: rank-one factors, demonstrations, ...
    context: str | None = None  # in-context methods: text prepended to every query
    summary: dict | None = None  # JSON-able, e.g. {"layer": 5, "norm": 1.3}


@dataclass(frozen=True)
class Method:
    name: str
    # add CLI arguments (e.g. --hparams, --editor, --demos) to a parser
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # (lm, parsed args) -> editor: (lm, [requests]) -> EditResult.  Preparation that is
    # expensive and shared across edits (statistics, a trained editor) happens here, once.
    prepare: Callable[[LanguageModel, argparse.Namespace], Callable[..., EditResult]]
    batch: bool = False  # edits many requests at once (MEMIT-style)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    import importlib

    # Each algorithm module registers itself on import.
    for name in ("jaxedit.methods.rome", "jaxedit.methods.mend.editor", "jaxedit.methods.ike"):
        importlib.import_module(name)


def _none_prepare(lm: LanguageModel, args: argparse.Namespace):
    return lambda lm_, requests: EditResult(model=lm_, summary={})


register(Method("none", lambda p: None, _none_prepare))
