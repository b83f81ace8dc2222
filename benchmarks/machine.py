"""What a benchmark ran on, for its JSON: XLA's and PyTorch's CPU kernels differ with the
instruction set (AVX2 / AVX-512 / AMX), so a ratio means something only beside these flags;
on a GPU, the accelerator and the matmul precision. `torch_device` puts a PyTorch baseline on
the same kind of device as jaxedit.

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
        "transparent_hugepages": _thp_mode(),
        **accelerator(),
    }


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("madvise": only memory that asks gets 2 MB
    pages; numpy asks for its large arrays, XLA does not): benchmarks/fresh_buffers.py."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def accelerator() -> dict:
    """The accelerator jax runs on ({} on a CPU-only run), and its matmul precision setting:
    XLA on NVIDIA GPUs takes fp32 matrix products in TF32 unless told "highest"."""
    import jax

    if jax.default_backend() == "cpu":
        return {}
    return {
        "accelerator": jax.devices()[0].device_kind,
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def torch_device():
    """Where a PyTorch baseline runs: on the GPU when jaxedit runs on one (same hardware on
    both sides of a ratio), else on the CPU."""
    import jax
    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def torch_sync(device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock interval covers them."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
