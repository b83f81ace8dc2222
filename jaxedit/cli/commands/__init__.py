"""CLI commands, one module each (discovered by `jaxedit.cli.main`)."""
