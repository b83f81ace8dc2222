"""Compile once per machine: JAX's persistent compilation cache under the jaxedit cache
directory, and a clock that tells compile seconds apart from run seconds.

`enable()` points JAX's persistent cache at `$JAXEDIT_CACHE/xla` (else
`$XDG_CACHE_HOME/jaxedit/xla`, else `~/.cache/jaxedit/xla`, the parent of the statistics
cache) and caches entries of every size and compile time, so a second process running the same
programs on the same shapes loads the compiled executables instead of compiling them. The CLI
calls it unless `--no-compile-cache` is given.

`CompileClock` sums the durations JAX reports through `jax.monitoring` while it is active:

    compile_s   XLA backend compilation (on a cache hit: loading the executable, near zero)
    trace_s     tracing to a jaxpr and lowering to StableHLO (Python work; the persistent cache
                cannot skip it: a new process traces every function once)
    cache_hits / cache_misses   persistent-cache look-ups

and `run_s = wall_s - compile_s - trace_s`; `cpu_s` is the process's CPU time over the same
span (all threads: on a shared machine, the work done rather than the wait). The cache is
trusted code: keep it in a directory only you can write (JAX's own warning).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import jax

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

_lock = threading.Lock()
_clocks: list[CompileClock] = []
_listening = False
_enabled_dir: str | None = None


def default_compile_cache_dir() -> Path:
    """`<jaxedit cache root>/xla`: the statistics cache's parent (`$JAXEDIT_CACHE` if set)."""
    from jaxedit.stats.cache import default_cache_dir

    return Path(default_cache_dir()).parent / "xla"


def enable(path: str | os.PathLike | None = None) -> str:
    """Turn JAX's persistent compilation cache on at `path` (default
    `default_compile_cache_dir()`), keeping entries of every size and compile time.
    Returns the directory. Call it before the first compilation of the process."""
    global _enabled_dir
    path = str(Path(path) if path is not None else default_compile_cache_dir())
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _enabled_dir = path
    return path


def enabled_dir() -> str | None:
    """The directory `enable` set in this process (None when it was not called)."""
    return _enabled_dir


def _on_duration(event: str, secs: float, **_) -> None:
    if event == _COMPILE:
        field = "compile_s"
    elif event in _TRACE:
        field = "trace_s"
    else:
        return
    with _lock:
        for clock in _clocks:
            setattr(clock, field, getattr(clock, field) + secs)


def _on_event(event: str, **_) -> None:
    field = {_HIT: "cache_hits", _MISS: "cache_misses"}.get(event)
    if field is None:
        return
    with _lock:
        for clock in _clocks:
            setattr(clock, field, getattr(clock, field) + 1)


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        # Registered once per process and never removed: cheap when no clock is running.
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True


class CompileClock:
    """Context manager: compile / trace / run seconds of the code inside it.

        with CompileClock() as clock:
            ...
        clock.as_dict()  # {"compile_s", "trace_s", "run_s", "wall_s", "cache_hits", ...}

    Clocks nest; each sees every compilation that happens while it is open (in any thread).
    """

    def __init__(self):
        self.compile_s = self.trace_s = self.wall_s = self.cpu_s = 0.0
        self.cache_hits = self.cache_misses = 0
        self._t0 = self._c0 = 0.0

    def __enter__(self) -> CompileClock:
        _listen()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        with _lock:
            _clocks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._c0
        with _lock:
            _clocks.remove(self)

    @property
    def run_s(self) -> float:
        return max(0.0, self.wall_s - self.compile_s - self.trace_s)

    def as_dict(self) -> dict:
        return {
            "compile_s": self.compile_s,
            "trace_s": self.trace_s,
            "run_s": self.run_s,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "compile_cache": _enabled_dir,
        }
