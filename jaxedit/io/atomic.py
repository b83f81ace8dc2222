"""Files written whole or not at all, with the permissions of any other file the user makes.

Everything a user keeps (exported models, edits, statistics and target caches, evaluation
results) is written to a temporary name beside its target and renamed into place (`os.replace`
is atomic within a directory), so a reader or a crash never sees half a file. `mkstemp` and
`mkdtemp` create their temporaries 0600 / 0700 (private, for good reason while they are
temporary); a file that is kept gets the mode `open()` would have given it instead: 0666 /
0777 less the umask, i.e. 0644 / 0755 under the usual umask 022.

Output directories: `check_out_dir` refuses an existing, non-empty `--out` unless the command
was told to `--resume` or `--force`; `remove_new_empty_dirs` takes away the directories a
failed command created and left empty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxedit.errors import InputError


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What `open(path, "w")` gives a new file: 0666 less the umask (0644 usually)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """What `mkdir` gives a new directory: 0777 less the umask (0755 usually)."""
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any library: safetensors, numpy, a
    figure); on a clean exit it gets `mode` (default `file_mode()`) and replaces `path`; on an
    error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` so that a reader (or a crash) never sees a half-written file."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; on a clean exit it becomes `path` (which
    must not exist or be empty) with `dir_mode()`; on an error it is removed."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, dir_mode())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(
    path: str | os.PathLike,
    *,
    resume: bool = False,
    force: bool = False,
    flag: str = "--out",
    resumable: bool = True,
    forceable: bool = True,
) -> None:
    """Refuse to write into an existing, non-empty output directory unless told to continue the
    run in it (`--resume`) or to overwrite it (`--force`); the message names the flags the
    command has (`resumable`, `forceable`)."""
    out = Path(path)
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise InputError(f"{flag} {out} exists and is not a directory")
    if resume or not any(out.iterdir()):
        return
    how = ["--resume to continue it"] * resumable + ["--force to overwrite"] * forceable
    raise InputError(
        f"{flag} {out} exists and is not empty ({', '.join([*how, f'or choose another {flag}'])})"
    )


def remove_new_empty_dirs(paths: Iterable[str | os.PathLike]) -> None:
    """Remove each directory in `paths` (ones a failed command created) if it holds no file:
    a failure leaves no empty output directory behind, and never removes anything written."""
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            continue
        if any(f.is_file() or f.is_symlink() for f in p.rglob("*")):
            continue
        shutil.rmtree(p, ignore_errors=True)


def first_new_dir(path: str | os.PathLike) -> Path | None:
    """The outermost directory of `path` that does not exist yet (`path` itself, or the first
    missing parent that creating it would make), None when `path` exists: what a failure must
    remove to leave nothing behind (`runs/eval/x` in an empty directory: `runs`)."""
    p = Path(path).absolute()
    if p.exists():
        return None
    while not p.parent.exists():
        p = p.parent
    return p
