"""Does it fit? Memory plans compiled on abstract arrays, without the weights.

    jaxedit plan --model llama-3-8b --mesh fsdp=8 --dtype bfloat16 --op rome

A plan builds the model's config (package data for known architectures, or any HF
`config.json`), gives every param a `jax.ShapeDtypeStruct` carrying its `NamedSharding` on the
mesh (`jaxedit.models.sharding.param_shardings`: the same rules `je.shard` uses), does the same
for the operation's inputs, and compiles the operation's program ahead of time:

    jax.jit(program).lower(*abstract_args).compile().memory_analysis()

Nothing is allocated and no weight is read: a 70B program compiles on a laptop CPU in seconds,
because the blocks are one `lax.scan` (compile time is flat in depth). XLA's buffer assignment
then reports, per device (SPMD: every device runs the same partitioned program):

    argument   params + inputs of this device's shards
    output     results (minus what aliases an argument)
    temp       activations and every intermediate live at the peak of the schedule
    peak       argument + output - alias + temp   (what must fit in the device's memory)

Devices: the mesh needs as many devices as it has cells. When this process has exactly that
many, the program compiles for them (a GPU / TPU host gets its own compiler's numbers). Else a
subprocess simulates them on the CPU (`XLA_FLAGS=--xla_force_host_platform_device_count=N`):
`jax.sharding.AbstractMesh` lowers but cannot compile without a device assignment (JAX 0.10).

**How close is it?** The parameter bytes are exact. The CPU compiler fuses differently from
the GPU / TPU ones and computes bf16 matmuls in fp32 (an fp32 copy of the layer's operands in
`temp`; `CPU_OPTIONS` keeps XLA from hoisting that copy out of the layer scan, which would
count an fp32 copy of the whole model), so on CPU the temp figure is an estimate on the high
side. `fits` leaves 10 % of
each chip for the runtime (XLA's own reservations, fragmentation); on GPUs JAX preallocates
75 % by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 to use what the plan assumes.

The programs (`program`) are the pipelines' device work, built from the public pieces they run:

    forward  logits of [B T] tokens at every position
    trace    causal tracing: the clean run, the corrupted run of S noise samples (every
             layer's input kept), and a chunk of C restored cells resumed from layer 0 (the
             worst start) over the whole prompt (the tracer reuses the unchanged prefix's
             keys/values instead: about as many bytes as the layer inputs kept here)
    stats    Σ k kᵀ of one batch at `mlp_key` of a layer (the forward stops there)
    rome     v*: the clean run and the whole Adam loop (`target_opt.clean_run` / `optimise`)
    memit    z for a batch of requests, vmapped over lanes at the last edited layer
    mend     one meta-training step (`mend.train.train_step`)

Shapes come from the method's preset for that model when it has one (layer, templates,
lanes, MEND's layout), else from documented defaults; `--batch` / `--length` / `--layer`
override them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxedit.errors import ConfigError, InputError, JaxeditError
from jaxedit.models import sharding
from jaxedit.models.config import ModelConfig
from jaxedit.models.families import config_from_hf
from jaxedit.models.sites import SitePatch
from jaxedit.models.transformer import forward, param_shapes, run_layers

CONFIG_DIR = Path(__file__).parent / "configs"
OPS = ("forward", "trace", "stats", "rome", "memit", "mend")
GiB = 1 << 30
# Nominal memory per chip (HBM, as the vendors count it).
DEVICE_MEMORY: dict[str, int] = {
    "v5e": 16 * GiB,
    "v4": 32 * GiB,
    "v6e": 32 * GiB,
    "v5p": 95 * GiB,
    "a100-40": 40 * GiB,
    "a100-80": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
}
USABLE = 0.9  # fraction of a chip a plan may fill (runtime reservations, fragmentation)
# The CPU backend computes bf16 matmuls in fp32: it converts each layer's weights, and XLA's
# while-loop invariant code motion then hoists that convert out of the layer scan, i.e. an fp32
# copy of every stacked weight (26 GiB of "temp" for Llama-3-8B in bf16). GPUs and TPUs multiply
# bf16 natively and have no such convert; without the pass the CPU plan keeps one layer's.
CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


# ----------------------------------------------------------------------------- configs


# Short names people type for a shipped architecture (the issue's `--model gpt-j`).
ALIASES = {"gpt-j": "gpt-j-6b", "gptj": "gpt-j-6b"}


def known_models() -> list[str]:
    """Names of the architectures shipped as config.json files (`jaxedit/configs/`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def hf_config(model: str | os.PathLike) -> dict[str, Any]:
    """The HF config.json dict of a known name, a config.json file or a HF directory."""
    name = str(model)
    path = Path(name).expanduser()
    if name in ALIASES and not path.exists():
        name = ALIASES[name]
    if (CONFIG_DIR / f"{name}.json").is_file() and not path.exists():
        path = CONFIG_DIR / f"{name}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InputError(
            f"model {name!r}: not a known architecture ({', '.join(known_models())}), "
            "a config.json file or a HF directory with one"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from e


def model_config(model: str | os.PathLike, dtype: str = "bfloat16") -> ModelConfig:
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    return config_from_hf(hf_config(model)).replace(dtype=dtype)


def _model_id(model: str | os.PathLike) -> str:
    """What hparams presets are looked up by: the config's hub id when it names one."""
    try:
        return hf_config(model).get("_name_or_path") or str(model)
    except InputError:
        return str(model)


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """The shapes an operation's program is compiled for (see the module docstring)."""

    op: str
    batch: int  # rows of one step (forward/stats: sequences; rome/memit: template rows)
    length: int  # tokens per row
    layer: int  # the layer the operation stops at / edits (last of MEMIT's)
    lanes: int = 1  # memit: requests optimised at once; trace: restored cells per chunk
    samples: int = 1  # trace: noise samples
    target_tokens: int = 4  # rome/memit: target length (padded to a power of two)
    source: dict[str, str] = field(default_factory=dict)  # where each default came from


def _preset(method: str, model: str | os.PathLike):
    """The method's hparams preset for this model, or None (then defaults are used)."""
    from jaxedit import methods

    try:
        return methods.get(method).hparams(_model_id(model))
    except JaxeditError:
        return None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_workload(
    cfg: ModelConfig,
    model: str | os.PathLike,
    op: str,
    mesh_sizes: dict[str, int],
    batch: int | None = None,
    length: int | None = None,
    layer: int | None = None,
) -> Workload:
    """The op's shapes: the preset's where the model has one, documented defaults else."""
    if op not in OPS:
        raise InputError(f"unknown op {op!r}; plan one of {', '.join(OPS)}")
    L = cfg.n_layers
    rows = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)  # batch splits over both
    src: dict[str, str] = {}

    def pick(name, given, preset_value, fallback, why):
        if given is not None:
            src[name] = "given"
            return int(given)
        if preset_value is not None:
            src[name] = "preset"
            return int(preset_value)
        src[name] = why
        return int(fallback)

    rome_hp = _preset("rome", model)
    rome_layer = None if rome_hp is None else rome_hp.layer
    if op in ("forward", "stats"):
        b = pick("batch", batch, None, _round_up(8 if op == "forward" else 16, rows), "default")
        t = pick("length", length, None, 512 if op == "forward" else 256, "default")
        lay = pick("layer", layer, rome_layer, L // 4, "n_layers // 4 (no ROME preset)")
        return Workload(op, b, t, lay, source=src)
    if op == "trace":
        b = pick("batch", batch, None, 1, "one prompt")
        t = pick("length", length, None, 32, "default")
        lay = pick("layer", layer, None, 0, "cells resume from layer 0 (the worst case)")
        return Workload(op, b, t, lay, lanes=16, samples=10, source=src)
    if op == "rome":
        hp = rome_hp
        n_templates = 1 + sum(c for _, c in (hp or _rome_defaults()).context_template_length_params)
        b = pick("batch", batch, n_templates + 1, 0, "")  # templates + the KL prompt
        t = pick("length", length, None, 32, "default")
        lay = pick("layer", layer, rome_layer, L // 4, "n_layers // 4 (no ROME preset)")
        return Workload(op, b, t, lay, source=src)
    if op == "memit":
        hp = _preset("memit", model)
        params = hp.context_template_length_params if hp else ((10, 5),)
        b = pick("batch", batch, 1 + sum(c for _, c in params) + 1, 0, "")
        t = pick("length", length, None, 32, "default")
        top = None if hp is None else max(hp.layers)
        lay = pick("layer", layer, top, L // 4, "n_layers // 4 (no MEMIT preset)")
        lanes = hp.z_lanes if hp else 8
        return Workload(op, b, t, lay, lanes=lanes, source=src)
    hp = _mend_hparams(model)
    b = pick("batch", batch, hp.batch, 1, "")
    t = pick("length", length, hp.max_len, 24, "")
    return Workload(op, b, t, L - 1, source=src)


def _rome_defaults():
    from jaxedit.methods.rome import ROMEHparams

    return ROMEHparams(layer=0)


def _mend_hparams(model):
    from jaxedit.methods.mend.hparams import MENDHparams

    return _preset("mend", model) or MENDHparams()


# ----------------------------------------------------------------------------- abstract arrays


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Any:
    """Every param as a `jax.ShapeDtypeStruct` carrying its sharding (nothing allocated)."""
    shapes = param_shapes(cfg)
    shardings = sharding.param_shardings(cfg, shapes, mesh)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An input whose leading axis is a batch (split over data × fsdp when it divides)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))


def _replicated(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def program(cfg: ModelConfig, mesh: Mesh, w: Workload, model: str = "") -> tuple[Callable, tuple]:
    """(function of params and inputs, abstract arguments) of one operation."""
    params = abstract_params(cfg, mesh)
    B, T = w.batch, w.length
    tokens, mask = _rows(mesh, (B, T), jnp.int32), _rows(mesh, (B, T), jnp.bool_)
    if w.op == "forward":
        return partial(_logits, cfg, mesh), (params, tokens, mask)
    if w.op == "stats":
        return partial(_moment_sums, cfg, w.layer, mesh), (params, tokens, mask)
    if w.op == "trace":
        return partial(_trace_program, cfg, w), (params, _replicated(mesh, (1, T), jnp.int32))
    if w.op in ("rome", "memit"):
        return _target_program(cfg, mesh, w, params)
    return _mend_program(cfg, mesh, w, params, model)


def _logits(cfg: ModelConfig, mesh: Mesh, params, tokens, mask):
    """Logits at every position, laid out as the rules say (rows over the batch axes, the
    vocabulary over `tensor`): left to itself XLA may keep them whole on every device."""
    logits = forward(cfg, params, tokens, mask).logits
    spec = sharding.spec_for(("batch", "length", "vocab"), mesh, None, shape=logits.shape)
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))


