"""`je.load(..., mesh=...)`: safetensors read block by block straight into the sharded layout.

Runs in a subprocess with 8 simulated CPU devices (the test process has one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "goldens"


def _run_with_devices(n: int, code: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One subprocess for every check (start-up and compiles dominate)."""
    out = tmp_path_factory.mktemp("export")
    return _run_with_devices(
        8,
        f"""
        import json, math
        import jax, numpy as np
        from jaxedit.io import checkpoint
        from jaxedit.io.checkpoint import load, save_hf
        from jaxedit.models import sharding

        golden = {str(GOLDEN)!r}
        reads = {{"elements": 0, "whole": []}}
        get_slice, get = checkpoint._SafetensorsSource.get_slice, checkpoint._SafetensorsSource.get

        def counting_slice(self, name, index):
            block = get_slice(self, name, index)
            reads["elements"] += block.size
            return block

        def counting_get(self, name):
            reads["whole"].append(name)
            return get(self, name)

        def blocks(x):
            return {{tuple(sl.indices(n)[:2] for sl, n in zip(s.index, x.shape))
                     for s in x.addressable_shards}}

        checkpoint._SafetensorsSource.get_slice = counting_slice
        checkpoint._SafetensorsSource.get = counting_get
        out = {{}}
        for fam, spec, dtype in [
            ("llama", "fsdp=8", "float32"),
            ("llama", "fsdp=4,tensor=2", "bfloat16"),
            ("llama", "data=2,fsdp=2,tensor=2", "float32"),
            ("gpt2", "fsdp=4,tensor=2", "float32"),
            ("gpt_neox", "data=2,fsdp=2,tensor=2", "bfloat16"),
        ]:
            reads["elements"], reads["whole"] = 0, []
            mesh = sharding.make_mesh(spec)
            a = load(f"{{golden}}/{{fam}}", dtype=dtype, mesh=mesh)
            sliced, whole = reads["elements"], list(reads["whole"])
            plain = load(f"{{golden}}/{{fam}}", dtype=dtype)
            b = sharding.shard(plain, mesh)
            want = sharding.param_shardings(a.config, a.params, mesh)
            la, lb, lw = (jax.tree.leaves(t) for t in (a.params, b.params, want))
            out[f"{{fam}} {{spec}}"] = {{
                "equal": all(
                    np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
                    for x, y in zip(la, lb)
                ),
                "shardings": all(x.sharding == w for x, w in zip(la, lw)),
                "dtypes": sorted({{str(x.dtype) for x in la}}),
                "sliced": sliced,
                "whole": whole,
                # elements of every distinct device block of every param (devices holding
                # the same block share one read)
                "device_elements": sum(
                    math.prod(x.sharding.shard_shape(x.shape)) * len(blocks(x)) for x in la
                ),
                "fingerprint_same": a.fingerprint() == plain.fingerprint(),
            }}
        # a mesh given as a spec string, and export of the sharded model
        a = load(f"{{golden}}/llama", mesh="fsdp=8")
        save_hf(a, {str(out / "sharded")!r})
        save_hf(load(f"{{golden}}/llama"), {str(out / "plain")!r}, max_shard_bytes=20_000)
        # GGUF: loaded, then placed on the mesh
        g = load("smollm2-135m", mesh="fsdp=4,tensor=2")
        leaf = g.params["blocks"]["mlp"]["down"]["kernel"]
        out["gguf_spec"] = str(leaf.sharding.spec)
        out["gguf_fraction"] = leaf.addressable_shards[0].data.size / leaf.size
        print(json.dumps(out))
        """,
    ) | {"export": str(out)}


@pytest.mark.parametrize(
    "case",
    [
        "llama fsdp=8",
        "llama fsdp=4,tensor=2",
        "llama data=2,fsdp=2,tensor=2",
        "gpt2 fsdp=4,tensor=2",
        "gpt_neox data=2,fsdp=2,tensor=2",
    ],
)
def test_loaded_on_mesh_equals_loaded_then_sharded(results, case):
    r = results[case]
    assert r["equal"] and r["shardings"]
    assert len(r["dtypes"]) == 1  # every leaf in the requested dtype
    assert r["fingerprint_same"]  # the files, config and dtype decide: not the placement


def test_llama_reads_only_each_devices_blocks(results):
    """Llama's tensors are all sliceable (as stored or transposed): nothing is read whole, and
    the elements read are exactly those of the devices' distinct blocks (a block that several
    devices hold, e.g. a norm scale or a `data` replica, is read once)."""
    for case in ("llama fsdp=8", "llama fsdp=4,tensor=2", "llama data=2,fsdp=2,tensor=2"):
        r = results[case]
        assert r["whole"] == []
        assert r["sliced"] == r["device_elements"]


def test_fused_qkv_is_read_whole_one_tensor_at_a_time(results):
    """GPT-2's fused c_attn is split by the loader: it is read whole (and cut), the rest
    sliced."""
    r = results["gpt2 fsdp=4,tensor=2"]
    assert r["whole"] and all("c_attn" in name for name in r["whole"])
    assert 0 < r["sliced"] < r["device_elements"]


def test_export_of_sharded_model_and_split_files(results):
    from safetensors.numpy import load_file

    d = Path(results["export"])
    sharded = load_file(d / "sharded" / "model.safetensors")
    index = json.loads((d / "plain" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    plain = {}
    for f in files:
        plain.update(load_file(d / "plain" / f))
    assert sharded.keys() == plain.keys() == index["weight_map"].keys()
    for name, arr in plain.items():
        np.testing.assert_array_equal(sharded[name], arr)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in plain.values())


def test_gguf_loads_then_shards(results):
    assert results["gguf_spec"] == "P(None, 'tensor', 'fsdp')"
    assert results["gguf_fraction"] == 1 / 8


def test_split_export_loads_back(tmp_path):
    """A split export (index + several files) loads to the same params."""
    import jax

    from jaxedit.io.checkpoint import load, save_hf

    lm = load(GOLDEN / "gpt2")
    again = load(save_hf(lm, tmp_path / "out", max_shard_bytes=10_000))
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
