"""`jaxedit` command line: one module per command in `jaxedit/commands/`.

Each command module defines NAME, HELP, `add_arguments(parser)`, `run(args) -> dict` and,
optionally, `render(result) -> str` for human output. Every command takes `--model` and
`--json`. User errors (`JaxeditError`) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys

from jaxedit.errors import JaxeditError


def _commands():
    import jaxedit.cli.commands as pkg

    mods = [
        importlib.import_module(f"jaxedit.cli.commands.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_")
    ]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    from jaxedit.io.checkpoint import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="jaxedit", description="Locate and edit the knowledge of language models (JAX)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"embedded name, HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
        )
        p.add_argument(
            "--mesh",
            default=None,
            help="shard the model over a device mesh, e.g. fsdp=8 or data=2,fsdp=2,tensor=2",
        )
        p.add_argument("--json", action="store_true", help="print a JSON result on stdout")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    mod = args._module
    try:
        result = mod.run(args)
    except JaxeditError as e:
        print(f"jaxedit {mod.NAME}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxedit {mod.NAME}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=_json_default))
    elif hasattr(mod, "render"):
        print(mod.render(result))
    else:
        print(json.dumps(result, indent=2, default=_json_default))
    return 0


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    sys.exit(main())