def _moment_sums(cfg: ModelConfig, layer: int, mesh: Mesh, params, tokens, mask):
    """Σ k kᵀ of one batch at `mlp_key` of `layer` (as `jaxedit.stats.second_moment`), with
    the [F F] result split over `tensor` along its rows."""
    out = forward(
        cfg, params, tokens, mask, capture=("mlp_key",), n_layers=layer + 1, stop_at="mlp_key"
    )
    keys = jnp.where(mask[:, :, None], out.captured["mlp_key"][layer].astype(jnp.float32), 0.0)
    kk = jnp.einsum("btf,btg->fg", keys, keys, precision=jax.lax.Precision.HIGHEST)
    spec = sharding.spec_for(("mlp", "mlp"), mesh, sharding.logical_counts(cfg))
    return jax.lax.with_sharding_constraint(kk, NamedSharding(mesh, spec))


def _trace_program(cfg: ModelConfig, w: Workload, params, tokens):
    """Causal tracing's device work for one prompt, in the shape of `jaxedit.locate.trace`'s
    kernels: clean run (block outputs at every layer), corrupted run of S samples (every
    layer's input), then C cells, each restoring one clean state and resuming the S corrupted
    rows from layer `w.layer`."""
    S, T, C, L, D = w.samples, w.length, w.lanes, cfg.n_layers, cfg.d_model
    mask = jnp.ones((1, T), bool)
    last = jnp.full((1, 1), T - 1)
    clean = forward(cfg, params, tokens, mask, capture=("resid",), logit_positions=last)
    tok_s, mask_s = jnp.broadcast_to(tokens, (S, T)), jnp.broadcast_to(mask, (S, T))
    eps = jax.random.normal(jax.random.key(0), (S, T, D))
    noise = SitePatch(mask_s, eps, jnp.asarray(True))
    capture = ("embed", "resid")
    cor = forward(cfg, params, tok_s, mask_s, patch={"embed": noise}, capture=capture)
    start = w.layer
    h0 = cor.captured["resid"][start - 1] if start else cor.captured["embed"]

    def cell(c):
        at = (jnp.arange(L) == c % L)[:, None, None] & (jnp.arange(T) == c % T)[None, None, :]
        patch = {"resid": SitePatch(at, clean.captured["resid"], jnp.asarray(False))}
        logits = run_layers(cfg, params, h0, mask_s, start, patch=patch, logit_positions=last_s)
        return jnp.mean(jax.nn.softmax(logits[:, 0], axis=-1)[:, 0])

    last_s = jnp.full((S, 1), T - 1)
    return clean.logits[0, 0], jax.vmap(cell)(jnp.arange(C))


