"""Roofline: how close each pipeline runs to this machine's own limits.

Measured in one run, on the embedded SmolLM2-135M (fp32):

- the machine: CPU model and flags (AVX2 / AVX-512 / AMX decide XLA's and PyTorch's kernels),
  cores, affinity, load;
- peaks: dense fp32 matrix products on the shapes the pipelines use, through XLA (`jax.jit`)
  and numpy (OpenBLAS / MKL), and memory bandwidth (a large copy, read + write bytes);
- each pipeline at its default size: its FLOPs counted analytically (matrix products and
  attention, 2 per multiply-add, the work the compiled programs actually execute, padding
  included; XLA's own cost analysis counts a scanned layer once, so it is not used), the
  bytes it must move at least (weights read per pass, written parameter stacks), its time,
  hence achieved FLOP/s and the fraction of its roofline min(matmul peak, intensity x
  bandwidth); a pipeline whose intensity puts it under the bandwidth line is memory-bound.

Times are CPU seconds of this process (all threads; pin it: `taskset -c 0`): on a machine that
others share, that is the work done rather than the wait; wall seconds are recorded too.

Pipelines:
    forward       forward_jit, B=8 x T=64, logits at every position (benchmarks/forward.py)
    trace         the exact causal-tracing grid (jaxedit.locate.trace), 10 samples, 3 kinds,
                  on the rows of one token (the per-cell kernel of every row; --trace-rows)
    stats         second moment of MLP keys at ROME's layer over wikitext (4,096 tokens;
                  documents packed into rows, the forward stopped at the layer's key)
    rome_step     one v* step (forward from ROME's layer + backward to δ, 21 template rows)
    mend_edit     one MEND edit returning a new model; also as a multiple of its own forward
                  + backward (the edit's gradient factors: its lower bound)
    mend_edit_in_place
                  one MEND edit of a sequence, replacing the model (`je.apply(..., donate=True)`:
                  the edited layers written into the old stacks' buffers)
    eval_scoring  teacher-forced scoring of the queries of 40 CounterFact cases

With PyTorch installed, the statistics are also run by benchmarks/rome.py's reference
(`layer_stats`-style hook, forward stopped at the layer) on the same documents: the ratio of
the medians of `--stats-rounds` rounds, one call of each side per round (a load that changes
during the run hits both). `--only stats --out benchmarks/results/roofline_stats.json` runs
the statistics alone (peaks included) without touching roofline.json.

    taskset -c 0 uv run python benchmarks/roofline.py  # -> benchmarks/results/roofline.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine import machine  # benchmarks/machine.py, beside this script

from jaxedit import compile_cache

HERE = Path(__file__).parent
DATA = HERE.parent.parent / "shared" / "data"
OUT = HERE / "results" / "roofline.json"
PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


# ----------------------------------------------------------------------------- timing


def timed(fn, min_cpu_s: float = 2.0, max_calls: int = 50) -> dict:
    """CPU and wall seconds per call of `fn` (called once first: compile, warm caches)."""
    jax.block_until_ready(fn())
    calls, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while calls < max_calls and (calls == 0 or time.process_time() - cpu0 < min_cpu_s):
        jax.block_until_ready(fn())
        calls += 1
    return {
        "cpu_s": (time.process_time() - cpu0) / calls,
        "wall_s": (time.perf_counter() - wall0) / calls,
        "calls": calls,
    }


# ----------------------------------------------------------------------------- peaks


def matmul_peaks(shapes) -> dict:
    """fp32 GFLOP/s of C = A @ B per shape, XLA and numpy, per CPU second and per wall second."""
    rng = np.random.default_rng(0)
    out = {}
    for M, K, N in shapes:
        a = rng.standard_normal((M, K), np.float32)
        b = rng.standard_normal((K, N), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        mm = jax.jit(jnp.matmul)
        flops = 2.0 * M * K * N
        x, n = timed(lambda: mm(ja, jb), 1.0), timed(lambda: a @ b, 1.0)  # noqa: B023
        out[f"{M}x{K}x{N}"] = {
            "xla_gflops": flops / x["cpu_s"] / 1e9,
            "numpy_gflops": flops / n["cpu_s"] / 1e9,
            "xla_gflops_wall": flops / x["wall_s"] / 1e9,
            "numpy_gflops_wall": flops / n["wall_s"] / 1e9,
        }
    return out


def bandwidth(n_bytes: int = 256 << 20) -> dict:
    """GB/s of a large copy (bytes read + bytes written), numpy and XLA."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    ja = jnp.asarray(a)
    add = jax.jit(lambda x: x + 1.0)
    n = timed(lambda: np.copyto(b, a), 1.0)
    x = timed(lambda: add(ja), 1.0)
    return {
        "numpy_copy_gbs": 2 * n_bytes / n["cpu_s"] / 1e9,
        "xla_gbs": 2 * n_bytes / x["cpu_s"] / 1e9,
        "bytes": n_bytes,
    }


