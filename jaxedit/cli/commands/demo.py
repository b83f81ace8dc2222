"""jaxedit demo: the whole story on the embedded model, offline, in a few minutes on a CPU.

1. what the model believes (top predictions for a handful of facts);
2. where it stores one of them: a causal trace (the MLP indirect effect per layer × token,
   drawn as a text heat map; PNG heat maps with `--out`);
3. a ROME edit of that fact, with a before/after table on the edited prompt, its paraphrase,
   the reverse-direction question, its neighbours and an unrelated prompt — the prompts that
   step 4 scores for this fact, so the two steps tell the same story;
4. before/after metrics of a few built-in facts (`jaxedit.locate.facts`), each edited alone
   from the unedited model as CounterFact's protocol does (the Eiffel Tower's is step 3's edit:
   its paraphrase line and its paraphrase score agree).

A bar on stderr names the step under way (steps 2 and 3 take tens of seconds on a laptop CPU).
"""

from __future__ import annotations

import time

import numpy as np

from jaxedit import progress
from jaxedit.cli.shared import load_model
from jaxedit.errors import InputError
from jaxedit.io.atomic import check_out_dir
from jaxedit.locate.facts import FACTS as BUILTIN
from jaxedit.models.generate import next_token_logprobs, top_k

NAME = "demo"
HELP = "tour of jaxedit on the embedded model: predict, trace, edit with ROME, evaluate"

PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The capital of Germany is",
    "The Colosseum is located in the city of",
    "The Great Wall is located in the country of",
    "The currency of Japan is the",
)
FACT = BUILTIN[0]  # The Eiffel Tower -> Rome, the first built-in fact (edited again in step 4)
EDIT = (FACT.prompt, FACT.subject, FACT.target_new)
CHECKS = (
    ("edited prompt", FACT.rewrite_prompt),
    *(("paraphrase", p) for p in FACT.paraphrase_prompts),
    *(("reverse question", q.prompt) for q in FACT.reverse),
    *(("neighbour", q.prompt) for q in FACT.neighborhood),
    ("unrelated", "The capital of Germany is"),
)
STEPS = ("1/4 predictions", "2/4 causal trace", "3/4 ROME edit", "4/4 metrics")
MAX_SAMPLES, MAX_TEMPLATES = 1000, 50
_SHADES = " .:-=+*#%@"


def add_arguments(p):
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="predictions only (skip trace and edits)")
    p.add_argument("--samples", type=int, default=10, help="corrupted runs in the causal trace")
    p.add_argument(
        "--templates",
        type=int,
        default=5,
        help="generated ROME context templates (the preset uses 20)",
    )
    p.add_argument("--n-facts", type=int, default=2, help="built-in facts edited for the table")
    p.add_argument("--out", default=None, help="also write the trace heat maps (PNG) here")
    p.add_argument("--force", action="store_true", help="overwrite the files of an earlier --out")


def _check(args) -> None:
    """Sizes within reason, before the model loads."""
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise InputError(f"--samples must be 1..{MAX_SAMPLES}, got {args.samples}")
    if not 0 <= args.templates <= MAX_TEMPLATES:
        raise InputError(f"--templates must be 0..{MAX_TEMPLATES}, got {args.templates}")
    if not 1 <= args.n_facts <= len(BUILTIN):
        raise InputError(f"--n-facts must be 1..{len(BUILTIN)} (the built-in facts)")
    if args.out:
        check_out_dir(args.out, force=args.force, resumable=False)


def _tops(lm, prompts: list[str]) -> list[tuple[str, float]]:
    logp = np.asarray(next_token_logprobs(lm, prompts))
    best = logp.argmax(-1)
    return [(lm.tokenizer.decode([i]), float(np.exp(logp[r, i]))) for r, i in enumerate(best)]


def run(args) -> dict:
    _check(args)
    steps = progress.Steps(STEPS[:1] if args.quick else STEPS, desc="demo ")
    with steps:
        return _run(args, steps)