def _target_program(cfg: ModelConfig, mesh: Mesh, w: Workload, params):
    """ROME's v* (one request, site mlp_out) or MEMIT's z's (`lanes` requests vmapped, site
    resid): the clean run and the whole Adam loop, as `target_opt` runs them."""
    from jaxedit.methods.common import target_opt

    site = "mlp_out" if w.op == "rome" else "resid"
    B, T, N = w.batch, w.length, w.target_tokens
    R = B - 1  # template rows; the last row is the KL prompt
    settings = target_opt.TargetSettings().arrays()
    hp = {k: _replicated(mesh, (), v.dtype) for k, v in settings.items()}

    def one(params, tokens, mask, lookup, logit_pos, targets, weights, hp):
        values, logp, suffix = target_opt.clean_run(
            cfg, site, w.layer, T, params, tokens, mask, lookup, logit_pos
        )
        r = target_opt.optimise(
            cfg, site, w.layer, params, suffix, targets, weights, logp[R:], values[0], hp
        )
        return values[0] + r.delta, r.loss

    lead = () if w.op == "rome" else (w.lanes,)
    arg = lambda shape, dtype: _replicated(mesh, lead + shape, dtype)
    args = (
        arg((B, T), jnp.int32),
        arg((B, T), jnp.bool_),
        arg((B,), jnp.int32),
        arg((B, N), jnp.int32),
        arg((R, N), jnp.int32),
        arg((N,), jnp.float32),
        hp,
    )
    if w.op == "rome":
        return one, (params, *args)
    lanes = lambda p, *xs: jax.vmap(partial(one, p), in_axes=(0,) * 6 + (None,))(*xs)
    return lanes, (params, *args)