# ----------------------------------------------------------------------------- FLOP models


def block_flops(cfg, n_q: int, n_kv: int, to_key: bool = False) -> float:
    """One block for n_q query tokens attending to n_kv keys (one row); `to_key`: stopped at
    `mlp_key` (no down projection)."""
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    proj = 2 * n_q * D * (H * K + 2 * G * K) + 2 * n_q * H * K * D
    attn = 4 * n_q * n_kv * H * K  # scores and the weighted sum
    mlp = 2 * n_q * D * F * ((2 if cfg.gated_mlp else 1) + (0 if to_key else 1))
    return float(proj + attn + mlp)


def logits_flops(cfg, n: int) -> float:
    return 2.0 * n * cfg.d_model * cfg.vocab_size


def layer_bytes(cfg, itemsize: int = 4) -> int:
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return itemsize * (D * (H * K + 2 * G * K) + H * K * D + D * F * (3 if cfg.gated_mlp else 2))


def embed_bytes(cfg, itemsize: int = 4) -> int:
    return itemsize * cfg.vocab_size * cfg.d_model


def roofline(name, flops, bytes_moved, t, peak, bw, **extra) -> dict:
    """The pipeline's entry: achieved FLOP/s against min(peak, intensity x bandwidth)."""
    achieved = flops / t["cpu_s"]
    intensity = flops / bytes_moved
    bound_bw = intensity * bw
    bound = min(peak, bound_bw)
    return {
        "achieved_flops": achieved,
        "peak_flops": bound,
        "fraction": achieved / bound,
        "fraction_of_matmul_peak": achieved / peak,
        "bound": "memory" if bound_bw < peak else "compute",
        "bandwidth_bound_flops": bound_bw,
        "flops": flops,
        "bytes_min": bytes_moved,
        "intensity_flops_per_byte": intensity,
        "cpu_s": t["cpu_s"],
        "wall_s": t["wall_s"],
        **extra,
    }


# ----------------------------------------------------------------------------- pipelines


def p_forward(lm, peak, bw):
    from jaxedit.models.transformer import forward_jit

    cfg, B, T = lm.config, 8, 64
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), bool)
    t = timed(lambda: forward_jit(cfg, lm.params, tokens, mask).logits)
    flops = B * cfg.n_layers * block_flops(cfg, T, T) + logits_flops(cfg, B * T)
    nbytes = cfg.n_layers * layer_bytes(cfg) + embed_bytes(cfg) + 4 * B * T * cfg.vocab_size
    return roofline("forward", flops, nbytes, t, peak, bw, shape=[B, T])


def p_trace(lm, peak, bw, rows):
    from jaxedit.locate import trace as tr

    cfg, S = lm.config, 10
    ids, (b, e), T, pad, _ = tr.encode_fact(lm, PROMPT, SUBJECT)
    rows = [e - 1] if rows is None else rows  # default: the last subject token
    t = timed(lambda: tr.trace(lm, PROMPT, SUBJECT, samples=S, rows=rows), 5.0, 3)
    L = cfg.n_layers
    groups = tr.plan_cells(L, tr.KINDS, [pad + r for r in rows], T, 10)
    flops = nbytes = useful = 0.0
    for suffix, part, n in tr.chunk_plan(groups, L, S, 4096):
        start = int(part[:, 5].min())
        per_cell = S * ((L - start) * block_flops(cfg, suffix, T) + logits_flops(cfg, 1))
        flops += len(part) * per_cell
        # the cells themselves: from their own start layer, real cells only
        useful += sum(
            S * ((L - c[5]) * block_flops(cfg, suffix, T) + logits_flops(cfg, 1)) for c in part[:n]
        )
        nbytes += (L - start) * layer_bytes(cfg) + embed_bytes(cfg)
    prep = (1 + S) * (L * block_flops(cfg, T, T) + logits_flops(cfg, 1))
    flops, useful = flops + prep, useful + prep
    nbytes += 2 * (L * layer_bytes(cfg) + embed_bytes(cfg))
    n_cells = sum(len(c) for c in groups.values())
    return roofline(
        "trace", flops, nbytes, t, peak, bw, cells=n_cells, rows=rows, samples=S,
        useful_flops=useful, useful_fraction_of_executed=useful / flops,
        note="executed FLOPs include a chunk's cells run from the chunk's lowest start layer "
        "and padded chunk slots; useful_flops counts each cell from its own start layer",
    )  # fmt: skip


