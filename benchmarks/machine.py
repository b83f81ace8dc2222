"""What a benchmark ran on, for its JSON: XLA's and PyTorch's CPU kernels differ with the
instruction set (AVX2 / AVX-512 / AMX), so a ratio means something only beside these flags.

Imports jax only when called: `mesh.py` must set XLA_FLAGS before jax is first imported.
"""

from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine() -> dict:
    """CPU model and flags, cores and affinity, load, platform, jax / numpy, XLA flags."""
    import jax
    import numpy as np

    flags, model = set(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "flags": {f: f in flags for f in FLAGS},
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
