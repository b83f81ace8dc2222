"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero."""


class JaxeditError(Exception):
    """Base class: bad input named in the message, nothing written half-done."""


class ConfigError(JaxeditError):
    """Unknown architecture or a config field jaxedit does not implement."""


class CheckpointError(JaxeditError):
    """Missing, corrupt, pickled or mismatched checkpoint / cache file."""


class InputError(JaxeditError):
    """Bad user input: empty prompt, subject not in prompt, out-of-range layer, ..."""