def _docs(lm, n_tokens):
    from jaxedit import stats

    return stats.load_corpus(lm, str(DATA / "wikitext" / "wiki.test.raw"), n_tokens=n_tokens,
                             max_len=256).docs  # fmt: skip


def p_stats(lm, peak, bw, layer, docs, torch_model, rounds=3):
    from jaxedit.stats.second_moment import pack_segments, second_moment

    cfg, F = lm.config, lm.config.d_ff
    run = lambda: second_moment(lm, layer, docs)[0]  # noqa: E731
    if torch_model is None:
        t = timed(run, 3.0, 3)
    else:  # both sides in turns, so that a change in the machine's load hits both alike
        rome_bench = _load_module(HERE / "rome.py", "rome_bench")
        torch_run = lambda: rome_bench.torch_stats(torch_model, layer, docs, 4096)  # noqa: E731
        t, t_torch = _interleaved(run, torch_run, rounds)
    flops = nbytes = 0.0
    n_tok = 0
    shapes = []
    # as second_moment runs it: packed rows (attention over the whole row, the block-diagonal
    # mask applied to it), blocks 0..layer-1 whole, block `layer` up to its key, Σ k kᵀ
    for tokens, _, _ in pack_segments(docs, 0, 4096):
        B, T = tokens.shape
        blocks = layer * block_flops(cfg, T, T) + block_flops(cfg, T, T, to_key=True)
        flops += B * blocks + 2.0 * B * T * F * F
        nbytes += (layer + 1) * layer_bytes(cfg) - 4 * cfg.d_model * F + 4 * F * F
        n_tok += B * T
        shapes.append([B, T])
    real = sum(map(len, docs))
    extra = {
        "layer": layer,
        "tokens": real,
        "positions_computed": n_tok,
        "batch_shapes": shapes,
        "tokens_per_s": real / t["cpu_s"],
    }
    if torch_model is not None:
        extra["jaxedit_cpu_s_per_round"] = t["rounds"]
        extra["pytorch_reference"] = {
            "name": "benchmarks/rome.py torch_stats: transformers + pre-hook on down_proj, "
            "forward stopped at the layer, batches by ROME's length_collation (kmeng01/rome "
            "layer_stats), same documents",
            "cpu_s": t_torch["cpu_s"],
            "wall_s": t_torch["wall_s"],
            "cpu_s_per_round": t_torch["rounds"],
            "tokens_per_s": real / t_torch["cpu_s"],
            "jaxedit_over_pytorch": t_torch["cpu_s"] / t["cpu_s"],
            "timing": f"median of {rounds} rounds, each one call of each side in turn, after "
            "a warm-up call of each",
        }
    return roofline("stats", flops, nbytes, t, peak, bw, **extra)


def _interleaved(a, b, rounds: int) -> tuple[dict, dict]:
    """CPU and wall seconds of `a` and of `b` (each called once first), the median over
    `rounds` rounds of one call of each."""
    jax.block_until_ready(a())
    b()
    times = {"a": [], "b": []}
    for _ in range(rounds):
        for name, fn in (("a", a), ("b", b)):
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))

    def summary(ts):
        return {
            "cpu_s": float(np.median([c for c, _ in ts])),
            "wall_s": float(np.median([w for _, w in ts])),
            "calls": len(ts),
            "rounds": [round(c, 3) for c, _ in ts],
        }

    return summary(times["a"]), summary(times["b"])


