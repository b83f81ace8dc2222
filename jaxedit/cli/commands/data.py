"""jaxedit data: the registered data sets (`jaxedit.eval.datasets.registry`).

    jaxedit data list                         # name, records, size, licence, checksum, source
    jaxedit data get counterfact [--dir D]    # download, verify, keep (atomic)
    jaxedit data get counterfact --from FILE  # a file downloaded by hand: verify and keep it
    jaxedit data path counterfact             # the cached file (for scripts)

Every data argument of the other commands (`--data`, `--requests`, `--known-facts`, and IKE's
pool `--set demos=`) accepts a registered name as well as a path, also inside a comma-separated
list (`resolve_data_args`, called by `jaxedit.cli.main`); an existing path always wins over a
name.
"""

from __future__ import annotations

import argparse
import os

from jaxedit import progress
from jaxedit.errors import InputError
from jaxedit.eval.datasets import registry

NAME = "data"
HELP = "list, download and verify the editing data sets (CounterFact, zsRE, KnowEdit, MQuAKE, …)"

# argparse dest -> the flag as the user wrote it (for messages)
DATA_ARGS = {"data": "--data", "requests": "--requests", "known_facts": "--known-facts"}
# hparams fields that name a data file, set with `--set FIELD=...` (IKE's demonstration pool)
DATA_FIELDS = ("demos",)


def resolve_data_args(args: argparse.Namespace) -> None:
    """Replace each registered data-set name among `args`' data arguments by its cached file
    (a name not downloaded yet is an `InputError` naming `jaxedit data get` and the URL)."""
    if getattr(args, "command", None) == NAME:
        return
    for dest, flag in DATA_ARGS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str):
            continue
        if "," in value and not os.path.exists(value):  # a list (mend-train --data a,b)
            value = ",".join(registry.resolve(v, flag) for v in value.split(","))
        else:
            value = registry.resolve(value, flag)
        setattr(args, dest, value)
    sets = getattr(args, "hparam_overrides", None)
    if sets:
        args.hparam_overrides = [_resolve_assignment(a) for a in sets]


def _resolve_assignment(assignment: str) -> str:
    """`demos=counterfact-train` -> `demos=<its cached file>`; other `--set`s unchanged."""
    key, eq, value = assignment.partition("=")
    if not eq or key.strip() not in DATA_FIELDS:
        return assignment
    return f"{key}={registry.resolve(value.strip(), f'--set {key.strip()}=')}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "get", "path"), help="list | get NAME | path NAME")
    p.add_argument("name", nargs="?", help="a registered data set (see `jaxedit data list`)")
    p.add_argument(
        "--dir",
        default=None,
        help="keep the file here instead of the jaxedit cache (then pass its path)",
    )
    p.add_argument(
        "--from",
        dest="source_file",
        default=None,
        metavar="FILE",
        help="get: a copy downloaded by hand, verified against the checksum and kept",
    )
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")


def _row(e: registry.Entry, directory) -> dict:
    p = registry.local_path(e, directory)
    return {
        "name": e.name,
        "aliases": list(e.aliases),
        "title": e.title,
        "format": e.format,
        "records": e.records,
        "bytes": e.size,
        "licence": e.licence,
        "checksum": e.checksum,
        "sha256": e.sha256,
        "url": e.urls[0],
        "mirrors": list(e.urls[1:]),
        "path": str(p),
        "cached": registry.cached(e.name, directory) is not None,
    }


def run(args) -> dict:
    if args.action == "list":
        if args.name or args.source_file:
            raise InputError("data list takes no NAME or --from")
        return {"dir": str(args.dir or registry.data_dir()), "data": [
            _row(e, args.dir) for e in registry.ENTRIES
        ]}  # fmt: skip
    if not args.name:
        raise InputError(f"data {args.action} needs a NAME; registered: {registry.names()}")
    e = registry.get_entry(args.name)
    if args.action == "path":
        p = registry.cached(e.name, args.dir)
        if p is None:
            raise InputError(
                f"{e.name} is not downloaded: run `jaxedit data get {e.name}`, or "
                f"{registry.manual_route(e)}"
            )
        return {"name": e.name, "path": str(p)}
    got = registry.get(
        e.name,
        args.dir,
        source_file=args.source_file,
        progress=progress.shown(),  # the command line's rule: a terminal, no --no-progress
    )
    return {
        "name": e.name,
        "path": str(got.path),
        "source": got.source,
        "checksum": got.checksum,
        "downloaded": got.downloaded,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def render(r: dict) -> str:
    if "data" in r:
        lines = [f"registered data sets (cache: {r['dir']}; * = downloaded)"]
        for d in r["data"]:
            names = d["name"] + (f" ({', '.join(d['aliases'])})" if d["aliases"] else "")
            records = f"{d['records']:,}" if d["records"] else "?"
            lines += [
                f"{'*' if d['cached'] else ' '} {names:<34} {records:>7} records  "
                f"{_size(d['bytes']):>8}  {d['title']}",
                f"    source:  {d['url']}",
                f"    licence: {d['licence']}",
                f"    {d['checksum']}",
            ]
        lines.append("get one with `jaxedit data get NAME`; pass NAME or a path to --data")
        return "\n".join(lines)
    if "source" not in r:
        return r["path"]
    how = f"downloaded from {r['source']}" if r["downloaded"] else "already present"
    return f"{r['name']}: {r['path']} ({how}; {r['checksum']} verified)"
