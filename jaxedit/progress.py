"""Progress on stderr for the work a user waits on (about 2 s or more): tqdm bars, an estimate.

Who decides: the command line. `wanted(no_progress)` is its rule — no bars with
`--no-progress`, nor, as tqdm and most command-line tools do, when stderr is not a terminal (a
pipe or a log file gets no carriage-return animation); `JAXEDIT_PROGRESS=1` forces bars on,
`=0` off. `jaxedit.cli.main` opens a `scope` with that answer around every command.

Who shows: loops deep inside the library (causal-trace cells, the v* / z optimisation steps,
evaluation cases) ask `shown()` for that ambient setting rather than taking a `progress`
argument through every signature; public functions that already take `progress=` keep it (the
commands pass `shown()`). Called directly from Python, nothing shows unless asked.

    with progress.bar(len(cases), "rome independent", unit="case", estimate=True) as b:
        for case in cases:
            ...
            b.update(1)   # after the first case: "the first case took 12.0 s: about 10 min ..."
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

ENV = "JAXEDIT_PROGRESS"
_SHOWN: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxedit_progress", default=False)


def wanted(no_progress: bool = False, stream=None) -> bool:
    """The command line's rule: bars unless `--no-progress`, on a terminal only (ENV overrides
    the terminal test: "1" on, "0" off)."""
    if no_progress:
        return False
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def scope(on: bool) -> Iterator[None]:
    """Within this block `shown()` is `on` (the command line's choice, for the whole command)."""
    token = _SHOWN.set(bool(on))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def shown() -> bool:
    """Should loops show progress now? (False outside a `scope`: library calls stay quiet.)"""
    return _SHOWN.get()


def duration(seconds: float | int) -> str:
    """'850 ms', '12 s', '3.5 min', '1.2 h'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def terminal_columns(stream) -> int | None:
    """The width of the terminal `stream` writes to (None: not a terminal)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


def fixed_width(stream) -> int | None:
    """80 columns for a terminal that reports a size of 0 (a bare pseudo-terminal, as `script`
    or some CI runners open: tqdm would draw nothing there), else None (follow the terminal)."""
    return 80 if terminal_columns(stream) == 0 else None


class Bar:
    """A tqdm bar on stderr (nothing at all when disabled) that can print, once the first item
    is done, how long all of them should take at that pace (`estimate`)."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool | None = None,
        estimate: bool = False,
        leave: bool = True,
        initial: int = 0,
    ):
        self.enabled = shown() if enabled is None else bool(enabled)
        self.desc, self.unit, self.estimate = desc, unit, estimate and self.enabled
        self.t0 = time.perf_counter()
        self.done = self.skipped = 0
        width = fixed_width(sys.stderr) if self.enabled else None
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            disable=not self.enabled,
            leave=leave,
            initial=initial,
            ncols=width,
            nrows=None if width is None else 20,  # tqdm reads 0 rows as -1 and draws nothing
            dynamic_ncols=width is None,
        )

    @property
    def total(self) -> int | None:
        return self.bar.total

    def update(self, n: int = 1, *, timed: bool = True) -> None:
        """`n` more items done; `timed=False` for items that cost nothing here (read back by a
        resumed run): they are not measured, and the estimate covers the others."""
        self.bar.update(n)
        if not timed:
            self.skipped += n
            self.t0 = time.perf_counter()
            return
        first = self.done == 0 and n > 0
        self.done += n
        todo = (self.total or 0) - self.skipped
        if first and self.estimate and todo > self.done:
            each = (time.perf_counter() - self.t0) / self.done
            self.write(
                f"{self.desc}: the first {self.unit} took {duration(each)} (compiling included): "
                f"about {duration(each * todo)} for {todo} at that pace"
            )

    def restart_clock(self) -> None:
        """Measure the estimate from now (after set-up that the items do not repeat)."""
        self.t0 = time.perf_counter()

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def postfix(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def describe(self, desc: str) -> None:
        self.desc = desc
        self.bar.set_description_str(desc, refresh=True)

    def write(self, line: str) -> None:
        """A line on stderr that does not break the bar (nothing when disabled)."""
        if self.enabled:
            tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    enabled: bool | None = None,
    estimate: bool = False,
    leave: bool = True,
    initial: int = 0,
) -> Bar:
    """A `Bar`; `enabled=None` follows `shown()`."""
    return Bar(total, desc, unit, enabled=enabled, estimate=estimate, leave=leave, initial=initial)


class Steps:
    """Named steps of one command (the demo's four): a bar that names the step under way.

    with progress.Steps(["predictions", "causal trace", "ROME edit"]) as steps:
        with steps.step("predictions"):
            ...
    """

    def __init__(self, names: Sequence[str], *, enabled: bool | None = None, desc: str = ""):
        self.names = list(names)
        self.prefix = desc
        self.bar = Bar(len(self.names), self._label(self.names[0]), "step", enabled=enabled)

    def _label(self, name: str) -> str:
        return f"{self.prefix}{name}" if self.prefix else name

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.describe(self._label(name))
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