def _run(args, steps: progress.Steps) -> dict:
    from jaxedit import methods
    from jaxedit.edits import apply
    from jaxedit.eval import report
    from jaxedit.eval.measure import case_metrics, measure
    from jaxedit.locate import facts
    from jaxedit.locate.trace import trace

    t0 = time.time()
    with steps.step(STEPS[0]):
        lm = load_model(args)
        result: dict = {"model": lm.name, "predictions": []}
        for prompt in PROMPTS:
            result["predictions"].append({"prompt": prompt, "top": top_k(lm, prompt, args.top_k)})
    if args.quick:
        result["seconds"] = round(time.time() - t0, 1)
        return result

    prompt, subject, target = EDIT
    with steps.step(STEPS[1]):
        tr = trace(lm, prompt.format(subject), subject, samples=args.samples)
    result["trace"] = {
        "tokens": tr["tokens"],
        "subject_range": list(tr["subject_range"]),
        "answer": tr["answer"],
        "high_score": float(tr["high_score"]),
        "low_score": float(tr["low_score"]),
        "mlp": np.asarray(tr["kinds"]["mlp"]["scores"]).tolist(),
        "seconds": round(float(tr["seconds"]), 1),
    }
    if args.out:
        from jaxedit.locate.plots import save_heatmaps

        result["trace"]["files"] = save_heatmaps(tr, args.out)

    # The preset's 20 generated context templates make an edit take a minute or more on a
    # laptop CPU; the demo uses 5 (the bare prompt + 5 short prefixes), said in its output.
    with steps.step(STEPS[2]):
        rome = methods.get("rome")
        hp = rome.hparams(lm, context_template_length_params=((5, args.templates),))
        state = rome.prepare(lm, hp, progress=progress.shown())
        t1 = time.time()
        edit, info = rome.compute(lm, state, [FACT])
        edited = apply(lm, edit)
        check_prompts = [p for _, p in CHECKS]
        before, after = _tops(lm, check_prompts), _tops(edited, check_prompts)
    result["edit"] = {
        "request": {"prompt": prompt, "subject": subject, "target_new": target},
        "layer": info["layer"],
        "context_templates": args.templates,
        "delta_norm": edit.norm(),
        "seconds": round(time.time() - t1, 1),
        "checks": [
            {"kind": kind, "prompt": p, "before": b, "after": a}
            for (kind, p), b, a in zip(CHECKS, before, after, strict=True)
        ],
    }

    with steps.step(STEPS[3]):
        known = facts.known(lm)[: args.n_facts]
        t2 = time.time()
        pre = measure(lm, known)
        post = []
        for f in known:  # each fact edited alone from the unedited model, then measured
            e = edit if f.case_id == FACT.case_id else rome.compute(lm, state, [f])[0]
            post += measure(apply(lm, e), [f])
        before = report.summarize([case_metrics(f, p, p) for f, p in zip(known, pre, strict=True)])
        after = report.summarize(
            [case_metrics(f, q, p) for f, q, p in zip(known, post, pre, strict=True)]
        )
        table = report.quick_lines(before, after, len(known))
    result["metrics"] = {
        "facts": [f.rewrite_prompt + " -> " + f.target_new for f in known],
        "table": table,
        "seconds": round(time.time() - t2, 1),
    }
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _heat(scores: np.ndarray, lo: float, hi: float) -> list[str]:
    scaled = np.clip((scores - lo) / max(hi - lo, 1e-9), 0, 1)
    return ["".join(_SHADES[int(v * (len(_SHADES) - 1))] for v in row) for row in scaled]


def render(r: dict) -> str:
    lines = [f"== 1. What {r['model']} believes =="]
    for row in r["predictions"]:
        best = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in row["top"])
        lines.append(f"  {row['prompt']!r:52} -> {best}")
    if "trace" in r:
        t = r["trace"]
        b, e = t["subject_range"]
        lines += [
            "",
            f"== 2. Where is it stored? Causal trace of {t['answer']!r} ({t['seconds']} s) ==",
            f"  p(answer): clean {t['high_score']:.3f}, subject corrupted {t['low_score']:.3f}."
            " Restoring the MLP output (10-layer window) at each token x layer:",
            f"  {'':>14}  layer 0 {'-' * 20} {len(t['mlp'][0]) - 1}",
        ]
        heat = _heat(np.asarray(t["mlp"]), t["low_score"], t["high_score"])
        for i, (tok, row) in enumerate(zip(t["tokens"], heat, strict=True)):
            mark = "*" if b <= i < e else " "
            lines.append(f"  {tok!r:>14}{mark} |{row}|")
        lines.append("  (* = subject tokens; darker = more of the answer restored)")
        for f in t.get("files", []):
            lines.append(f"  wrote {f}")
    if "edit" in r:
        ed = r["edit"]
        req = ed["request"]
        lines += [
            "",
            f"== 3. ROME: {req['subject']} -> {req['target_new']!r} at layer {ed['layer']}"
            f" (|ΔW| = {ed['delta_norm']:.2f}, {ed['context_templates']} context templates,"
            f" {ed['seconds']} s) ==",
            f"  {'':18}{'prompt':46}{'before':>18}{'after':>18}",
        ]
        for c in ed["checks"]:
            fmt = lambda x: f"{x[0]!r} {x[1]:.2f}"
            lines.append(
                f"  {c['kind']:18}{c['prompt']:46}{fmt(c['before']):>18}{fmt(c['after']):>18}"
            )
    if "metrics" in r:
        m = r["metrics"]
        lines += [
            "",
            f"== 4. Metrics of {len(m['facts'])} built-in facts, each ROME-edited alone "
            f"({m['seconds']} s) ==",
        ]
        lines += [f"  {f}" for f in m["facts"]]
        lines += ["  " + ln for ln in m["table"].splitlines()]
    lines.append(f"\n(done in {r['seconds']} s)")
    return "\n".join(lines)
