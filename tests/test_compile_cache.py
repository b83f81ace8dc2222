"""No recompilation on re-run: after one `jaxedit trace`, the jaxedit cache holds the compiled
programs and a second run in a new process loads them (near-zero compile seconds, no misses);
`--no-compile-cache` compiles everything and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).parent / "goldens" / "llama"  # a 2-layer Llama, 256-token vocabulary


def _trace(cache: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "JAXEDIT_CACHE": str(cache), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("JAXEDIT_NO_COMPILE_CACHE", None)  # conftest sets it for in-process CLI tests
    argv = [sys.executable, "-m", "jaxedit", "trace", "--model", str(MODEL), "--prompt",
            "hello world, this is a test", "--subject", "hello world", "--samples", "2",
            "--window", "2", "--out", str(out), "--json", "--no-progress", *extra]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["timing"]


@pytest.mark.slow
def test_second_run_loads_compiled_programs(tmp_path):
    cache = tmp_path / "cache"
    first = _trace(cache, tmp_path / "a")
    entries = list((cache / "xla").iterdir())
    assert first["compile_cache"] == str(cache / "xla")
    assert first["cache_misses"] > 0 and len(entries) >= first["cache_misses"]
    second = _trace(cache, tmp_path / "b")
    assert second["cache_misses"] == 0 and second["cache_hits"] >= first["cache_misses"]
    # loading an executable is not compiling it
    assert second["compile_s"] < 0.25 * first["compile_s"], (first, second)
    assert sorted(p.name for p in (cache / "xla").iterdir()) == sorted(p.name for p in entries)

    off = _trace(tmp_path / "other", tmp_path / "c", "--no-compile-cache")
    assert off["compile_cache"] is None and off["cache_hits"] == 0
    assert not (tmp_path / "other" / "xla").exists()


def test_enable_sets_jax_options(tmp_path, monkeypatch):
    """In-process: the directory and thresholds JAX reads (entries of any size and compile
    time), under $JAXEDIT_CACHE."""
    import jax

    from jaxedit import compile_cache

    monkeypatch.setenv("JAXEDIT_CACHE", str(tmp_path))
    keep = {
        k: getattr(jax.config, k)
        for k in (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_entry_size_bytes",
            "jax_persistent_cache_min_compile_time_secs",
        )
    }
    try:
        assert compile_cache.default_compile_cache_dir() == tmp_path / "xla"
        path = compile_cache.enable()
        assert path == str(tmp_path / "xla") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    finally:
        for k, v in keep.items():
            jax.config.update(k, v)
        compile_cache._enabled_dir = None


def test_clock_separates_compile_from_run():
    import jax
    import jax.numpy as jnp

    from jaxedit.compile_cache import CompileClock

    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 7.0)  # a new function: compiled inside the clock
    x = jnp.ones((64, 64))
    with CompileClock() as first:
        f(x).block_until_ready()
    with CompileClock() as again:
        f(x).block_until_ready()
    assert first.compile_s > 0 and first.trace_s > 0
    assert again.compile_s == 0 and again.trace_s == 0  # in-process cache: nothing compiled
    d = first.as_dict()
    assert d["run_s"] == pytest.approx(d["wall_s"] - d["compile_s"] - d["trace_s"], abs=1e-9)
