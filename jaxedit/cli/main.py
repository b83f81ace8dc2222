"""`jaxedit` command line: one module per command in `jaxedit/commands/`.

Each command module defines NAME, HELP, `add_arguments(parser)`, `run(args) -> dict` and,
optionally, `render(result) -> str` for human output. Every command takes `--model`, `--json`,
`--dtype` (the loaded params': float32 or bfloat16, the same meaning everywhere) and
`--no-progress` (bars on stderr, only when it is a terminal: `jaxedit.progress`).
User errors (`JaxeditError`, and a file that is not UTF-8) print one line and exit 2, without a
traceback; an output directory (`--out`, `--save`) that a failed command created is removed
again when it holds no file. JAX's persistent compilation cache is on (`jaxedit.compile_cache`,
`--no-compile-cache` or `JAXEDIT_NO_COMPILE_CACHE=1` to opt out); trace / demo / edit / eval
results get "timing" (compile, tracing and run seconds, persistent-cache hits and misses).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys

from jaxedit import compile_cache, progress
from jaxedit.cli.commands.data import resolve_data_args
from jaxedit.errors import JaxeditError
from jaxedit.io.atomic import first_new_dir, remove_new_empty_dirs

# Commands whose dict result carries "timing" (compile seconds apart from run seconds): the
# long ones, where a warm compilation cache matters.
_TIMED = frozenset({"trace", "demo", "edit", "eval"})


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
        if "--dtype" not in p._option_string_actions:  # plan's: the same, default bfloat16
            p.add_argument(
                "--dtype",
                dest="model_dtype",
                default="float32",
                choices=("float32", "bfloat16"),
                help="dtype of the loaded params (default float32; norms, softmax, statistics "
                "and solves stay in fp32 or fp64)",
            )
        if "--no-progress" not in p._option_string_actions:
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--no-compile-cache",
            action="store_true",
            help="do not use JAX's persistent compilation cache ($JAXEDIT_CACHE/xla): compile "
            "everything in this process",
        )
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    mod = args._module
    # Output directories this command may create: a failure must not leave them empty.
    outs = [p for p in (getattr(args, a, None) for a in ("out", "save")) if p]
    new = [d for d in map(first_new_dir, outs) if d is not None]  # with parents it creates
    ok = False
    try:
        resolve_data_args(args)  # registered data-set names -> cached files (`jaxedit data`)
        if not (args.no_compile_cache or os.environ.get("JAXEDIT_NO_COMPILE_CACHE") == "1"):
            compile_cache.enable()  # a second run on the same shapes loads, not compiles
        clock = compile_cache.CompileClock()
        with progress.scope(progress.wanted(args.no_progress)), clock:
            result = mod.run(args)
        if mod.NAME in _TIMED and isinstance(result, dict) and "timing" not in result:
            result = {**result, "timing": clock.as_dict()}  # compile seconds apart from run
        ok = True
    except JaxeditError as e:
        print(f"jaxedit {mod.NAME}: error: {e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # a reader that did not name its file: still one line
        print(
            f"jaxedit {mod.NAME}: error: an input file is not UTF-8 text (byte "
            f"0x{e.object[e.start]:02x} at offset {e.start}: {e.reason}); save it as UTF-8",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"jaxedit {mod.NAME}: interrupted", file=sys.stderr)
        return 130
    finally:
        if not ok:
            remove_new_empty_dirs(new)
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
