"""Sharded runs against single-device runs, on simulated CPU devices (`tests/test_sharding.py`).

Run in a subprocess: the device count is fixed when jax starts, and the rest of the suite
runs on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py \
        --models llama,gpt2 --meshes "fsdp=8;fsdp=4,tensor=2;data=2,fsdp=2,tensor=2" [--what ...]

Prints one JSON line: for each model, the single-device references' sizes, and for each mesh
the relative error ‖sharded − single‖ / ‖single‖ of logits (batch split over data·fsdp),
generation, trace grids, key statistics C, ROME / MEMIT / AlphaEdit deltas, the edited params,
IKE scores; whether an edit kept every param's sharding; and the param bytes on each device
against the bytes the specs predict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jaxtyping import install_import_hook  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
with install_import_hook("jaxedit", "beartype.beartype"):  # the suite's runtime shape checks
    import jaxedit as je
    from jaxedit.edits import ContextEdit
    from jaxedit.eval.scoring import score_targets
    from jaxedit.locate import trace as tr
    from jaxedit.methods import alphaedit, memit, rome
    from jaxedit.models import sharding as sh
    from jaxedit.models.transformer import forward_jit, init_params
    from jaxedit.stats.second_moment import second_moments

WHAT = ("logits", "apply", "generate", "ike", "stats", "trace", "rome", "memit", "alphaedit")
WHAT += ("mend",)
REQS = [
    je.EditRequest("{} is in", "Rome", "Paris"),
    je.EditRequest("{} speaks", "Anna", "Greek"),
]
TEMPLATES = ("{}", "Yes. {}", "So: {}")


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ over the finite entries (NaN where b is NaN must be NaN in a too)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.inf
    ok = ~np.isnan(b)
    if not ok.any() or not np.isfinite(b[ok]).all():
        return math.inf  # nothing to compare is a failure, not a pass
    return float(np.linalg.norm(a[ok] - b[ok]) / max(np.linalg.norm(b[ok]), 1e-30))


def tiny(name: str):
    """A random 3-layer model of the family with a real tokenizer (fp32)."""
    from conftest import tiny_llama_config

    if name == "llama":  # GQA: 4 query heads, 2 key/value heads
        smol = je.load("smollm2-135m")
        cfg = tiny_llama_config(smol.config.vocab_size)
        tok = smol.tokenizer
    elif name == "gpt2":  # learned positions, LayerNorm, biases, tied embeddings
        g = je.load(os.path.join(HERE, "goldens", "gpt2"))
        cfg, tok = g.config.replace(n_layers=3), g.tokenizer
    else:
        raise SystemExit(f"unknown model {name}")
    return je.LanguageModel(f"tiny-{name}", cfg, init_params(cfg, 0), tok)


def spd(F: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    return (Q * np.logspace(-2, 0, F)) @ Q.T


def hparams(lm):
    F = lm.config.d_ff
    C = {layer: spd(F, layer) for layer in range(lm.config.n_layers)}
    common = dict(v_num_grad_steps=5, context_templates=TEMPLATES)
    # Layers below the last: a value written at the last layer's subject token reaches no
    # loss but the KL at that token, whose gradient at δ = 0 is 0, and Adam's first step
    # sign(g) of a zero gradient is rounding noise on any device.
    r = rome.ROMEHparams(layer=1, **common)
    m = memit.MEMITHparams(layers=(0, 1), z_lanes=2, **common)
    a = alphaedit.AlphaEditHparams(layers=(0, 1), z_lanes=2, nullspace_threshold=0.1, **common)
    return C, r, m, a


def keeps_sharding(before, after) -> bool:
    return all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def run_all(lm, what) -> tuple[dict, dict]:
    """Every quantity of `what` on `lm` (sharded or not), and the seconds each took."""
    out: dict = {}
    seconds: dict = {}
    for item in what:
        t0 = time.perf_counter()
        out.update(ITEMS[item](lm))
        seconds[item] = round(time.perf_counter() - t0, 1)
    return out, seconds


def item_logits(lm) -> dict:
    """Logits of a padded batch, split over the mesh's batch axes (data · fsdp)."""
    cfg, mesh = lm.config, sh.mesh_of(lm.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), bool)
    mask[3, 9:] = False
    logits = forward_jit(cfg, lm.params, *sh.put_batch(mesh, tokens, mask)).logits
    split = mesh is not None and logits.sharding.spec[0] is not None
    return {"logits": np.asarray(logits), "logits_batch_split": split}