def p_rome_step(lm, peak, bw, layer, steps=5):
    from jaxedit.methods.common import target_opt as to

    cfg = lm.config
    # ROME's 1 + 10 + 10 context templates (5- and 10-token prefixes), fixed text: the shapes
    # of a real edit without sampling them.
    short = "Here is a short note. {}"
    long = "The following text was written by a student for the class. {}"
    templates = ("{}",) + (short,) * 10 + (long,) * 10
    b = to.target_batch(lm.tokenizer, "{} is located in the city of", SUBJECT, "Rome", templates)
    S = to.suffix_length(b)
    tokens, mask, lookup, logit_pos = (jnp.asarray(x) for x in (b.tokens, b.mask, b.lookup,
                                                                 b.logit_pos))  # fmt: skip
    values, logp, suffix = to.clean_run(
        cfg, "mlp_out", layer, S, lm.params, tokens, mask, lookup, logit_pos
    )
    R = b.targets.shape[0]
    v0, kl_init = values[0], logp[R:]
    hp = to.TargetSettings(steps=1000, early_stop_loss=0.0).arrays()
    carry0 = to.init_carry(cfg.d_model)

    def run():
        return to.run_steps_jit(
            cfg, "mlp_out", layer, lm.params, suffix, jnp.asarray(b.targets),
            jnp.asarray(b.weights), kl_init, v0, hp, carry0, jnp.int32(steps),
        ).delta  # fmt: skip

    t = timed(run, 3.0, 5)
    t = {k: v / steps if k != "calls" else v for k, v in t.items()}
    B, T = b.tokens.shape
    N = b.targets.shape[1]
    L = cfg.n_layers
    fwd = B * (L - layer) * block_flops(cfg, S, T) + logits_flops(cfg, B * N)
    flops = 2 * fwd  # + the backward to δ: activation gradients only (no weight gradients)
    nbytes = 2 * ((L - layer) * layer_bytes(cfg) + embed_bytes(cfg))
    return roofline(
        "rome_step", flops, nbytes, t, peak, bw, rows=B, suffix=S, layer=layer,
        note="per step of the v* loop (run_steps, Adam, clamp), backward = forward FLOPs",
    )  # fmt: skip


def _mend_setup(lm):
    """An (untrained) MEND editor's state, one CounterFact request, the edit's own forward +
    backward (its lower bound), its FLOPs and the bytes its forward reads. `main` makes it once,
    so both MEND pipelines are measured against the same forward + backward time."""
    from jaxedit.eval import datasets as data_mod
    from jaxedit.methods import mend
    from jaxedit.methods.mend import editor as ed
    from jaxedit.methods.mend import factors as fa
    from jaxedit.methods.mend import inputs, method

    cfg, L = lm.config, lm.config.n_layers
    hp = mend.METHOD.hparams(lm.name)
    layout = mend.make_layout(cfg, hp)
    trained = mend.TrainedEditor(
        ed.init_editor(jax.random.key(0), layout, hp), ed.init_norm(layout), layout, hp, 0, {}
    )
    state = method.make_state(lm, trained)
    req = data_mod.load(DATA / "counterfact" / "counterfact-edit.json", n=1).requests[0]
    ids, lab = inputs.encode_pair(lm.tokenizer, req.rewrite_prompt, req.target_new)
    enc = inputs.pad_pairs(lm.tokenizer, [(ids, lab)], 16)

    @jax.jit
    def own(params, tokens, mask, labels):  # the edit's forward + backward: its lower bound
        return fa.edit_factors(cfg, params, layout, inputs.labelled(tokens, mask, labels, 8))

    t_fb = timed(lambda: own(lm.params, *enc), 3.0, 20)
    B, T = enc[0].shape
    top = L - fa.first_layer(layout)
    flops = B * (L * block_flops(cfg, T, T) + top * block_flops(cfg, T, T)) + 2 * logits_flops(
        cfg, B * 8
    )
    read = L * layer_bytes(cfg) + embed_bytes(cfg)  # the forward reads every weight
    return mend.METHOD, state, req, layout, t_fb, flops, read


