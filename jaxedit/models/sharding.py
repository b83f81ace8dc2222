"""Logical axis names for every param, rule tables onto a device mesh, and `shard(lm, mesh)`.

The MaxText recipe: every array dimension carries a *logical* name (what it is), a rule table
maps logical names onto *mesh* axes (where it lives), and `jax.jit` with `NamedSharding`s does
the rest (XLA's SPMD partitioner inserts the collectives). No scheduler of our own.

Logical names                     default rule (`RULES`)
  embed     model width D         fsdp      (FSDP: each device holds 1/n of every matrix)
  mlp       MLP width F           tensor    (tensor parallel, Megatron-style)
  heads     query heads H·K       tensor
  kv_heads  key/value heads G·K   tensor
  vocab     vocabulary V          tensor
  layers    stacked blocks L      —         (scan axis: never split)
  positions learned positions P   —
  norm      norm scales / biases  —         (D floats per layer: not worth a collective)
  batch     activations' batch    (data, fsdp)
  length    activations' tokens   —

Mesh axes are `data`, `fsdp` and `tensor`, always in that order; a spec names the ones it uses
(`"fsdp=8"`, `"data=2,fsdp=2,tensor=2"`) and the others have size 1.

**Replication by rule.** A dimension is split over its mesh axis only when the *logical* count
divides the axis size: `heads` counts whole heads (n_heads), `kv_heads` whole key/value heads,
the rest their array size. SmolLM2-135M has 9 query heads and 3 KV heads, so on `tensor=2`
its attention matrices are replicated along heads (and still split over `fsdp` along embed),
while its MLP (F = 1,536) and vocabulary (49,152) split. Splitting 9 heads as 4.5 per device
would be legal for XLA, but it cuts heads in half and turns every attention score into a
cross-device reduction; replication is the rule MaxText uses too.

**What each device holds.** Params are split over `fsdp` and `tensor` only: `data` is pure
data parallelism (as in MaxText), so every `data` slice holds a full copy of the sharded
params and each device holds about 1/(fsdp·tensor) of the param bytes (`device_bytes`), plus
what replication by rule adds (norm scales, and heads a mesh does not divide). `fsdp=8` puts
1/8 on each device; `data=2,fsdp=2,tensor=2` puts 1/4 on each and runs two batches at once.

**Activations.** Token batches split over (data, fsdp) along `batch` (`put_batch`; a batch
whose size the mesh does not divide is replicated). Jitted code follows its inputs'
shardings: a function given sharded params and a batch, or a batch left on the host (then
replicated), runs SPMD with the collectives XLA's partitioner inserts, and computes what the
single-device call computes up to float rounding (`tests/test_sharding.py`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxedit.errors import ConfigError
from jaxedit.models.config import ModelConfig

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]
# Specs need only the axis sizes: an `AbstractMesh` (no devices) answers "how would this split?"
AnyMesh = Mesh | AbstractMesh

RULES: Rules = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "positions": None,
    "norm": None,
    "batch": ("data", "fsdp"),
    "length": None,
}

# Logical names of each param leaf, by its path below `blocks` (stacked: leading `layers`) or
# at the top. Every family uses these leaf names (see `transformer.param_shapes`).
_BLOCK_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("attn", "q", "kernel"): ("embed", "heads"),
    ("attn", "q", "bias"): ("heads",),
    ("attn", "k", "kernel"): ("embed", "kv_heads"),
    ("attn", "k", "bias"): ("kv_heads",),
    ("attn", "v", "kernel"): ("embed", "kv_heads"),
    ("attn", "v", "bias"): ("kv_heads",),
    ("attn", "o", "kernel"): ("heads", "embed"),
    ("attn", "o", "bias"): ("norm",),
    ("mlp", "up", "kernel"): ("embed", "mlp"),
    ("mlp", "up", "bias"): ("mlp",),
    ("mlp", "gate", "kernel"): ("embed", "mlp"),
    ("mlp", "gate", "bias"): ("mlp",),
    ("mlp", "down", "kernel"): ("mlp", "embed"),
    ("mlp", "down", "bias"): ("norm",),
}
_TOP_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed",): ("vocab", "embed"),
    ("pos_embed",): ("positions", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("lm_head", "bias"): ("vocab",),
}


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_axes(names: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    if names[0] == "blocks":
        rest = names[1:]
        if rest[0].startswith("ln"):
            return ("layers", "norm")
        if rest in _BLOCK_AXES:
            return ("layers", *_BLOCK_AXES[rest])
    elif names in _TOP_AXES:
        return _TOP_AXES[names]
    elif names[0] == "final_norm":
        return ("norm",)
    raise ConfigError(f"no logical axis names for param {'/'.join(names)} (ndim {ndim})")


def param_axes(params: Any) -> Any:
    """The logical axis names of every param leaf (a pytree of tuples, like `params`)."""

    def axes(path, leaf):
        names = _leaf_axes(_path_names(path), np.ndim(leaf))
        if len(names) != np.ndim(leaf):
            raise ConfigError(f"param {'/'.join(_path_names(path))}: {np.shape(leaf)} vs {names}")
        return names

    return jax.tree_util.tree_map_with_path(axes, params)


def logical_counts(cfg: ModelConfig) -> dict[str, int]:
    """How many indivisible units each logical axis has (whole heads, not head × dim)."""
    return {
        "embed": cfg.d_model,
        "mlp": cfg.d_ff,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "vocab": cfg.vocab_size,
        "layers": cfg.n_layers,
        "positions": cfg.max_positions,
        "norm": cfg.d_model,
    }


# ----------------------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """`"data=2,fsdp=2,tensor=2"` -> {"data": 2, "fsdp": 2, "tensor": 2} (missing axes: 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ConfigError(
                f"bad mesh spec {spec!r}: expected axis=size with axes {', '.join(MESH_AXES)}"
            )
        if name in seen:
            raise ConfigError(f"bad mesh spec {spec!r}: axis {name} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ConfigError(f"bad mesh spec {spec!r}: {name} must be a positive integer")
        sizes[name] = size
        seen.add(name)
    if not seen:
        raise ConfigError(f"bad mesh spec {spec!r}: name at least one of {', '.join(MESH_AXES)}")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of every process).

    The product of the sizes must equal the number of devices: a mesh that leaves devices idle
    or asks for more than exist is a mistake in the command, not something to guess around.
    """
    if isinstance(spec, str):
        sizes = parse_mesh_spec(spec)
    else:
        sizes = {**dict.fromkeys(MESH_AXES, 1), **spec}
    devices = list(devices) if devices is not None else jax.devices()
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        spec_text = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device"
        raise ConfigError(
            f"mesh {spec_text} needs {math.prod(shape)} devices but {len(devices)} are present"
            " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N)"
        )
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------- rules


def spec_for(
    axes: tuple[str | None, ...],
    mesh: AnyMesh,
    counts: Mapping[str, int] | None = None,
    rules: Rules = RULES,
    shape: tuple[int, ...] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of one array: each logical axis onto its mesh axes, replicated where
    the logical count (or, without counts, the dimension) does not divide the mesh axes' size,
    or where an earlier dimension of the same array already uses that mesh axis."""
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(a for a in targets if mesh.shape.get(a, 1) > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in targets)
        count = (counts or {}).get(name) if name is not None else None
        if count is None and shape is not None:
            count = shape[i]
        if not targets or (count is not None and count % size != 0):
            out.append(None)
            continue
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def param_specs(cfg: ModelConfig, params: Any, mesh: AnyMesh, rules: Rules = RULES) -> Any:
    """A PartitionSpec per param leaf (a pytree like `params`)."""
    counts = logical_counts(cfg)
    return jax.tree_util.tree_map(
        lambda leaf, axes: spec_for(axes, mesh, counts, rules, np.shape(leaf)),
        params,
        param_axes(params),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def param_shardings(cfg: ModelConfig, params: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """A NamedSharding per param leaf; `params` may be arrays or `jax.ShapeDtypeStruct`s."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(cfg, params, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], rules: Rules = RULES) -> NamedSharding:
    """Activations / token arrays: the leading axis is `batch`, the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, spec_for(axes, mesh, None, rules, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(cfg: ModelConfig, params: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """`params` placed on `mesh` by the rules (a new pytree; the input is not modified)."""
    return jax.device_put(params, param_shardings(cfg, params, mesh, rules))


def shard(lm, mesh: Mesh | str, rules: Rules = RULES):
    """A `LanguageModel` whose params live sharded on `mesh` (a Mesh or a spec string).

    Everything downstream (forward, trace, statistics, edits, evaluation) takes it as it is:
    jitted functions follow their inputs' shardings, and a weight edit is a `tree_map` that
    keeps each leaf's sharding. The same values in another placement: a model loaded from files
    keeps its file-based fingerprint (`LanguageModel.with_layout`), so caches still match.
    """
    mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
    return lm.with_layout(shard_params(lm.config, lm.params, mesh, rules))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of `tree` are sharded on (the first leaf placed on a `Mesh` of more
    than one device), or None for arrays on one device / host arrays."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def batch_multiple(mesh: AnyMesh | None, rules: Rules = RULES) -> int:
    """How many ways `batch` splits on `mesh` (data·fsdp by default; 1 without a mesh): round
    batch sizes to a multiple of it and every device gets rows."""
    if mesh is None:
        return 1
    target = rules.get("batch")
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return math.prod(mesh.shape.get(a, 1) for a in targets)


def put_batch(mesh: Mesh | None, *arrays: Any, rules: Rules = RULES) -> tuple:
    """`arrays` (host or device, leading axis batch) placed split along `batch` on `mesh`
    (replicated where the mesh does not divide their batch size); unchanged without a mesh."""
    if mesh is None:
        return arrays
    return tuple(jax.device_put(a, batch_sharding(mesh, np.shape(a), rules)) for a in arrays)


def constrain(
    x: Any, axes: tuple[str | None, ...], like: Any, rules: Rules = RULES, *, force: bool = False
) -> Any:
    """`x` (an activation, inside `jit` or not) laid out as the rules place its logical `axes`
    on the mesh that `like` (a param, possibly traced) lives on; `x` unchanged when `like` is
    on no mesh, or when nothing of `x` would split and not `force` (which then replicates it).

    Why: given only sharded params, XLA propagates their layout into the activations (the
    residual stream split along D like `embed`, one all-reduce per matmul). Pinning the
    residual stream to `batch` makes it FSDP proper: each device runs its rows and the
    weights are all-gathered layer by layer. An activation whose batch the mesh does not
    divide is left to XLA (not forced to replication).
    """
    try:
        mesh = jax.typeof(like).sharding.mesh
    except AttributeError:  # a host array: no mesh
        return x
    if mesh.empty or mesh.size <= 1:
        return x
    spec = spec_for(axes, mesh, None, rules, tuple(x.shape))
    if all(p is None for p in spec) and not force:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


BATCH_LENGTH = ("batch", "length", None)  # the residual stream [B T D]: rows split, D whole


def device_bytes(params: Any) -> dict[str, int]:
    """Bytes of param data held by each device (from the arrays' addressable shards)."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(params):
        for s in leaf.addressable_shards:
            out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
    return out
