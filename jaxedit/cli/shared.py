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
    return _load(args.model, getattr(args, "dtype", "float32"))


def top_table(rows: list[dict]) -> str:
    return "\n".join(f"  {r['prob']:8.4f}  {r['token']!r}" for r in rows)


class SharedFlags:
    """Lets several methods add their flags to one parser: a flag already defined is skipped
    (e.g. `--hparams` used by both ROME and MEND is defined once)."""

    def __init__(self, parser: argparse.ArgumentParser, group):
        self._parser, self._group = parser, group

    def add_argument(self, *names, **kw):
        if any(n in self._parser._option_string_actions for n in names if n.startswith("-")):
            return None
        return self._group.add_argument(*names, **kw)

    def __getattr__(self, name):  # add_argument_group, add_mutually_exclusive_group, ...
        return getattr(self._group, name)
