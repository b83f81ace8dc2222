"""Sharding: the rule table (replication where whole heads do not divide), mesh specs and their
errors, and every pipeline on 8 simulated CPU devices equal to one device (in a subprocess:
the device count is fixed when jax starts; `tests/sharding_check.py` computes the numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_llama_config
from jax.sharding import AbstractMesh, PartitionSpec

import jaxedit as je
from jaxedit.cli.main import main as cli_main
from jaxedit.errors import ConfigError, InputError
from jaxedit.models import sharding as sh
from jaxedit.models.config import ModelConfig
from jaxedit.models.transformer import init_params, param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
TOL = 1e-5  # ‖sharded − single‖ / ‖single‖
BYTES_RATIO = {"llama": 1.01, "gpt2": 1.25}  # max bytes per device / (total / (fsdp·tensor))


def abstract(spec: str) -> AbstractMesh:
    sizes = sh.parse_mesh_spec(spec)
    return AbstractMesh(tuple(sizes[a] for a in sh.MESH_AXES), sh.MESH_AXES)


def specs(cfg: ModelConfig, spec: str) -> dict:
    return sh.param_specs(cfg, param_shapes(cfg), abstract(spec))


def per_device_bytes(cfg: ModelConfig, spec: str) -> int:
    """The param bytes one device holds on `spec`, from the rules (no devices needed)."""
    mesh = abstract(spec)
    shapes, out = param_shapes(cfg), 0
    flat = sh.param_specs(cfg, shapes, mesh)
    leaves = zip(
        jax.tree.leaves(shapes),
        jax.tree.leaves(flat, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        strict=True,
    )
    for leaf, ps in leaves:
        ways = 1
        for entry in ps:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= mesh.shape[axis]
        out += int(np.prod(leaf.shape)) * leaf.dtype.itemsize // ways
    return out


# ----------------------------------------------------------------------------- rules


def test_rules_split_whole_heads_and_replicate_what_does_not_divide(smollm):
    """SmolLM2-135M: 9 query heads, 3 KV heads -> attention replicated along heads on tensor=2
    (still split over fsdp along embed); MLP (1,536) and vocabulary (49,152) split."""
    s = specs(smollm.config, "fsdp=4,tensor=2")
    att, mlp = s["blocks"]["attn"], s["blocks"]["mlp"]
    assert att["q"]["kernel"] == PartitionSpec(None, "fsdp", None)
    assert att["k"]["kernel"] == PartitionSpec(None, "fsdp", None)
    assert att["o"]["kernel"] == PartitionSpec(None, None, "fsdp")
    assert mlp["up"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert mlp["down"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert s["embed"] == PartitionSpec("tensor", "fsdp")
    assert s["blocks"]["ln1"]["scale"] == PartitionSpec(None, None)  # norms: replicated
    # tensor=3 divides 9 and 3 heads: attention splits by whole heads
    s3 = specs(smollm.config, "tensor=3")
    assert s3["blocks"]["attn"]["q"]["kernel"] == PartitionSpec(None, None, "tensor")
    assert s3["blocks"]["attn"]["k"]["kernel"] == PartitionSpec(None, None, "tensor")
    assert s3["blocks"]["attn"]["o"]["kernel"] == PartitionSpec(None, "tensor", None)
    # 9 heads as a count: 9 x 64 = 576 columns divide by 2, yet a head is never cut
    counts = sh.logical_counts(smollm.config)
    assert counts["heads"] == 9 and counts["kv_heads"] == 3


def test_rules_on_tiny_gqa_and_gpt2_biases():
    cfg = tiny_llama_config(64)  # 4 query heads, 2 KV heads: both split on tensor=2
    s = specs(cfg, "data=2,fsdp=2,tensor=2")
    assert s["blocks"]["attn"]["q"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert s["blocks"]["attn"]["k"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    # params never split over data: pure data parallelism
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert all("data" not in str(p) for p in jax.tree.leaves(s, is_leaf=is_spec))
    g = je.load(os.path.join(ROOT, "tests", "goldens", "gpt2")).config  # q/k/v/o + mlp biases
    sg = specs(g, "fsdp=4,tensor=2")
    assert sg["blocks"]["attn"]["q"]["bias"] == PartitionSpec(None, "tensor")
    assert sg["blocks"]["mlp"]["down"]["bias"] == PartitionSpec(None, None)
    assert sg["pos_embed"] == PartitionSpec(None, "fsdp")


def test_a_mesh_axis_is_used_once_per_array_and_odd_sizes_replicate():
    mesh = abstract("fsdp=2,tensor=2")
    both = {"embed": "fsdp", "mlp": "fsdp"}  # a rule table sending two axes to one mesh axis
    assert sh.spec_for(("embed", "mlp"), mesh, rules=both) == PartitionSpec("fsdp", None)
    assert sh.spec_for(("embed",), mesh, {"embed": 33}) == PartitionSpec(None)
    assert sh.spec_for(("batch", None), mesh, shape=(6, 5)) == PartitionSpec("fsdp", None)
    m3 = abstract("data=2,fsdp=2")
    assert sh.spec_for(("batch",), m3, shape=(8,)) == PartitionSpec(("data", "fsdp"))
    assert sh.spec_for(("batch",), m3, shape=(6,)) == PartitionSpec(None)  # 6 % 4: replicated
    assert sh.batch_multiple(m3) == 4 and sh.batch_multiple(None) == 1


def test_each_device_holds_its_share_of_smollm(smollm):
    """Bytes per device from the rules: 1/8 of SmolLM2-135M on fsdp=8; on fsdp=4,tensor=2 more,
    because its attention (9 / 3 heads) is replicated over tensor; on data=2,fsdp=2,tensor=2
    a quarter-ish (params are replicated over data by design)."""
    cfg = smollm.config
    total = per_device_bytes(cfg, "data=1")
    assert per_device_bytes(cfg, "fsdp=8") / total == pytest.approx(1 / 8, rel=5e-3)  # + norms
    ft = per_device_bytes(cfg, "fsdp=4,tensor=2") / total
    assert 1 / 8 < ft < 1 / 6  # attention at 1/4, the rest at 1/8
    dft = per_device_bytes(cfg, "data=2,fsdp=2,tensor=2") / total
    assert dft == pytest.approx(2 * ft, rel=1e-3)


# ----------------------------------------------------------------------------- meshes


def test_mesh_specs_and_one_clear_error_on_a_device_mismatch():
    assert sh.parse_mesh_spec("fsdp=4, tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad, why in [
        ("fsdp=0", "positive"),
        ("pipe=2", "axes data, fsdp, tensor"),
        ("fsdp=2,fsdp=2", "twice"),
        ("", "at least one"),
    ]:
        with pytest.raises(ConfigError, match=why):
            sh.make_mesh(bad)
    with pytest.raises(ConfigError, match=r"fsdp=3 needs 3 devices but 1 are present"):
        sh.make_mesh("fsdp=3", jax.devices()[:1])
    m = sh.make_mesh("data=1")  # one device
    assert sh.mesh_of(init_params(tiny_llama_config(64), 0)) is None
    assert m.size == 1


def test_cli_refuses_a_mesh_that_does_not_fit_before_loading(capsys):
    rc = cli_main(["predict", "--mesh", "fsdp=3", "--prompt", "x", "--model", "/nonexistent"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "mesh fsdp=3 needs 3 devices" in err[0]  # not the missing model: checked first


def test_shard_and_the_cli_loader_keep_the_file_fingerprint():
    """Sharding moves values, it does not change them: a model loaded from files keeps its
    file-based fingerprint through `je.shard` (caches still match), and `--mesh` loads through
    `load(..., mesh=)` (streamed into the layout) to the same params and fingerprint."""
    import argparse

    from jaxedit.cli import shared

    golden = os.path.join(ROOT, "tests", "goldens", "llama")
    lm = je.load(golden)
    fp = lm.fingerprint()
    sharded = je.shard(lm, "data=1")
    leaf = sharded.params["blocks"]["mlp"]["down"]["kernel"]
    assert sh.mesh_of(sharded.params) is None and leaf.sharding.mesh.shape["data"] == 1
    assert sharded.fingerprint() == fp and sharded.origin is not None
    assert lm.with_params(sharded.params).fingerprint() != fp  # the origin is what keeps it
    shared._load.cache_clear()
    args = argparse.Namespace(model=golden, mesh="data=1", model_dtype="float32")
    via_cli = shared.load_model(args)
    assert via_cli.fingerprint() == fp
    for a, b in zip(jax.tree.leaves(via_cli.params), jax.tree.leaves(lm.params), strict=True):
        assert a.sharding.mesh.shape["data"] == 1 and np.array_equal(a, b)


def test_statistics_take_a_mesh_or_devices_not_both(smollm):
    from jaxedit.stats.second_moment import second_moments, stats_mesh

    with pytest.raises(InputError, match="not both"):
        second_moments(smollm, (0,), [[1, 2]], mesh=sh.make_mesh("data=1"), devices=jax.devices())
    assert stats_mesh(smollm).shape["data"] == jax.local_device_count()


# ----------------------------------------------------------------------------- 8 devices


def eight_cpu_devices_env() -> dict:
    """The environment of a subprocess that sees 8 simulated CPU devices."""
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }


def run_check(*args: str, timeout: int = 3000) -> dict:
    env = eight_cpu_devices_env()
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "sharding_check.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_report(report: dict, models: tuple[str, ...], meshes: tuple[str, ...]) -> None:
    assert report["devices"] == 8
    for name in models:
        for spec in meshes:
            r = report["models"][name]["meshes"][spec]
            where = f"{name} on {spec}"
            for key, value in r.items():
                if key in ("bytes", "seconds"):
                    continue
                if isinstance(value, bool):
                    assert value, f"{where}: {key}"
                else:
                    assert value <= TOL, f"{where}: {key} differs by {value:.2e}"
            b = r["bytes"]
            assert b["devices"] == 8 and b["per_device"] == [b["predicted"]], where
            # above total / (fsdp·tensor) only by what is replicated by rule: norms and biases
            # (3 % of the tiny GPT-2's bytes, 8 copies: x1.22; 0.01 % of the tiny Llama's)
            assert b["ratio_to_ideal"] < BYTES_RATIO[name], where


def test_tiny_models_on_three_meshes_equal_one_device():
    """Tiny Llama (GQA) and GPT-2 on fsdp=8, fsdp=4,tensor=2, data=2,fsdp=2,tensor=2: logits
    (batch split over data·fsdp), applied edits (shardings kept) and statistics C equal one
    device's; each device holds the bytes its specs say, about 1/(fsdp·tensor)."""
    report = run_check("--what", "logits,apply,stats", "--meshes", ";".join(MESHES))
    check_report(report, ("llama", "gpt2"), MESHES)
    for name in ("llama", "gpt2"):
        for spec in MESHES:
            r = report["models"][name]["meshes"][spec]
            assert r["logits_batch_split"] and r["apply_keeps_sharding"], (name, spec)


