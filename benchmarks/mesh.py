"""Data parallelism on CPU devices: 1 device vs a `data=2` mesh of 2, same work, one run.

    uv run python benchmarks/mesh.py [--tokens 4096] [--batch 8] [--length 64] [--repeats 5]

The process simulates 2 CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, set
here before JAX starts). On the embedded SmolLM2-135M (fp32):

- statistics: `second_moments` at ROME's layer (4) over the first `--tokens` tokens of the
  packaged WikiText slice, on one device vs on `data=2` (batches split over the two devices,
  params replicated, the partial Σ k kᵀ added by XLA): tokens/s, and max |ΔC| / max |C|;
- forward: `forward_jit` logits at every position of a [batch, length] token batch, params on
  one device vs the model sharded on `data=2` (`je.shard`: replicated params, the batch split):
  tokens/s and max |Δ logits|.

Each timing is the median of `--repeats` calls after a warm-up call (compiles excluded), in
wall seconds and in CPU seconds of this process (all threads). Two simulated devices are two
XLA CPU clients' worth of threads on the same cores: the wall-clock speed-up needs idle cores,
so the machine's core count, affinity and load are recorded with the result. Writes
`benchmarks/results/mesh.json`.
"""

from __future__ import annotations

import os

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=2"])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

from jaxedit.io.atomic import write_text_atomic  # noqa: E402
from jaxedit.io.checkpoint import load  # noqa: E402
from jaxedit.models import sharding  # noqa: E402
from jaxedit.models.transformer import forward_jit  # noqa: E402
from jaxedit.stats.corpora import load_corpus  # noqa: E402
from jaxedit.stats.second_moment import second_moments  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mesh.json"
WIKITEXT = Path(__file__).parent.parent / "jaxedit" / "data" / "wikitext2_test_slice.txt"
LAYER = 4  # ROME's layer for SmolLM2-135M (hparams/rome/smollm2-135m.json)


def timed(fn, repeats: int) -> dict:
    """Median wall and CPU seconds of `fn()` over `repeats` calls, after one warm-up call."""
    jax.block_until_ready(fn())
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def rates(t: dict, tokens: int) -> dict:
    return {
        "wall_s": round(t["wall_s"], 4),
        "cpu_s": round(t["cpu_s"], 4),
        "tokens_per_s": round(tokens / t["wall_s"], 1),
        "tokens_per_cpu_s": round(tokens / t["cpu_s"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    info = machine()
    one, both = jax.devices()[:1], jax.devices()[:2]
    lm = load("smollm2-135m")
    docs = load_corpus(lm, str(WIKITEXT), n_tokens=args.tokens, max_len=256).docs
    n_tok = sum(map(len, docs))

    # statistics: the same documents on one device, then split over two
    stats = {}
    C = {}
    for name, devices in (("1_device", one), ("data_2", both)):
        run = lambda d=devices: second_moments(lm, (LAYER,), docs, devices=d)  # noqa: E731
        C[name] = run()[0][LAYER]
        stats[name] = rates(timed(run, args.repeats), n_tok)
    stats["speedup_wall"] = round(
        stats["data_2"]["tokens_per_s"] / stats["1_device"]["tokens_per_s"], 3
    )
    stats["max_rel_diff_C"] = float(
        np.abs(C["data_2"] - C["1_device"]).max() / np.abs(C["1_device"]).max()
    )

    # forward: params on one device vs the model sharded on data=2 (batch split, params replicated)
    B, T = args.batch, args.length
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    single = jax.device_put(lm.params, one[0])
    tok1, mask1 = jax.device_put(ids, one[0]), jax.device_put(mask, one[0])
    mesh = sharding.make_mesh("data=2", both)
    sharded = sharding.shard(lm, mesh).params
    by_batch = sharding.batch_sharding(mesh, (B, T))
    tok2, mask2 = jax.device_put(ids, by_batch), jax.device_put(mask, by_batch)
    f1 = lambda: forward_jit(lm.config, single, tok1, mask1).logits  # noqa: E731
    f2 = lambda: forward_jit(lm.config, sharded, tok2, mask2).logits  # noqa: E731
    fwd = {"1_device": rates(timed(f1, args.repeats), B * T)}
    fwd["data_2"] = rates(timed(f2, args.repeats), B * T)
    fwd["speedup_wall"] = round(fwd["data_2"]["tokens_per_s"] / fwd["1_device"]["tokens_per_s"], 3)
    fwd["max_abs_diff_logits"] = float(np.abs(np.asarray(f1()) - np.asarray(f2())).max())

    result = {
        "benchmark": "mesh",
        "model": "smollm2-135m (fp32)",
        "statistics": {"layer": LAYER, "tokens": n_tok, "documents": len(docs), **stats},
        "forward": {"batch": B, "length": T, **fwd},
        "repeats": args.repeats,
        "machine": info,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