def item_apply(lm) -> dict:
    """A low-rank and a dense delta on two layers that are not consecutive (both update paths
    of `add_to_weights`), and one on another site."""
    rng = np.random.default_rng(2)
    F, D = lm.config.d_ff, lm.config.d_model
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    edit = je.WeightEdit(
        (
            je.WeightDelta("mlp_out", 0, left=f32(F, 2), right=f32(D, 2)),
            je.WeightDelta("mlp_out", 2, dense=f32(F, D)),
            je.WeightDelta("mlp_up", 1, left=f32(D, 1), right=f32(F, 1)),
        )
    )
    edited = je.apply(lm, edit)
    # donated (in place) on a copy placed like the model, which `lm`'s other items still use
    own = lm.with_params(
        jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), lm.params)
    )
    donated = je.apply(own, edit, donate=True)
    return {
        "apply": flat(edited.params),
        "apply_keeps_sharding": keeps_sharding(lm.params, edited.params),
        "apply_donated": flat(donated.params),
        "apply_donated_keeps_sharding": keeps_sharding(lm.params, donated.params),
    }


def item_generate(lm) -> dict:
    return {"generate": je.generate(lm, "Rome is in", 6)}


def item_trace(lm) -> dict:
    t = tr.trace(lm, "Rome is in the city of", "Rome", samples=2, seed=1, window=2)
    return {
        "trace": np.stack([t["kinds"][k]["scores"] for k in tr.KINDS]),
        "trace_scores": np.asarray([t["high_score"], t["low_score"]]),
    }


def item_stats(lm) -> dict:
    """C of two layers in one pass: on the model's mesh when sharded, else on ONE device."""
    cfg, mesh = lm.config, sh.mesh_of(lm.params)
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (30, 17, 9, 44, 25, 12)]
    devices = None if mesh is not None else jax.devices()[:1]
    C, n = second_moments(lm, (0, 2), docs, batch_tokens=128, devices=devices)
    return {"stats": np.stack([C[0], C[2]]), "stats_tokens": n}


def item_rome(lm) -> dict:
    """Two requests: the second is computed on the (sharded) model with the first applied."""
    C, hp, _, _ = hparams(lm)
    edit, _ = rome.compute(lm, rome.make_state(lm, hp, C[1]), REQS)
    edited = je.apply(lm, edit)
    return {
        "rome": np.stack([d.matrix() for d in edit.deltas]),
        "rome_params": np.asarray(je.get_weight(edited.params, "mlp_out", 1)),
        "rome_keeps_sharding": keeps_sharding(lm.params, edited.params),
    }


def item_memit(lm) -> dict:
    C, _, hp, _ = hparams(lm)
    edit, _ = memit.compute(lm, memit.make_state(lm, hp, C), REQS)
    return {"memit": np.stack([d.matrix() for d in edit.deltas])}


def item_alphaedit(lm) -> dict:
    C, _, _, hp = hparams(lm)
    edit, _, _ = alphaedit.step(lm, alphaedit.make_state(lm, memit.make_state(lm, hp, C)), REQS)
    return {"alphaedit": np.stack([d.matrix() for d in edit.deltas])}


def item_ike(lm) -> dict:
    """Scores after an IKE context edit (the context runs once into a prefix KV cache)."""
    ctx = ContextEdit(("Rome is in Paris.",), reserve_tokens=8)  # GPT-2's 64 positions
    s = score_targets(lm.with_context(ctx), ["Rome is in", "Anna speaks"], ["Paris", "Greek"])
    return {"ike": np.asarray(s.nll, np.float64)}