def _mend_program(cfg: ModelConfig, mesh: Mesh, w: Workload, params, model):
    """One MEND meta-training step with the preset's layout (editor state replicated)."""
    from jaxedit.methods.mend.data import EditBatch
    from jaxedit.methods.mend.hparams import make_layout
    from jaxedit.methods.mend.state import init_state
    from jaxedit.methods.mend.train import train_step

    hp = _mend_hparams(model).replace(batch=w.batch, max_len=w.length)
    layout = make_layout(cfg, hp)
    state = jax.eval_shape(lambda: init_state(layout, hp))
    state = jax.tree.map(lambda s: _replicated(mesh, s.shape, s.dtype), state)
    part = lambda: (
        _rows(mesh, (w.batch, 1, w.length), jnp.int32),
        _rows(mesh, (w.batch, 1, w.length), jnp.bool_),
        _rows(mesh, (w.batch, 1, w.length), jnp.bool_),
    )
    batch = EditBatch(part(), part(), part())
    return (lambda p, s, b: train_step(cfg, layout, hp, p, s, b)), (params, state, batch)


# ----------------------------------------------------------------------------- compile + report


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape)
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def param_bytes(cfg: ModelConfig, mesh: Mesh) -> tuple[int, int]:
    """(total param bytes, param bytes on one device), from the shardings the rules give."""
    leaves = jax.tree.leaves(abstract_params(cfg, mesh))
    total = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return total, sum(_shard_bytes(x) for x in leaves)


