"""One hyperparameter loader for every method: presets are package data, `<method>/<preset>.json`.

`load(method, cls, source, **overrides)` builds the method's frozen dataclass from

- a JSON file path (any name ending in `.json` that exists),
- a preset name of that method (`jaxedit/hparams/<method>/<name>.json`), or
- a model: a `LanguageModel`, or the name it was loaded by (embedded name, hub id, HF
  directory, GGUF file). **The rule**: the model's identifier is lower-cased, a trailing `/`
  and a `.gguf` suffix dropped, and looked up — the whole identifier first, then its last path
  component — in `models.json`, which lists for each preset the hub ids and file names of the
  checkpoints it was written for (exact matches only: no prefix guessing). An HF directory
  whose own name is unknown is looked up by its `config.json`'s `_name_or_path`.
  A model whose preset this method does not ship is an error naming the presets; values are
  never borrowed from another model. A loaded model that matches no preset gets ROME hparams
  chosen for it (`jaxedit.methods.common.auto_hparams`: the layer from a causal trace of facts
  it knows, cached per model); for other methods that is an error naming the presets.

Unknown keys are refused, in files and in overrides alike. Keys starting with "_", and
"description", "note" and "model", are documentation. JSON lists become tuples, and an
integer given for a float field becomes a float.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from jaxedit.errors import ConfigError, InputError

ROOT = Path(__file__).parent
T = TypeVar("T")
DOC_KEYS = ("description", "note", "model")


def presets(method: str) -> list[str]:
    """Names of the presets shipped for `method`."""
    return sorted(p.stem for p in (ROOT / method).glob("*.json"))


def preset_path(method: str, name: str) -> Path | None:
    p = ROOT / method / f"{name}.json"
    return p if p.is_file() else None


def model_presets() -> dict[str, list[str]]:
    """preset name -> the model identifiers it is written for (`models.json`)."""
    return {
        k: v
        for k, v in json.loads((ROOT / "models.json").read_text()).items()
        if not k.startswith("_")
    }


def normalise_model_id(name: str) -> str:
    key = str(name).strip().lower().rstrip("/")
    return key[: -len(".gguf")] if key.endswith(".gguf") else key


def preset_for_model(model: Any) -> str:
    """The preset name a model maps to by the rule above; InputError when none."""
    name = str(getattr(model, "name", model))
    candidates = [normalise_model_id(name), normalise_model_id(Path(name).name)]
    hf_config = Path(name) / "config.json"
    if hf_config.is_file():
        try:
            declared = json.loads(hf_config.read_text()).get("_name_or_path")
        except (OSError, json.JSONDecodeError):
            declared = None
        if declared:
            candidates += [normalise_model_id(declared), normalise_model_id(Path(declared).name)]
    for preset, ids in model_presets().items():
        known = {normalise_model_id(i) for i in ids} | {preset}
        if any(c in known for c in candidates):
            return preset
    raise InputError(
        f"no hyperparameter preset for model {name!r}: known models are listed in "
        f"{ROOT / 'models.json'}; pass a JSON file or a preset name"
    )


def read(method: str, source: Any) -> tuple[dict[str, Any], str]:
    """(raw dict, where it came from) for a JSON path, a preset name or a model."""
    text = str(getattr(source, "name", source))  # a LanguageModel by the name it was loaded by
    path = Path(text).expanduser()
    if text.endswith(".json") and path.is_file():
        return _read_json(path), str(path)
    p = preset_path(method, text)
    if p is None:
        if text.endswith(".json"):
            raise InputError(f"{method} hparams file {text!r} does not exist")
        try:
            preset = preset_for_model(source)
        except InputError:
            auto = _automatic(method, source)
            if auto is None:
                raise
            return auto
        p = preset_path(method, preset)
        if p is None:
            raise InputError(
                f"model {text!r} maps to preset {preset!r}, but {method} has no such preset "
                f"(its presets: {presets(method)}); pass a JSON file"
            )
    return _read_json(p), str(p)


def _automatic(method: str, source: Any) -> tuple[dict[str, Any], str] | None:
    """Hparams chosen for a loaded model that no preset fits (`jaxedit.methods.common.
    auto_hparams`: ROME's layer from a causal trace), or None for a name or another method."""
    if not (hasattr(source, "config") and hasattr(source, "params")):
        return None
    from jaxedit.methods.common import auto_hparams

    if method not in auto_hparams.METHODS:
        return None
    return auto_hparams.raw_hparams(method, source), "automatic hparams (no preset)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: hparams must be a JSON object")
    return raw


def build(cls: type[T], raw: dict[str, Any], source: str = "<dict>") -> T:
    """`cls(**raw)` with unknown keys refused and JSON lists turned into tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    docs = {k for k in raw if k.startswith("_") or (k in DOC_KEYS and k not in fields)}
    unknown = sorted(set(raw) - fields - docs)
    if unknown:
        raise ConfigError(f"{source}: unknown hparams keys {unknown}; known: {sorted(fields)}")
    kw = coerce(cls, {k: v for k, v in raw.items() if k in fields})
    try:
        return cls(**kw)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{source}: {e}") from e


def load(method: str, cls: type[T], source: Any, **overrides: Any) -> T:
    """Hparams of `method` from a JSON path, a preset name or a model, then `overrides`."""
    raw, where = read(method, source)
    return build(cls, {**raw, **overrides}, f"{where} (+ overrides)" if overrides else where)


def override(hp: T, **overrides: Any) -> T:
    """`dataclasses.replace` that refuses unknown keys with the list of known ones."""
    fields = {f.name for f in dataclasses.fields(hp)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown {type(hp).__name__} keys {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(hp, **coerce(type(hp), overrides))


def coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """JSON lists -> tuples, and an integer written for a float field -> float (`"lr": 1`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        v = tuples(v)
        if isinstance(v, int) and not isinstance(v, bool) and _accepts_float(hints.get(k)):
            v = float(v)
        out[k] = v
    return out


def _accepts_float(hint) -> bool:
    if hint is float:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return float in args and int not in args
    return False


def parse_assignments(cls: type, assignments: list[str]) -> dict[str, Any]:
    """`["k=8", "demos=pool.json"]` -> {"k": 8, "demos": "pool.json"} typed by `cls`'s fields.

    A value is read as JSON (numbers, true/false, null, lists) unless the field is a string,
    then it is taken as written. Unknown keys are refused.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--set takes key=value, got {item!r}")
        if key not in hints:
            raise InputError(f"--set {key}: {cls.__name__} has no such key; known: {sorted(hints)}")
        out[key] = value if _is_str(hints[key]) else _json_or_str(value)
    return out


def _is_str(hint) -> bool:
    if hint is str:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args == [str]
    return False


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