def p_mend_edit(lm, peak, bw, xla_write_bw, setup):
    import jaxedit as je

    M, state, req, layout, t_fb, flops, read = setup
    cfg, L = lm.config, lm.config.n_layers
    t = timed(lambda: je.apply(lm, M.compute(lm, state, [req])[0]).params, 5.0, 10)
    edit = M.compute(lm, state, [req])[0]
    # The two halves: the factors and the editor, then the new parameter tree (each edited
    # [L, D, F] stack written anew: immutable params, no donated buffer).
    t_compute = timed(lambda: jax.tree.leaves(M.compute(lm, state, [req])[0]), 3.0, 10)
    t_apply = timed(lambda: je.apply(lm, edit).params, 3.0, 10)
    stacked = {(s, layer) for s, layer in layout.weights}
    n_stacks = len({s for s, _ in stacked})
    stack_bytes = 4 * L * cfg.d_model * cfg.d_ff  # one [L, D, F] MLP kernel stack
    copied = 2 * n_stacks * stack_bytes  # apply: each edited stack read and written
    return roofline(
        "mend_edit", flops, read + copied, t, peak, bw,
        edited_weights=len(stacked),
        own_forward_backward_cpu_s=t_fb["cpu_s"],
        latency_over_own_forward_backward=t["cpu_s"] / t_fb["cpu_s"],
        compute_cpu_s=t_compute["cpu_s"],
        apply_cpu_s=t_apply["cpu_s"],
        apply_bytes=copied,
        apply_gbs=copied / t_apply["cpu_s"] / 1e9,
        apply_fraction_of_xla_write_rate=copied / t_apply["cpu_s"] / xla_write_bw,
        note="latency_over_own_forward_backward: the whole edit (factors, editor, updates, the "
        "new parameter tree) over the edit's own forward + backward (edit_factors: the forward "
        "of all blocks and the backward through the edited ones), its lower bound; "
        "compute_cpu_s / apply_cpu_s: METHOD.compute (factors, editor) and je.apply (the new "
        "params: apply_bytes read and written, at apply_gbs); apply_fraction_of_xla_write_rate: "
        "apply_gbs over bandwidth.xla_gbs, the rate at which XLA writes any new array here "
        "(fresh buffers faulted in 4 KB pages: benchmarks/fresh_buffers.py)",
    )  # fmt: skip


def p_mend_edit_in_place(lm, peak, bw, setup):
    """MEND edits in sequence, each replacing the model: `je.apply(..., donate=True)` writes
    the edited layers into the old stacks' buffers, so only those layers are moved."""
    import jaxedit as je

    M, state, req, layout, t_fb, flops, read = setup
    cfg = lm.config
    current = [lm.with_params(jax.tree.map(jnp.array, lm.params))]  # a copy to consume

    def edit_in_place():
        cur = current[0]
        current[0] = je.apply(cur, M.compute(cur, state, [req])[0], donate=True)
        return current[0].params

    t = timed(edit_in_place, 5.0, 10)
    edit = M.compute(current[0], state, [req])[0]

    def apply_in_place():
        current[0] = je.apply(current[0], edit, donate=True)
        return current[0].params

    t_apply = timed(apply_in_place, 3.0, 20)
    written = 2 * len(layout.weights) * 4 * cfg.d_model * cfg.d_ff  # edited layers, read + write
    return roofline(
        "mend_edit_in_place", flops, read + written, t, peak, bw,
        own_forward_backward_cpu_s=t_fb["cpu_s"],
        latency_over_own_forward_backward=t["cpu_s"] / t_fb["cpu_s"],
        apply_cpu_s=t_apply["cpu_s"],
        note="one MEND edit of a sequence, the model replaced (je.apply(..., donate=True): the "
        "edited stacks updated in their own buffers); latency_over_own_forward_backward as "
        "mend_edit's; apply_cpu_s: the in-place je.apply alone",
    )  # fmt: skip


