"""Forward throughput: jaxedit's jitted forward vs transformers' PyTorch eager, same model/batch.

    uv run python benchmarks/forward.py [--batch 8] [--tokens 64] [--repeats 10] [--dtype bfloat16]

The model is the embedded SmolLM2-135M (fp32 unless `--dtype`), loaded once by jaxedit and once
by transformers from the same GGUF; on a GPU machine both run on the GPU
(`machine.torch_device`). Both compute full [B, T, V] logits for the same random token batch.
Reported: tokens/s of each (median over `repeats` timed calls after a warm-up), the ratio, jaxedit's
first-call compile time (trace + XLA compile, measured separately) and the max |Δ| of logits;
with `--dtype bfloat16` also each side's distance from jaxedit's fp32 logits (max |Δ|, top-1).
Writes `benchmarks/results/forward.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine import accelerator, torch_device, torch_sync  # benchmarks/machine.py

from jaxedit.io.checkpoint import embedded_gguf_path, load
from jaxedit.models.transformer import forward_jit

RESULTS = Path(__file__).parent / "results" / "forward.json"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    B, T = args.batch, args.tokens

    t0 = time.perf_counter()
    lm = load("smollm2-135m", dtype=args.dtype)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, (B, T)).astype(np.int32)
    tokens, mask = jnp.asarray(ids), jnp.ones((B, T), bool)

    # First call = trace + compile + one run; compile alone via the AOT API.
    t0 = time.perf_counter()
    compiled = forward_jit.lower(lm.config, lm.params, tokens, mask).compile()
    compile_s = time.perf_counter() - t0
    run_jax = lambda: compiled(lm.params, tokens, mask).logits.block_until_ready()
    ours = np.asarray(compiled(lm.params, tokens, mask).logits, np.float32)
    run_jax()
    jax_times = timed(run_jax, args.repeats)

    result = {
        "benchmark": "forward",
        "model": f"smollm2-135m ({'fp32' if args.dtype == 'float32' else 'bf16'})",
        "batch": B,
        "tokens": T,
        "repeats": args.repeats,
        "jaxedit": {
            "load_s": round(load_s, 3),
            "compile_s": round(compile_s, 3),
            "median_s": round(statistics.median(jax_times), 4),
            "tokens_per_s": round(B * T / statistics.median(jax_times), 1),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            **accelerator(),
        },
    }
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        result["baseline"] = None
        result["note"] = "PyTorch not installed: scripts/install_reference.sh adds the baseline"
    else:
        gguf = embedded_gguf_path("smollm2-135m")
        device = torch_device()
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, args.dtype)
        )
        model = model.eval().to(device)
        t_ids = torch.from_numpy(ids.astype(np.int64)).to(device)

        def run_torch():
            with torch.no_grad():
                logits = model(input_ids=t_ids, use_cache=False).logits
            torch_sync(device)
            return logits

        theirs = run_torch().float().cpu().numpy()
        run_torch()
        torch_times = timed(run_torch, args.repeats)
        result["baseline"] = {
            "name": f"transformers PyTorch eager ({device.type.upper()})",
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "median_s": round(statistics.median(torch_times), 4),
            "tokens_per_s": round(B * T / statistics.median(torch_times), 1),
        }
        result["speedup_vs_torch"] = round(
            statistics.median(torch_times) / statistics.median(jax_times), 3
        )
        result["max_abs_logit_diff"] = float(np.abs(ours - theirs).max())
    if args.dtype != "float32":  # how far each side's low-precision logits are from fp32's
        ref = load("smollm2-135m")
        exact = np.asarray(forward_jit(ref.config, ref.params, tokens, mask).logits)
        sides = {"jaxedit": ours} | ({"baseline": theirs} if result.get("baseline") else {})
        result["vs_fp32"] = {
            side: {
                "max_abs_logit_diff": float(np.abs(x - exact).max()),
                "top1_agreement": float((x.argmax(-1) == exact.argmax(-1)).mean()),
            }
            for side, x in sides.items()
        }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
