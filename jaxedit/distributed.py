"""Several processes (hosts) as one job: `jax.distributed`, each process's share of the work.

    import jaxedit.distributed as dist
    dist.initialize()                       # before anything else touches JAX
    lm = je.load("meta-llama/Meta-Llama-3-8B", mesh=...)
    stats = je.stats.layers_stats(lm, ...)  # each process streams its share of the corpus

`initialize(coordinator, num_processes, process_id)` takes its arguments from the caller, else
from `JAXEDIT_COORDINATOR` / `JAXEDIT_NUM_PROCESSES` / `JAXEDIT_PROCESS_ID`, else lets
`jax.distributed.initialize` detect the cluster (Cloud TPU, SLURM, Open MPI, ...). On CPU it
selects gloo collectives first (XLA's CPU client has none otherwise), so two processes on one
machine make a test of the multi-host paths.

How work is split (data parallel across processes, no scheduler of our own):

- `process_share(items)`: process p of n takes items p, p + n, p + 2n, ... Every process
  decides the same global list (the corpus sample and the evaluation cases are seeded and
  deterministic), so the shares partition it without any communication.
- `sum_over_processes(array, count)`: the element-wise sum over processes, identical on every
  process. Arrays travel as their raw bytes (viewed as uint32), so fp64 accumulators cross
  bit-exactly, and are summed in process order.
- `allgather_json(obj)`: every process's JSON-able result, in process order (evaluation rows).
- `work_share(n, params)` / `gather_units(pairs)`: the evaluation runner's cases (or chunks)
  this process runs, and every process's results joined by case index. A model whose mesh
  spans processes is one SPMD program: then every process runs every case in lockstep.

The statistics (`jaxedit.stats.second_moment.second_moments`) use the first two: each process
streams its documents through its own devices, then the Σ k kᵀ sums and token counts are added
across processes; C is then what one process computes over all documents, up to float
rounding. That needs the statistics mesh to be process-local (each host runs the model on its
own devices), which is the default; a mesh spanning processes would need every step in
lockstep with global batches and is refused there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from jaxedit.errors import ConfigError

T = TypeVar("T")
ENV = {
    "coordinator": "JAXEDIT_COORDINATOR",
    "num_processes": "JAXEDIT_NUM_PROCESSES",
    "process_id": "JAXEDIT_PROCESS_ID",
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"${name} must be an integer, not {value!r}") from e


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
    timeout_s: int = 300,
) -> dict[str, int]:
    """Join the job (see the module docstring); returns {process_id, num_processes,
    local_devices, devices}. Call it once per process before any other JAX call."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    if num_processes is None:
        num_processes = _env_int(ENV["num_processes"])
    if process_id is None:
        process_id = _env_int(ENV["process_id"])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError(
            "multi-process: give the coordinator address, the number of processes and this "
            "process's id together (or none of them, to let JAX detect the cluster)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} out of range 0..{num_processes - 1}")
    # Without collectives the CPU client cannot run a computation across processes; GPU and
    # TPU clients ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
    return info()


def info() -> dict[str, int]:
    return {
        "process_id": jax.process_index(),
        "num_processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
    }


def shutdown() -> None:
    jax.distributed.shutdown()


def process_share(
    items: Sequence[T], process: int | None = None, count: int | None = None
) -> list[T]:
    """This process's items: every `count`-th from index `process` (default: this job's)."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    return list(items[process::count])


def _gather_bytes(data: bytes) -> list[bytes]:
    """Every process's bytes, in process order (lengths first: they may differ)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [data]
    sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
    sizes = np.asarray(sizes).reshape(-1)
    width = -(-int(sizes.max()) // 4) * 4 or 4
    padded = np.zeros(width, np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    # uint32 words: integers cross the collectives bit for bit whatever jax_enable_x64 says
    got = multihost_utils.process_allgather(padded.view(np.uint32))
    got = np.asarray(got).reshape(len(sizes), -1)
    return [got[p].view(np.uint8)[: int(sizes[p])].tobytes() for p in range(len(sizes))]


def sum_over_processes(array: np.ndarray, count: int = 0) -> tuple[np.ndarray, int]:
    """(Σ over processes of `array`, Σ of `count`), the same on every process; the arrays'
    dtype (fp64 included) and shape are kept exactly."""
    array = np.ascontiguousarray(array)
    if jax.process_count() == 1:
        return array, count
    header = json.dumps({"count": int(count), "dtype": array.dtype.str, "shape": array.shape})
    parts = _gather_bytes(header.encode() + b"\n" + array.tobytes())
    total, n = np.zeros_like(array), 0
    for part in parts:  # process order: every process adds in the same order
        head, _, body = part.partition(b"\n")
        meta = json.loads(head)
        if meta["dtype"] != array.dtype.str or tuple(meta["shape"]) != array.shape:
            raise ConfigError(
                f"processes disagree on the summed array: {meta['dtype']} {meta['shape']} vs "
                f"{array.dtype.str} {array.shape}"
            )
        total += np.frombuffer(body, array.dtype).reshape(array.shape)
        n += int(meta["count"])
    return total, n


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (one process: [obj])."""
    return [json.loads(b) for b in _gather_bytes(json.dumps(obj).encode())]


def gather_units(local: Sequence[tuple[int, Any]]) -> dict[int, Any]:
    """{unit index: JSON-able result} of every process, from each process's `(index, result)`
    pairs (each process's share of units, `work_share`)."""
    out: dict[int, Any] = {}
    for part in allgather_json([[int(k), v] for k, v in local]):
        out.update({int(k): v for k, v in part})
    return out


def splits_work(tree: Any = None) -> bool:
    """Whether work units split over this job's processes: several processes, and `tree` (a
    model's params) on each process's own devices. A model on a mesh that spans processes runs
    every computation on all of them at once, so every process runs every unit in lockstep."""
    if jax.process_count() == 1:
        return False
    from jaxedit.models.sharding import mesh_of

    mesh = None if tree is None else mesh_of(tree)
    return mesh is None or is_local(mesh)


def work_share(n: int, tree: Any = None) -> list[int]:
    """The indices of `n` work units (evaluation cases, chunks) this process runs: its
    `process_share` when the work splits (`splits_work`), else all of them."""
    return process_share(range(n)) if splits_work(tree) else list(range(n))


def is_local(mesh) -> bool:
    """Whether every device of `mesh` belongs to this process."""
    return all(d.process_index == jax.process_index() for d in np.asarray(mesh.devices).flat)


def corpus_share(docs: Sequence[T], mesh) -> list[T]:
    """The statistics documents this process streams (all of them in a one-process job). A
    mesh spanning processes runs each step on all of them at once: not supported here."""
    if jax.process_count() == 1:
        return list(docs)
    if not is_local(mesh):
        raise ConfigError(
            "statistics over several processes run on each process's own devices (each streams "
            "its share of the corpus); this model's mesh spans processes"
        )
    return process_share(docs)
