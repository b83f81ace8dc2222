"""Why XLA writes new arrays slowly on these CPUs: page faults on fresh buffers.

`je.apply` returns new params, so an edit writes each edited [L, I, O] stack anew (on
SmolLM2-135M, 106 MB per MLP kernel stack). On the project's machines XLA writes a new array
at 2-3 GB/s where numpy copies at ~25 GB/s (`benchmarks/roofline.py`: `xla_gbs`,
`numpy_copy_gbs`). This script separates the two causes it could have, in one run, on the
stack's shape:

- `numpy_copy`     numpy copy into a preallocated array (numpy asks the kernel for huge pages on
                   large arrays: `madvise`, which is all transparent huge pages do here);
- `xla_fresh`      `x * 1` under `jax.jit`: a new output buffer per call, faulted in by the
                   kernel 4 KB page by 4 KB page (XLA does not ask for huge pages);
- `xla_reused`     the same, in a child process whose glibc never returns freed memory to the
                   kernel (`MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_` large): each call's
                   output lands on pages an earlier call already faulted in.

If `xla_reused` is several times `xla_fresh`, the rate is the kernel's (a page fault per 4 KB,
costly in a VM), not XLA's code. Reports GB/s of bytes written (wall clock, best of 7, pinned
by the caller) and the transparent-huge-page mode; writes `benchmarks/results/fresh_buffers.json`.

    taskset -c 0 uv run python benchmarks/fresh_buffers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "fresh_buffers.json"
SHAPE = (30, 1536, 576)  # one SmolLM2-135M MLP kernel stack, fp32: 106 MB
REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def best_of(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def xla_write_gbs() -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).random(SHAPE, np.float32))
    scale = jax.jit(lambda a: a * 1.0)
    return x.nbytes / best_of(lambda: scale(x).block_until_ready()) / 1e9


def numpy_copy_gbs() -> float:
    import numpy as np

    a = np.random.default_rng(0).random(SHAPE, np.float32)
    b = np.empty_like(a)
    return a.nbytes / best_of(lambda: np.copyto(b, a)) / 1e9


def main() -> None:
    if sys.argv[1:] == ["--xla-only"]:  # the child process of `xla_reused`
        print(xla_write_gbs())
        return
    from machine import machine  # benchmarks/machine.py, beside this script

    child = subprocess.run(
        [sys.executable, __file__, "--xla-only"],
        env=os.environ | REUSE_ENV, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = {
        "benchmark": "writing a new array: XLA (fresh buffers) vs numpy",
        "shape": list(SHAPE),
        "bytes": 4 * SHAPE[0] * SHAPE[1] * SHAPE[2],
        "gbs_written": {
            "numpy_copy": numpy_copy_gbs(),
            "xla_fresh": xla_write_gbs(),
            "xla_reused": float(child.stdout.strip().splitlines()[-1]),
        },
        "reuse_env": REUSE_ENV,
        "machine": machine(),
    }
    g = result["gbs_written"]
    result["xla_reused_over_fresh"] = g["xla_reused"] / g["xla_fresh"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("gbs_written", "xla_reused_over_fresh")}, indent=1))


if __name__ == "__main__":
    main()
