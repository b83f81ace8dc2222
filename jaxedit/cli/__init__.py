"""The `jaxedit` command line: one module per command in `jaxedit.cli.commands`."""

from jaxedit.cli.main import main

__all__ = ["main"]
