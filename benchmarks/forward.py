"""Forward throughput: jaxedit's jitted forward vs transformers' PyTorch eager, same model/batch.

    uv run python benchmarks/forward.py [--batch 8] [--tokens 64] [--repeats 10]

The model is the embedded SmolLM2-135M (fp32), loaded once by jaxedit and once by transformers
from the same GGUF. Both compute full [B, T, V] logits for the same random token batch. Reported:
tokens/s of each (median over `repeats` timed calls after a warm-up), the ratio, jaxedit's
first-call compile time (trace + XLA compile, measured separately) and the max |Δ| of logits.
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    B, T = args.batch, args.tokens

    t0 = time.perf_counter()
    lm = load("smollm2-135m")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, (B, T)).astype(np.int32)
    tokens, mask = jnp.asarray(ids), jnp.ones((B, T), bool)

    # First call = trace + compile + one run; compile alone via the AOT API.
    t0 = time.perf_counter()
    compiled = forward_jit.lower(lm.config, lm.params, tokens, mask).compile()
    compile_s = time.perf_counter() - t0
    run_jax = lambda: compiled(lm.params, tokens, mask).logits.block_until_ready()
    ours = np.asarray(compiled(lm.params, tokens, mask).logits)
    run_jax()
    jax_times = timed(run_jax, args.repeats)

    result = {
        "benchmark": "forward",
        "model": "smollm2-135m (fp32)",
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
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        t_ids = torch.from_numpy(ids.astype(np.int64))

        def run_torch():
            with torch.no_grad():
                return model(input_ids=t_ids, use_cache=False).logits

        theirs = run_torch().numpy()
        run_torch()
        torch_times = timed(run_torch, args.repeats)
        result["baseline"] = {
            "name": "transformers PyTorch eager (CPU)",
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

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