def item_mend(lm) -> dict:
    """One MEND meta-training step (Adam applied) on 8 edits, split over data·fsdp on a mesh
    (`train.split_edits`): the editor after the step and the metrics."""
    from jaxedit.methods.mend import data as md
    from jaxedit.methods.mend import state as st
    from jaxedit.methods.mend import train as mt
    from jaxedit.methods.mend.hparams import MENDHparams, make_layout

    hp = MENDHparams(rank=8, batch=8, accumulate=1, lr=1e-3, lr_lr=1e-3, max_len=24)
    layout = make_layout(lm.config, hp)
    names = ["Rome", "Oslo", "Lima", "Kyiv", "Baku", "Doha", "Riga", "Bern"]
    cases = [
        md.Case(f"{a} is in", names[i - 1], f"{a} lies in", f"{b} is in", b)
        for i, (a, b) in enumerate(zip(names, names[2:] + names[:2], strict=True))
    ]
    batch = md.tokenize_cases(lm.tokenizer, cases, hp.max_len)
    assert len(batch) == 8
    step, _ = mt.jit_steps(lm.config, layout, hp)
    state = st.init_state(layout, hp)
    after, metrics = step(lm.params, state, mt.split_edits(sh.mesh_of(lm.params), batch))
    keys = sorted(metrics)
    return {
        "mend": flat(after.editor) - flat(state.editor),  # the step's change of the editor
        "mend_metrics": np.asarray([float(metrics[k]) for k in keys]),
    }


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])


ITEMS = {k: globals()[f"item_{k}"] for k in WHAT}


def compare(ref: dict, got: dict) -> dict:
    """Arrays: relative error; facts about the sharded run (`*_keeps_sharding`, `*_split`):
    the sharded run's value; anything else (text, token counts): equal or not."""
    res = {}
    for k, v in ref.items():
        if isinstance(v, np.ndarray):
            res[k] = rel(got[k], v)
        elif k.endswith(("_keeps_sharding", "_split")):
            res[k] = bool(got[k])
        else:
            res[k] = got[k] == v
    return res


def bytes_report(cfg, params, mesh) -> dict:
    """Bytes per device (measured from the arrays' shards) against the bytes the specs
    predict, and against total / (fsdp · tensor)."""
    per_dev = sh.device_bytes(params)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(sh.param_specs(cfg, params, mesh), is_leaf=is_spec)
    predicted = 0
    for leaf, spec in zip(jax.tree.leaves(params), specs, strict=True):
        ways = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= mesh.shape[axis]
        predicted += leaf.nbytes // ways
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    split = mesh.shape["fsdp"] * mesh.shape["tensor"]
    return {
        "total": total,
        "per_device": sorted(set(per_dev.values())),
        "devices": len(per_dev),
        "predicted": predicted,
        "ideal": total / split,
        "ratio_to_ideal": max(per_dev.values()) / (total / split),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--meshes", default="fsdp=8;fsdp=4,tensor=2;data=2,fsdp=2,tensor=2")
    ap.add_argument("--what", default=",".join(WHAT))
    args = ap.parse_args()
    what = tuple(args.what.split(","))
    report: dict = {"devices": jax.device_count(), "models": {}}
    for name in args.models.split(","):
        lm = tiny(name)
        ref, ref_seconds = run_all(lm, what)
        entry: dict = {"reference_seconds": ref_seconds, "meshes": {}}
        for spec in args.meshes.split(";"):
            mesh = je.make_mesh(spec)
            slm = je.shard(lm, mesh)
            got, seconds = run_all(slm, what)
            entry["meshes"][spec] = {
                **compare(ref, got),
                "bytes": bytes_report(lm.config, slm.params, mesh),
                "seconds": seconds,
            }
            print(f"{name} {spec}: {entry['meshes'][spec]}", file=sys.stderr, flush=True)
        report["models"][name] = entry
    print(json.dumps(report))


if __name__ == "__main__":
    main()
