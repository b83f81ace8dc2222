"""A file cache of optimised target values, so that a long batch edit survives a crash and
several runs on the same model share their z's (kmeng01/memit caches them per case too).

One `.npz` per (model, site, layer, templates, settings, KL prompts, request), named by the
sha256 of all of them: an edited model has another fingerprint, so a later round of lifelong
editing never reads a z optimised on an earlier model. Files are written atomically and
checked on reading (key, shapes, finite values); anything wrong is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxedit.io.atomic import write_bytes_atomic
from jaxedit.methods.common.target_opt import TargetSettings, TargetValue
from jaxedit.models.lm import LanguageModel
from jaxedit.stats import model_fingerprint

VERSION = 1
FIELDS = [f.name for f in dataclasses.fields(TargetValue)]


def cache_key(
    lm: LanguageModel,
    site: str,
    layer: int,
    templates: Sequence[str],
    settings: TargetSettings,
    kl_prompts: Sequence[str],
    request,
) -> str:
    key = {
        "version": VERSION,
        "model": model_fingerprint(lm),
        "site": site,
        "layer": int(layer),
        "templates": list(templates),
        "settings": dataclasses.asdict(settings),
        "kl_prompts": list(kl_prompts),
        "request": [request.prompt, request.subject, request.target_new],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path, key: str, width: int) -> TargetValue | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            tv = json.loads(str(z["scalars"]))
            v0, delta = np.asarray(z["v0"], np.float64), np.asarray(z["delta"], np.float64)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if v0.shape != (width,) or delta.shape != (width,):
        return None
    if not (np.isfinite(v0).all() and np.isfinite(delta).all()):
        return None
    try:
        return TargetValue(v0=v0, delta=delta, **tv)
    except TypeError:
        return None


def _write(path: Path, key: str, tv: TargetValue) -> None:
    scalars = {f: getattr(tv, f) for f in FIELDS if f not in ("v0", "delta")}
    scalars = {k: v.item() if hasattr(v, "item") else v for k, v in scalars.items()}
    buf = io.BytesIO()
    np.savez(
        buf, key=np.array(key), scalars=np.array(json.dumps(scalars)), v0=tv.v0, delta=tv.delta
    )
    write_bytes_atomic(path, buf.getvalue())


def cached_target_values(
    cache_dir: str | os.PathLike | None,
    compute: Callable[[list], list[TargetValue]],
    lm: LanguageModel,
    site: str,
    layer: int,
    requests: Sequence,
    templates: Sequence[str],
    settings: TargetSettings,
    kl_prompts: Sequence[str],
) -> tuple[list[TargetValue], int]:
    """Target values of `requests`, computing (`compute(missing_requests)`) only the ones not
    in `cache_dir` (None: no cache). Returns them in order and the number of cache hits."""
    if cache_dir is None:
        return compute(list(requests)), 0
    root = Path(cache_dir)
    keys = [cache_key(lm, site, layer, templates, settings, kl_prompts, r) for r in requests]
    found = [_read(root / f"{k}.npz", k, lm.config.d_model) for k in keys]
    missing = [i for i, tv in enumerate(found) if tv is None]
    if missing:
        # in chunks, written as they come: a crash loses at most one chunk
        step = 64
        for lo in range(0, len(missing), step):
            idx = missing[lo : lo + step]
            for i, tv in zip(idx, compute([requests[i] for i in idx]), strict=True):
                _write(root / f"{keys[i]}.npz", keys[i], tv)
                found[i] = tv
    return found, len(requests) - len(missing)
