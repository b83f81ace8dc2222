"""Hyperparameter presets shipped as data files: `jaxedit/hparams/<method>/<name>.json`.

A preset holds logical settings only (layer, steps, learning rate, ...; never module paths or
devices). `load(method, name_or_path, cls)` reads a preset by name or any JSON file and builds
the method's frozen dataclass; unknown keys are refused, so a typo never passes silently.
Keys starting with "_" and the key "description" are documentation and are skipped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from jaxedit.errors import ConfigError, InputError

ROOT = Path(__file__).parent
T = TypeVar("T")


def presets(method: str) -> list[str]:
    """Names of the presets shipped for `method`."""
    return sorted(p.stem for p in (ROOT / method).glob("*.json"))


def preset_path(method: str, name: str) -> Path | None:
    p = ROOT / method / f"{name}.json"
    return p if p.is_file() else None


def read(method: str, name_or_path: str) -> tuple[dict[str, Any], str]:
    """(raw dict, source) of a preset name or a JSON file path."""
    path = preset_path(method, name_or_path)
    if path is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise InputError(
                f"no {method} hparams {name_or_path!r}: not a preset ({presets(method)}) "
                "or an existing JSON file"
            )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: hparams must be a JSON object")
    return raw, str(path)


def build(cls: type[T], raw: dict[str, Any], source: str = "<dict>") -> T:
    """`cls(**raw)` with unknown keys refused and JSON lists turned into tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = {k for k in raw if k.startswith("_") or k == "description"}
    unknown = sorted(set(raw) - set(fields) - docs)
    if unknown:
        raise ConfigError(f"{source}: unknown hparams keys {unknown}; known: {sorted(fields)}")
    kw = {k: _tuples(v) for k, v in raw.items() if k in fields}
    if "description" in fields and "description" in raw:
        kw["description"] = raw["description"]
    try:
        return cls(**kw)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{source}: {e}") from e


def load(method: str, name_or_path: str, cls: type[T]) -> T:
    raw, source = read(method, name_or_path)
    return build(cls, raw, source)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v