def p_eval_scoring(lm, peak, bw, n_cases=40):
    from jaxedit.eval import datasets as data_mod
    from jaxedit.eval import scoring
    from jaxedit.eval.measure import queries

    cfg = lm.config
    reqs = data_mod.load(DATA / "counterfact" / "counterfact-edit.json", n=n_cases).requests
    pairs = sorted({(p, tg) for r in reqs for _, p, tg in queries(r)})
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    p_ids, t_ids = scoring.encode_queries(lm.tokenizer, prompts, targets)
    base = scoring.lm_scorer(lm)
    shapes = []

    def scorer(tokens, mask, positions, targets):  # records the shapes actually run
        shapes.append((tokens.shape, positions.shape))
        return base(tokens, mask, positions, targets)

    def run():
        shapes.clear()
        return scoring.score_ids(scorer, p_ids, t_ids, pad_id=lm.tokenizer.pad_id).logprobs[0]

    t = timed(run, 3.0, 10)
    flops = sum(
        B * cfg.n_layers * block_flops(cfg, T, T) + logits_flops(cfg, B * P)
        for (B, T), (_, P) in shapes
    )
    nbytes = len(shapes) * (cfg.n_layers * layer_bytes(cfg) + embed_bytes(cfg))
    return roofline(
        "eval_scoring", flops, nbytes, t, peak, bw, cases=n_cases, queries=len(pairs),
        calls=len(shapes),
    )  # fmt: skip


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch_model(lm):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import tempfile

    from jaxedit.io.checkpoint import save_hf

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as d:
        save_hf(lm, Path(d) / "m")
        model = AutoModelForCausalLM.from_pretrained(Path(d) / "m", dtype=torch.float32).eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", help="comma list of pipelines to run (default: all)")
    ap.add_argument("--trace-rows", help="token rows of the trace (default: last subject token)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch statistics")
    ap.add_argument(
        "--stats-rounds",
        type=int,
        default=3,
        help="rounds of the statistics, jaxedit and PyTorch in turn (median)",
    )
    args = ap.parse_args()
    compile_cache.enable()
    import jaxedit as je
    from jaxedit.io.checkpoint import load

    t_start, c_start = time.perf_counter(), time.process_time()
    lm = load("smollm2-135m")
    cfg = lm.config
    rome_layer = je.methods.get("rome").hparams(lm.name).layer
    result = {"machine": machine(), "model": lm.name}
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = [(4096, D, F), (4096, F, D), (4096, D, D), (640, D, V), (160, D, F)]
    shapes.append((1024, 1024, 1024))
    result["matmul"] = matmul_peaks(shapes)
    result["bandwidth"] = bandwidth()
    peak = max(v["xla_gflops"] for v in result["matmul"].values()) * 1e9
    bw = max(result["bandwidth"]["numpy_copy_gbs"], result["bandwidth"]["xla_gbs"]) * 1e9
    result["machine"]["peak_matmul_flops_xla"] = peak
    result["machine"]["peak_matmul_flops_numpy"] = (
        max(v["numpy_gflops"] for v in result["matmul"].values()) * 1e9
    )
    result["machine"]["bandwidth_bytes_per_s"] = bw
    print(json.dumps(result["machine"], indent=1), flush=True)

    only = set(args.only.split(",")) if args.only else None
    rows = [int(r) for r in args.trace_rows.split(",")] if args.trace_rows else None
    docs = _docs(lm, 4096)
    torch_model = None if args.no_torch else _torch_model(lm)
    mend_setup = functools.cache(lambda: _mend_setup(lm))  # shared by both MEND pipelines
    runs = {
        "forward": lambda: p_forward(lm, peak, bw),
        "trace": lambda: p_trace(lm, peak, bw, rows),
        "stats": lambda: p_stats(lm, peak, bw, rome_layer, docs, torch_model, args.stats_rounds),
        "rome_step": lambda: p_rome_step(lm, peak, bw, rome_layer),
        "mend_edit": lambda: p_mend_edit(
            lm, peak, bw, result["bandwidth"]["xla_gbs"] * 1e9, mend_setup()
        ),
        "mend_edit_in_place": lambda: p_mend_edit_in_place(lm, peak, bw, mend_setup()),
        "eval_scoring": lambda: p_eval_scoring(lm, peak, bw),
    }
    pipelines = {}
    if args.out.exists() and only:  # a partial run keeps the other pipelines' entries
        pipelines = json.loads(args.out.read_text()).get("pipelines", {})
    for name, fn in runs.items():
        if only and name not in only:
            continue
        pipelines[name] = fn()
        p = pipelines[name]
        print(
            f"{name:13s} {p['achieved_flops'] / 1e9:7.1f} GFLOP/s of {p['peak_flops'] / 1e9:7.1f}"
            f" ({p['bound']}-bound): {100 * p['fraction']:5.1f} %",
            flush=True,
        )
    result["pipelines"] = pipelines
    result["seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time() - c_start
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
