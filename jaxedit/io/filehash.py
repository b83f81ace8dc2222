"""Content hashes of checkpoint files, computed once per file version.

`content_hash(path)` is the sha256 of the file's bytes. Reading a 16 GB checkpoint takes
tens of seconds, so each hash is remembered under the file's resolved path, size and mtime
(nanoseconds), in memory and in `<jaxedit cache root>/file_hashes.json` (written atomically;
two processes racing only recompute). A file rewritten in place gets a new mtime and is hashed
again; a stale entry is never used, since all three must match.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jaxedit.io.atomic import write_text_atomic

CACHE_NAME = "file_hashes.json"
Stamp = tuple[str, int, int]  # resolved path, size, mtime_ns

_memo: dict[Stamp, str] = {}


def stamp(path: str | os.PathLike) -> Stamp:
    """What identifies a version of a file without reading it."""
    p = Path(path).resolve()
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns)


def default_cache_file() -> Path:
    """`file_hashes.json` beside the statistics cache ($JAXEDIT_CACHE, else XDG, else ~)."""
    from jaxedit.stats.cache import default_cache_dir

    return Path(default_cache_dir()).parent / CACHE_NAME


def _read(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the file's bytes, from the cache when path, size and mtime match."""
    key = stamp(path)
    if key in _memo:
        return _memo[key]
    cache_file = Path(cache_file) if cache_file is not None else default_cache_file()
    entry = _read(cache_file).get(key[0])
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == list(key[1:]):
        digest = str(entry.get("sha256"))
    else:
        digest = sha256_file(key[0])
        if stamp(path) != key:  # rewritten while we read it: nothing to remember
            return digest
        entries = _read(cache_file)  # re-read: another process may have added entries
        entries[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_file, json.dumps(entries, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache directory costs a re-hash next time, nothing else
    _memo[key] = digest
    return digest