def host_bytes(cfg: ModelConfig, w: Workload) -> int:
    """Host memory the op needs besides the device program: the fp64 accumulator of C [F F]
    (statistics, which ROME and MEMIT read) and its solves."""
    if w.op in ("stats", "rome", "memit"):
        return cfg.d_ff * cfg.d_ff * 8
    return 0


def compile_plan(cfg: ModelConfig, mesh: Mesh, w: Workload, model: str = "") -> dict[str, Any]:
    """Compile the op on abstract arrays over `mesh`; XLA's per-device memory and FLOPs."""
    fn, args = program(cfg, mesh, w, model)
    t0 = time.perf_counter()
    options = CPU_OPTIONS if jax.devices()[0].platform == "cpu" else {}
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total, per_device = param_bytes(cfg, mesh)
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "param_bytes_total": int(total),
        "param_bytes_per_device": int(per_device),
        "argument_bytes_per_device": int(mem.argument_size_in_bytes),
        "output_bytes_per_device": int(mem.output_size_in_bytes),
        "temp_bytes_per_device": int(mem.temp_size_in_bytes),
        "alias_bytes_per_device": int(mem.alias_size_in_bytes),
        "peak_bytes_per_device": int(peak),
        "flops_per_device": float((cost or {}).get("flops", float("nan"))),
        "host_bytes": host_bytes(cfg, w),
        "compile_seconds": round(seconds, 2),
        "backend": f"{jax.devices()[0].platform} ({len(mesh.devices.flat)} devices)",
    }


def parse_memory(text: str) -> tuple[str, int]:
    """`16GiB`, `80GB`, `512MiB`, a byte count, or a preset name -> (label, bytes)."""
    key = text.strip().lower()
    if key in DEVICE_MEMORY:
        return key, DEVICE_MEMORY[key]
    units = {"tib": 1 << 40, "gib": GiB, "mib": 1 << 20, "tb": 10**12, "gb": 10**9, "mb": 10**6}
    for unit, scale in units.items():
        if key.endswith(unit):
            try:
                return text.strip(), int(float(key[: -len(unit)]) * scale)
            except ValueError:
                break
    if key.isdigit():
        return text.strip(), int(key)
    raise InputError(
        f"device memory {text!r}: give a size (16GiB, 80GB, bytes) or one of "
        f"{', '.join(DEVICE_MEMORY)}"
    )


def fits(peak: int, memory: int) -> bool:
    return peak <= USABLE * memory


