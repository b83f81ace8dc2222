"""Text files a user gives us (data sets, facts, corpora, snippets) read as UTF-8, or refused
with one line naming the file, the line and the byte that is not UTF-8 — never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

from jaxedit.errors import InputError


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """The file's text (UTF-8; a leading byte-order mark is dropped). `what` names the file's
    role in the message ("data file", "facts", ...)."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{what + ' ' if what else ''}{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
            f"line {line}, offset {e.start}); save it as UTF-8"
        ) from None
