"""Few-row matrix products: how fast XLA's CPU kernels stream a weight matrix.

A MEND edit, a decoding step or one v* row multiplies a handful of token rows by every weight
of the model. With 1-32 rows such a product is memory-bound (2 * rows FLOPs per 4-byte weight),
so its time is the time to read the weights, and the measure is GB/s of weights read against
the machine's copy bandwidth. This is what keeps `mend_edit` in `roofline.py` far below its
bandwidth line (README, Performance).

Measured on SmolLM2-135M's MLP shapes ([576, 1536] and [1536, 576], fp32, 32 distinct matrices
of each, 226 MB, so nothing stays in cache), for each row count:

    xla_x_W        y  = x @ W,   W stored [in, out]  (Flax's kernel layout: what jaxedit runs)
    xla_dy_WT      dx = dy @ Wᵀ, W stored [in, out]  (the same layer's backward to its input)
    xla_Wt_xT      yᵀ = W' @ xᵀ, W' stored [out, in] (PyTorch's layout, weight as the left side)
    numpy_x_W      y  = x @ W in numpy (OpenBLAS / MKL), the same [in, out] arrays

and the copy bandwidth (numpy, read + write bytes). With `--flags` each XLA flag set runs in
its own process (XLA reads XLA_FLAGS once): the default (YNNPACK dot fusions on jax 0.10) and
`--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK off: Eigen's kernels).

    taskset -c 0 uv run python benchmarks/thin_products.py --flags  # -> results/thin_products.json

prints the README's table (Performance), which tests/test_docs.py checks against the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "thin_products.json"
D, F, N_MATS = 576, 1536, 32
ROWS = (1, 2, 4, 8, 16, 32, 64)
FLAG_SETS = {
    "default (YNNPACK)": "",
    "YNNPACK off (Eigen)": "--xla_cpu_experimental_ynn_fusion_type=",
}


def best_seconds(fn, repeats: int = 7) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call (compile)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(rows_list) -> dict:
    """GB/s of weights read per product form and row count, in this process's XLA flags."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    shapes = [(D, F), (F, D)] * N_MATS
    host = [rng.standard_normal(s, np.float32) * 0.02 for s in shapes]
    W = [jnp.asarray(w) for w in host]  # [in, out]
    Wt = [jnp.asarray(np.ascontiguousarray(w.T)) for w in host]  # [out, in]
    n_bytes = sum(w.nbytes for w in host)

    # one program per form: every matrix once, outputs kept (no reduction in the timing)
    forms = {
        "xla_x_W": jax.jit(lambda ws, xs: [x @ w for w, x in zip(ws, xs, strict=True)]),
        "xla_dy_WT": jax.jit(lambda ws, ys: [y @ w.T for w, y in zip(ws, ys, strict=True)]),
        "xla_Wt_xT": jax.jit(lambda ws, xs: [w @ x.T for w, x in zip(ws, xs, strict=True)]),
    }
    out = {}
    for rows in rows_list:
        xs = [jnp.asarray(rng.standard_normal((rows, w.shape[0]), np.float32)) for w in host]
        ys = [jnp.asarray(rng.standard_normal((rows, w.shape[1]), np.float32)) for w in host]
        args = {"xla_x_W": (W, xs), "xla_dy_WT": (W, ys), "xla_Wt_xT": (Wt, xs)}
        row = {
            name: n_bytes / best_seconds(lambda f=f, a=args[name]: f(*a)) / 1e9
            for name, f in forms.items()
        }
        xs_np = [np.asarray(x) for x in xs]
        row["numpy_x_W"] = (
            n_bytes
            / best_seconds(lambda xs_np=xs_np: [x @ w for w, x in zip(host, xs_np, strict=True)])
            / 1e9
        )
        # the forms must agree before their speeds are compared
        a = np.asarray(forms["xla_x_W"](W, xs)[1])
        b = np.asarray(forms["xla_Wt_xT"](Wt, xs)[1]).T
        row["max_abs_diff"] = float(np.abs(a - b).max())
        out[str(rows)] = {k: round(v, 6 if k == "max_abs_diff" else 2) for k, v in row.items()}
    return {"weights_bytes": n_bytes, "gb_per_s": out}


def copy_bandwidth(n_bytes: int = 256 << 20) -> float:
    """numpy copy GB/s (bytes read + written), the median of 7."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    return 2 * n_bytes / best_seconds(lambda: np.copyto(b, a)) / 1e9


TABLE_ROWS = (
    (
        "default (YNNPACK)",
        "xla_x_W",
        "XLA `x @ W`, W stored [in, out] (Flax's layout: what jaxedit runs)",
    ),
    ("default (YNNPACK)", "xla_dy_WT", "XLA `dy @ Wᵀ` (the same layer's backward)"),
    ("default (YNNPACK)", "xla_Wt_xT", "XLA `W' @ xᵀ`, W' stored [out, in] (PyTorch's layout)"),
    ("default (YNNPACK)", "numpy_x_W", "numpy `x @ W` (OpenBLAS)"),
    ("YNNPACK off (Eigen)", "xla_x_W", "XLA `x @ W`, YNNPACK off (Eigen)"),
    ("YNNPACK off (Eigen)", "xla_dy_WT", "XLA `dy @ Wᵀ`, YNNPACK off (Eigen)"),
)


def markdown_table(result: dict) -> str:
    """The README's table: GB/s per product form (rows) and token rows (columns)."""
    runs = result["runs"]
    counts = list(runs["default (YNNPACK)"]["gb_per_s"])
    lines = [
        "| product \\ rows | " + " | ".join(counts) + " |",
        "|---" * (len(counts) + 1) + "|",
    ]
    for run, form, label in TABLE_ROWS:
        if run in runs:
            cells = [runs[run]["gb_per_s"][c][form] for c in counts]
            lines.append(
                f"| {label} | "
                + " | ".join(f"{v:.2f}" if v < 1 else f"{v:.1f}" for v in cells)
                + " |"
            )
    return "\n".join(lines)


def child_run(flags: str, rows: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, __file__, "--child", "--rows", rows]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child with XLA_FLAGS={flags!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--flags", action="store_true", help="also run with YNNPACK off (own process)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps(measure(rows)))
        return

    sys.path.insert(0, str(HERE))
    from machine import machine

    info = machine()
    sets = FLAG_SETS if args.flags else {"default (YNNPACK)": ""}
    runs = {
        name: child_run(flags, args.rows) | {"xla_flags": flags} for name, flags in sets.items()
    }
    copy = copy_bandwidth()
    default = runs["default (YNNPACK)"]["gb_per_s"]
    summary = {
        r: {
            "xla_x_W_fraction_of_copy": round(v["xla_x_W"] / copy, 3),
            "Wt_xT_over_x_W": round(v["xla_Wt_xT"] / v["xla_x_W"], 2),
            "numpy_over_xla_x_W": round(v["numpy_x_W"] / v["xla_x_W"], 2),
        }
        for r, v in default.items()
    }
    result = {
        "benchmark": "thin_products",
        "machine": info,
        "shapes": f"{N_MATS} x [{D}, {F}] and {N_MATS} x [{F}, {D}], fp32",
        "copy_gb_per_s": round(copy, 2),
        "runs": runs,
        "summary": summary,
        "note": "GB/s of weights read per product (the median of 7 calls of a program that "
        "multiplies every matrix once); memory-bound up to ~32 rows, so the copy rate is the bound",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    print(f"copy {copy:.1f} GB/s -> {args.out}")


if __name__ == "__main__":
    main()
