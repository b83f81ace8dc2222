"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import functools

from jaxedit.io.checkpoint import load
from jaxedit.models.lm import LanguageModel


@functools.lru_cache(maxsize=2)
def _load(name: str, dtype: str, mesh: str | None) -> LanguageModel:
    # On a mesh, safetensors stream each device's blocks straight into their sharded layout (no
    # host copy of the model) and the file-based fingerprint is kept; every command then takes
    # the sharded model as it is: jitted code follows the params' shardings, and edits keep
    # them (`jaxedit.models.sharding`).
    return load(name, dtype=dtype, mesh=mesh)


def load_model(args: argparse.Namespace) -> LanguageModel:
    """The model of `--model` in `--dtype` (default float32), sharded over `--mesh` when given
    (a mesh that does not match the devices is a `ConfigError`, raised before loading)."""
    mesh = getattr(args, "mesh", None) or None
    if mesh is not None:
        from jaxedit.models.sharding import make_mesh

        make_mesh(mesh)  # a bad spec fails here, before minutes of loading
    return _load(args.model, getattr(args, "model_dtype", "float32"), mesh)


def top_table(rows: list[dict]) -> str:
    return "\n".join(f"  {r['prob']:8.4f}  {r['token']!r}" for r in rows)
