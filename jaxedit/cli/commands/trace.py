"""jaxedit trace: causal tracing of one fact (heatmaps) or of a data set (average effects)."""

from __future__ import annotations

import json
import os

from jaxedit import progress
from jaxedit.cli.shared import load_model
from jaxedit.errors import InputError
from jaxedit.io.atomic import check_out_dir, write_text_atomic
from jaxedit.locate import atp  # registers the "atp" tracer with trace_dataset
from jaxedit.locate import trace as tr

MAX_SAMPLES = 1000  # corrupted runs: ROME uses 10; beyond this, memory rather than insight grows

NAME = "trace"
HELP = "causal tracing: where a fact is recalled (one prompt, or averages over a data set)"


def add_arguments(p):
    p.add_argument("--prompt", help="the prompt, e.g. 'The Eiffel Tower is located in the city of'")
    p.add_argument("--subject", help="the subject, a substring of the prompt")
    p.add_argument("--data", help="JSON facts (ROME known facts / CounterFact records)")
    p.add_argument("--n", type=int, default=50, help="data-set mode: facts to trace (default 50)")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="comma list of hidden, mlp, attn")
    p.add_argument("--samples", type=int, default=10, help="corrupted runs (default 10)")
    p.add_argument("--noise", default="3s", help="'3s' (3 sigma of subject embeddings) or FLOAT")
    p.add_argument("--window", type=int, default=10, help="restored layers for mlp/attn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="trace_out", help="output directory (default trace_out)")
    p.add_argument("--force", action="store_true", help="overwrite the files of an earlier --out")
    p.add_argument("--format", default="png", choices=("png", "pdf"), help="figure format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--method",
        default="exact",
        choices=("exact", "atp"),
        help="exact: the patching grid (one run per cell); atp: attribution patching, every "
        "cell estimated from one forward + backward per noise sample (Kramár et al. 2024)",
    )
    p.add_argument("--graddrop", action="store_true", help="atp: AtP*'s GradDrop (L backwards)")
    p.add_argument(
        "--verify-top",
        type=int,
        default=0,
        metavar="K",
        help="atp: re-run the exact patch on the K highest cells of each kind",
    )
    p.add_argument(
        "--ig-steps",
        type=int,
        default=1,
        metavar="K",
        help="atp: average the gradient over K inputs interpolated from clean to corrupted "
        "(integrated gradients, K forward + backward passes per sample; 1 = plain AtP)",
    )


def run(args) -> dict:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.data is None and (args.prompt is None or args.subject is None):
        raise InputError("give --prompt and --subject (one fact) or --data FILE (a data set)")
    if args.data is not None and args.n <= 0:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise InputError(f"--samples must be 1..{MAX_SAMPLES}, got {args.samples}")
    if args.method != "atp" and (args.graddrop or args.verify_top or args.ig_steps != 1):
        raise InputError("--graddrop, --verify-top and --ig-steps go with --method atp")
    if args.verify_top < 0:
        raise InputError(f"--verify-top must be >= 0, got {args.verify_top}")
    if args.ig_steps < 1:
        raise InputError(f"--ig-steps must be >= 1, got {args.ig_steps}")
    atp_options = {
        "graddrop": args.graddrop,
        "verify_top": args.verify_top,
        "ig_steps": args.ig_steps,
    }
    check_out_dir(args.out, force=args.force, resumable=False)  # before the model loads
    lm = load_model(args)
    from jaxedit.locate import plots

    if args.data is not None:
        # Read more records than --n: facts the model gets wrong are skipped, not traced.
        facts = tr.load_facts(args.data)
        summary, results = tr.trace_dataset(
            lm,
            facts,
            kinds=kinds,
            samples=args.samples,
            noise=_noise(args.noise),
            window=args.window,
            seed=args.seed,
            limit=args.n,
            progress=progress.shown(),
            method=args.method,
            atp_options=atp_options if args.method == "atp" else None,
        )
        if summary["n_facts"] == 0:
            raise InputError("the model predicted none of the facts correctly: nothing to average")
        if "mlp" in summary["kinds"] and "last subject token" in summary["kinds"]["mlp"]:
            summary["mlp_peak_layer_last_subject_token"] = tr.peak_layer(summary)
        # Each fact's grid, one trace.json object per line, beside the averages.
        lines = "".join(json.dumps(tr.to_json(r)) + "\n" for r in results)
        write_text_atomic(os.path.join(args.out, "facts.jsonl"), lines)
        _write(os.path.join(args.out, "summary.json"), summary)
        fig = plots.save_average_effects(
            summary, os.path.join(args.out, f"average_effects.{args.format}")
        )
        return {**summary, "figure": fig, "out": args.out}
    one = dict(kinds=kinds, samples=args.samples, noise=_noise(args.noise), window=args.window)
    if args.method == "atp":
        result = atp.atp_trace(lm, args.prompt, args.subject, seed=args.seed, **one, **atp_options)
    else:
        result = tr.trace(lm, args.prompt, args.subject, seed=args.seed, **one)
    plots.save_heatmaps(result, args.out, args.format)
    out = tr.to_json(result)
    _write(os.path.join(args.out, "trace.json"), out)
    return out


def _noise(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _write(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def render(r: dict) -> str:
    if "tokens" not in r:  # data-set mode
        lines = [
            f"{r['n_facts']} facts traced, {r['n_skipped']} skipped (wrong clean prediction), "
            f"{r['n_invalid']} invalid; {r['seconds']:.1f} s",
            f"avg high score {r['avg_high_score']:.3f}, avg low score {r['avg_low_score']:.3f}",
        ]
        for kind, classes in r["kinds"].items():
            for cls, v in classes.items():
                peak = max(range(len(v["mean"])), key=v["mean"].__getitem__)
                lines.append(
                    f"  {kind:6s} {cls:24s} peak layer {peak:2d}  AIE {v['mean'][peak]:.3f}"
                )
        lines.append(f"wrote {r['out']}/summary.json, facts.jsonl and {r['figure']}")
        return "\n".join(lines)
    b, e = r["subject_range"]
    lines = [
        f"{r['prompt']!r} -> {r['answer']!r}: high score {r['high_score']:.4f}, "
        f"low score {r['low_score']:.4f} (noise {r['noise']:.3f}, {r['samples']} samples)",
        f"subject tokens {b}..{e - 1}: {r['tokens'][b:e]}",
    ]
    for kind, v in r["kinds"].items():
        scores = v["scores"]
        best = max(
            ((s, i, j) for i, row in enumerate(scores) for j, s in enumerate(row) if s is not None),
            default=(float("nan"), -1, -1),
        )
        lines.append(
            f"  {kind:6s} max p={best[0]:.4f} at token {best[1]} {r['tokens'][best[1]]!r}, "
            f"layer {best[2]}"
        )
    if r.get("method") == "atp":
        lines.insert(0, "attribution patching (AtP" + ("* GradDrop" if r["graddrop"] else "") + ")")
        for kind, cells in r.get("verified", {}).items():
            for c in cells:
                lines.append(
                    f"  verified {kind:6s} token {c['token']:2d} layer {c['layer']:2d}: "
                    f"estimate {c['estimate']:.4f}, exact {c['exact']:.4f}"
                )
    lines.append(f"{r['seconds']:.1f} s")
    return "\n".join(lines)
