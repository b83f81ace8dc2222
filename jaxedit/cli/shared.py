"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import functools

from jaxedit.io.checkpoint import load
from jaxedit.models.lm import LanguageModel


@functools.lru_cache(maxsize=2)
def _load(name: str, dtype: str) -> LanguageModel:
    return load(name, dtype=dtype)


def load_model(args: argparse.Namespace) -> LanguageModel:
    return _load(args.model, getattr(args, "model_dtype", "float32"))


def top_table(rows: list[dict]) -> str:
    return "\n".join(f"  {r['prob']:8.4f}  {r['token']!r}" for r in rows)
