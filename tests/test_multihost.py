"""Two processes on one machine (`jax.distributed`, gloo CPU collectives) as one job: each
streams its share of the statistics corpus, and together they compute the C one process does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxedit import distributed
from jaxedit.errors import ConfigError

GOLDEN = Path(__file__).parent / "goldens"

WORKER = """
import json, sys
import numpy as np
from jaxedit import distributed
info = distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))

from jaxedit.io.checkpoint import load
from jaxedit.stats import second_moment

local = {"tokens": 0}
accumulate = second_moment._accumulate

def counting(acc, count, step, bar):
    local["tokens"] += int(step[1])
    return accumulate(acc, count, step, bar)

second_moment._accumulate = counting
lm = load(sys.argv[3])
docs = json.loads(sys.argv[4])
C, n = second_moment.second_moments(lm, (0, 1), docs, batch_tokens=64)
cases = distributed.process_share(list(range(10)))
rows = distributed.allgather_json([{"case": c, "p": info["process_id"]} for c in cases])
print(json.dumps({
    "info": info,
    "count": n,
    "local_tokens": local["tokens"],
    "C0": np.asarray(C[0], np.float64).tolist(),
    "C1": np.asarray(C[1], np.float64).tolist(),
    "rows": rows,
}))
distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _docs() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 256, size=int(rng.integers(3, 40))).tolist() for _ in range(37)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    address = f"localhost:{_free_port()}"
    args = [str(GOLDEN / "llama"), json.dumps(_docs())]
    logs = tmp_path_factory.mktemp("processes")
    procs = []
    for p in range(2):
        # files, not pipes: a full pipe would block one process while the other waits for it
        out, err = open(logs / f"{p}.out", "w"), open(logs / f"{p}.err", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(WORKER), address, str(p), *args],
                env=env,
                stdout=out,
                stderr=err,
            )
        )
    results = []
    for p, proc in enumerate(procs):
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, (logs / f"{p}.err").read_text()[-3000:]
        results.append(json.loads((logs / f"{p}.out").read_text().strip().splitlines()[-1]))
    return results


@pytest.mark.slow  # two JAX processes on a shared 2-core machine: 1-3 minutes
def test_two_processes_compute_the_one_process_C(two_processes):
    from jaxedit.io.checkpoint import load
    from jaxedit.stats.second_moment import second_moments

    C, n = second_moments(load(GOLDEN / "llama"), (0, 1), _docs(), batch_tokens=64)
    total = sum(map(len, _docs()))
    for r in two_processes:
        assert r["info"]["num_processes"] == 2 and r["info"]["devices"] == 2
        assert r["count"] == n == total
        for layer in (0, 1):
            np.testing.assert_allclose(r[f"C{layer}"], C[layer], rtol=2e-5, atol=1e-7)
    # each process streamed only its share, and the shares cover the corpus
    local = [r["local_tokens"] for r in two_processes]
    assert sum(local) == total and all(0 < t < total for t in local)
    # the processes agree exactly (bytes summed in process order on both)
    assert two_processes[0]["C0"] == two_processes[1]["C0"]


@pytest.mark.slow
def test_evaluation_cases_split_and_gathered(two_processes):
    rows = two_processes[0]["rows"]
    assert rows == two_processes[1]["rows"]  # every process gets every process's rows
    assert sorted(r["case"] for part in rows for r in part) == list(range(10))
    assert [{r["p"] for r in part} for part in rows] == [{0}, {1}]


def test_single_process_helpers_are_identities():
    a = np.arange(6.0).reshape(2, 3)
    total, n = distributed.sum_over_processes(a, 7)
    assert np.array_equal(total, a) and n == 7
    assert distributed.allgather_json({"x": 1}) == [{"x": 1}]
    assert distributed.process_share([1, 2, 3]) == [1, 2, 3]
    assert distributed.process_share(list(range(7)), 1, 3) == [1, 4]


def test_initialize_refuses_partial_arguments(monkeypatch):
    for k in distributed.ENV.values():
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="together"):
        distributed.initialize("localhost:1234")
    monkeypatch.setenv("JAXEDIT_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="integer"):
        distributed.initialize()
    with pytest.raises(ConfigError, match="out of range"):
        distributed.initialize("localhost:1234", 2, 2)
