"""Editing methods, one module each, all speaking the protocol of `jaxedit.methods.base`.

    jaxedit.methods.names()        # ["alphaedit", "emmet", "ft", "ike", "instructedit", ...]
    jaxedit.methods.get("rome")    # an EditMethod: hparams / prepare / compute

Modules are imported on first use, so importing jaxedit does not import every method.
"""

from __future__ import annotations

import importlib

from jaxedit.errors import InputError
from jaxedit.methods.base import EditMethod

REGISTRY = {
    "alphaedit": "jaxedit.methods.alphaedit",
    "emmet": "jaxedit.methods.emmet",
    "ft": "jaxedit.methods.ft",
    "ike": "jaxedit.methods.ike",
    "instructedit": "jaxedit.methods.instructedit",
    "memit": "jaxedit.methods.memit",
    "mend": "jaxedit.methods.mend",
    "none": "jaxedit.methods.none",
    "rome": "jaxedit.methods.rome",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> EditMethod:
    if name not in REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {', '.join(names())}")
    return importlib.import_module(REGISTRY[name]).METHOD


__all__ = ["EditMethod", "REGISTRY", "get", "names"]
