"""A method's command-line settings come from its hparams dataclass, never from argparse code
inside the method: `--method NAME [--hparams PRESET|FILE] [--set key=value ...]`.

Without `--hparams` the preset is found from the model by the rule in `jaxedit.hparams`.
`--set` values are typed by the dataclass fields (`--set k=32 --set demos=pool.json`).
`--editor DIR` and `--task NAME` are `--set editor=DIR` / `--set task=NAME` for the methods
whose hparams have those fields (MEND, InstructEdit); others refuse them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jaxedit import hparams as hparams_lib
from jaxedit import methods
from jaxedit.methods.base import EditMethod
from jaxedit.models.lm import LanguageModel


def add_method_arguments(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--method",
        default=default,
        choices=methods.names(),
        help=f"editing method (default {default})",
    )
    p.add_argument(
        "--hparams",
        default=None,
        help="preset name or JSON file (default: the model's preset, see jaxedit/hparams)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="hparam_overrides",
        help="override one hparams field, e.g. --set layer=5 --set demos=pool.json (repeatable)",
    )
    p.add_argument("--cache-dir", default=None, help="statistics / embedding cache directory")
    p.add_argument(
        "--editor", default=None, metavar="DIR", help="trained editor (mend, instructedit)"
    )
    p.add_argument(
        "--task", default=None, help="instructedit: the task of every request (default: the data's)"
    )


def method_and_hparams(args: argparse.Namespace, lm: LanguageModel) -> tuple[EditMethod, Any]:
    """The method named by --method and its hparams (preset or file, then --set overrides)."""
    m = methods.get(args.method)
    overrides = hparams_lib.parse_assignments(m.hparams_cls, args.hparam_overrides)
    for name in ("editor", "task"):  # unknown keys of this method are refused by the loader
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if args.hparams is not None:
        return m, m.hparams(args.hparams, **overrides)
    if m.default_hparams is not None:
        return m, m.hparams(None, **overrides)
    return m, m.hparams(lm, **overrides)


def hparams_json(hp: Any) -> dict:
    """The hparams as a JSON-able dict (results files record exactly what ran)."""
    return dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else {}