def plan(
    model: str | os.PathLike,
    mesh: str = "fsdp=1",
    dtype: str = "bfloat16",
    op: str = "forward",
    *,
    batch: int | None = None,
    length: int | None = None,
    layer: int | None = None,
    device_memory: str | None = None,
) -> dict[str, Any]:
    """The memory plan of `op` for `model` on `mesh` (see the module docstring).

    Compiles in this process when it has exactly the mesh's number of devices, else in a
    subprocess with that many simulated CPU devices.
    """
    sizes = sharding.parse_mesh_spec(mesh)
    n = math.prod(sizes.values())
    chip = None if device_memory is None else parse_memory(device_memory)
    cfg = model_config(model, dtype)
    w = default_workload(cfg, model, op, sizes, batch, length, layer)
    if not 0 <= w.layer < cfg.n_layers:
        raise InputError(f"layer {w.layer} out of range 0..{cfg.n_layers - 1}")
    if jax.device_count() == n:
        measured = compile_plan(cfg, sharding.make_mesh(sizes), w, str(model))
    else:
        measured = _in_subprocess(n, model, sizes, dtype, w)
    out = {
        "model": str(model),
        "dtype": dtype,
        "mesh": {k: v for k, v in sizes.items()},
        "devices": n,
        "op": op,
        "workload": asdict(w),
        "params": int(sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(cfg)))),
        "config": {
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads,
            "vocab": cfg.vocab_size,
        },
        **measured,
        "usable_fraction": USABLE,
        "fits": {k: fits(measured["peak_bytes_per_device"], v) for k, v in DEVICE_MEMORY.items()},
    }
    if chip is not None:
        label, size = chip
        out["device_memory"] = {
            "name": label,
            "bytes": size,
            "fits": fits(measured["peak_bytes_per_device"], size),
        }
    return out


def _in_subprocess(n: int, model, sizes: dict[str, int], dtype: str, w: Workload) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    request = {"model": str(model), "mesh": sizes, "dtype": dtype, "workload": asdict(w)}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxedit.plan", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise JaxeditError(f"compiling the plan on {n} simulated devices failed: {' '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    """Subprocess entry: compile one request (JSON) and print the measurements as JSON."""
    parser = argparse.ArgumentParser(prog="python -m jaxedit.plan")
    parser.add_argument("request")
    req = json.loads(parser.parse_args(argv).request)
    cfg = model_config(req["model"], req["dtype"])
    w = Workload(**req["workload"])
    measured = compile_plan(cfg, sharding.make_mesh(req["mesh"]), w, req["model"])
    print(json.dumps(measured))


# ----------------------------------------------------------------------------- rendering


def fmt_bytes(n: int | float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def render(r: dict[str, Any]) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    w = r["workload"]
    lines = [
        f"{r['model']} ({r['params'] / 1e9:.2f} B params, {r['dtype']}), op {r['op']} on "
        f"{mesh} ({r['devices']} devices, compiled on {r['backend']})",
        f"  workload: batch {w['batch']}, length {w['length']}"
        + (f", layer {w['layer']}" if w["op"] in ("stats", "rome", "memit") else "")
        + (f", lanes {w['lanes']}" if w["op"] in ("memit", "trace") else ""),
        f"  params        {fmt_bytes(r['param_bytes_total']):>12} total"
        f"   {fmt_bytes(r['param_bytes_per_device']):>12} per device"
        f"  (1/{r['param_bytes_total'] / max(r['param_bytes_per_device'], 1):.1f})",
        f"  arguments     {fmt_bytes(r['argument_bytes_per_device']):>12} per device"
        " (params + inputs)",
        f"  temp          {fmt_bytes(r['temp_bytes_per_device']):>12} per device"
        " (activations, intermediates)",
        f"  output        {fmt_bytes(r['output_bytes_per_device']):>12} per device",
        f"  peak          {fmt_bytes(r['peak_bytes_per_device']):>12} per device",
        f"  flops         {r['flops_per_device']:.3g} per device",
    ]
    if r["host_bytes"]:
        lines.append(f"  host          {fmt_bytes(r['host_bytes']):>12} (fp64 C accumulator)")
    chips = "  ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["fits"].items())
    lines.append(f"  fits ({int(r['usable_fraction'] * 100)}% of a chip): {chips}")
    if "device_memory" in r:
        d = r["device_memory"]
        verdict = "fits" if d["fits"] else "DOES NOT FIT"
        lines.append(f"  on {d['name']} ({fmt_bytes(d['bytes'])}): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    _main(sys.argv[1:])