@pytest.mark.slow  # ~30 s; the slow full matrix runs ROME on every mesh
def test_rome_on_a_three_axis_mesh_equals_one_device():
    """ROME's deltas (two requests, the second on the sharded model edited by the first) on
    data=2,fsdp=2,tensor=2 equal one device's, and the edit keeps every param's sharding (the
    full matrix of methods and meshes is the slow test below)."""
    spec = "data=2,fsdp=2,tensor=2"
    report = run_check("--models", "llama", "--what", "rome", "--meshes", spec)
    check_report(report, ("llama",), (spec,))
    assert report["models"]["llama"]["meshes"][spec]["rome_keeps_sharding"]


@pytest.mark.slow
def test_every_pipeline_on_three_meshes_equals_one_device():
    """The full matrix: also generation, IKE scores, trace grids, MEMIT, AlphaEdit and a MEND
    meta-training step (its edits split over data·fsdp)."""
    # 2 models x (1 + 3 meshes) x 10 pipelines: about 40 minutes of CPU; more on a loaded machine
    report = run_check("--meshes", ";".join(MESHES), timeout=3 * 3600)
    check_report(report, ("llama", "gpt2"), MESHES)


# ----------------------------------------------------------------------------- the CLI, 8 devices


def cli(*args: str, timeout: int = 3000) -> dict:
    env = eight_cpu_devices_env()
    out = subprocess.run(
        [sys.executable, "-m", "jaxedit", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_cli_predict_on_fsdp8_equals_unsharded():
    """The acceptance's first CLI point: `jaxedit predict --mesh fsdp=8` gives the unsharded
    next-token probabilities over the whole vocabulary (within 1e-4), with the same top 10."""
    prompt = "The Eiffel Tower is located in the city of"
    vocab = str(je.load("smollm2-135m").config.vocab_size)
    one = cli("predict", "--prompt", prompt, "--top-k", vocab)
    eight = cli("predict", "--prompt", prompt, "--top-k", vocab, "--mesh", "fsdp=8")
    p1 = {t["id"]: t["prob"] for t in one["top"]}
    p8 = {t["id"]: t["prob"] for t in eight["top"]}
    assert p1.keys() == p8.keys() and len(p1) == int(vocab)
    ids = sorted(p1)
    diff = np.abs(np.array([p8[i] for i in ids]) - np.array([p1[i] for i in ids]))
    print(f"\npredict fsdp=8 vs one device: max |dp| {diff.max():.2e} over {len(ids)} tokens")
    assert diff.max() <= 1e-4
    assert [t["id"] for t in eight["top"][:10]] == [t["id"] for t in one["top"][:10]]


@pytest.mark.slow
def test_cli_rome_edit_on_a_mesh_gives_the_unsharded_answer(tmp_path):
    """`jaxedit edit --method rome --mesh fsdp=4,tensor=2` (statistics computed on the mesh,
    in its own cache) makes the model say what the unsharded edit makes it say, with the same
    rank-one delta up to float rounding."""
    base = [
        "edit", "--method", "rome", "--prompt", "{} is located in the city of",
        "--subject", "The Eiffel Tower", "--target", "Rome", "--set", "mom2_n_tokens=2048",
    ]  # fmt: skip
    one = cli(*base, "--cache-dir", str(tmp_path / "1"), "--save-edit", str(tmp_path / "1.st"))
    mesh = cli(
        *base, "--cache-dir", str(tmp_path / "8"), "--save-edit", str(tmp_path / "8.st"),
        "--mesh", "fsdp=4,tensor=2",
    )  # fmt: skip
    a, b = one["table"][0], mesh["table"][0]
    assert a["before"]["top1"] == b["before"]["top1"] == " Paris"
    assert b["after"]["top1"] == a["after"]["top1"] == " Rome"
    assert mesh["edit"]["weights"] == one["edit"]["weights"]
    d1, d8 = (je.load_edit(tmp_path / f).deltas for f in ("1.st", "8.st"))
    assert [(d.site, d.layer) for d in d1] == [(d.site, d.layer) for d in d8]
    m1, m8 = (np.stack([np.asarray(d.matrix(), np.float64) for d in ds]) for ds in (d1, d8))
    rel = float(np.linalg.norm(m8 - m1) / np.linalg.norm(m1))
    dp = abs(b["after"]["p_target"] - a["after"]["p_target"])
    print(
        f"\nrome fsdp=4,tensor=2 vs one device: p(Rome) {b['after']['p_target']:.4f} vs "
        f"{a['after']['p_target']:.4f} (|dp| {dp:.1e}), delta rel. diff {rel:.1e}"
    )
    assert dp < 1e-3 and rel < 1e-3
