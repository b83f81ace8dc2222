"""jaxedit edit: edit a fact with any registered method and show the predictions before/after.

    jaxedit edit --method rome --prompt "{} is located in the city of" \
        --subject "The Eiffel Tower" --target "Rome" --check "The capital of Germany is"

Each method contributes its own flags (`--hparams`, ...) through its `add_arguments`; a flag
two methods share is defined once. `--requests FILE.jsonl` edits many facts, one after another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from jaxedit.cli.shared import SharedFlags, load_model
from jaxedit.errors import InputError
from jaxedit.io.checkpoint import save_hf
from jaxedit.methods import legacy as methods
from jaxedit.models.generate import top_k
from jaxedit.requests import EditRequest, from_prompt

NAME = "edit"
HELP = "edit a fact (ROME, MEND, IKE, ...) and compare top predictions before and after"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rome", help="editing method (default: rome)")
    p.add_argument("--prompt", help='prompt with "{}" for the subject (or containing it)')
    p.add_argument("--subject", help="the subject, e.g. 'The Eiffel Tower'")
    p.add_argument("--target", help="the new answer, e.g. 'Rome'")
    p.add_argument("--target-true", default=None, help="the current answer (optional)")
    p.add_argument(
        "--requests",
        default=None,
        help="JSONL file of requests {prompt, subject, target_new[, target_true]}",
    )
    p.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="PROMPT",
        help="also show predictions for this prompt (repeatable)",
    )
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per prompt")
    p.add_argument("--save", default=None, metavar="DIR", help="write the edited model (HF dir)")
    p.add_argument(
        "--save-delta", default=None, metavar="FILE", help="write the parameter change alone (.npz)"
    )
    shared = SharedFlags(p, p.add_argument_group("method options"))
    for name in methods.names():
        methods.get(name).add_arguments(shared)


def read_requests(path: str) -> list[EditRequest]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: {e}") from e
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i + 1}: not JSON ({e})") from e
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i + 1}: expected a JSON object")
        target = rec.get("target_new", rec.get("target"))
        if isinstance(target, dict):  # ROME's {"str": ...}
            target = target.get("str")
        missing = [
            k
            for k, v in (
                ("prompt", rec.get("prompt")),
                ("subject", rec.get("subject")),
                ("target_new", target),
            )
            if not isinstance(v, str)
        ]
        if missing:
            raise InputError(f"{path}:{i + 1}: missing string field(s) {missing}")
        true = rec.get("target_true")
        true = true.get("str") if isinstance(true, dict) else true
        try:
            out.append(from_prompt(rec["prompt"], rec["subject"], target, target_true=true))
        except InputError as e:
            raise InputError(f"{path}:{i + 1}: {e}") from e
    if not out:
        raise InputError(f"{path}: no requests")
    return out


def _requests(args) -> list[EditRequest]:
    if args.requests:
        if args.prompt or args.subject or args.target:
            raise InputError("give either --requests FILE or --prompt/--subject/--target")
        return read_requests(args.requests)
    if not (args.prompt and args.subject and args.target is not None):
        raise InputError("--prompt, --subject and --target are required (or --requests FILE)")
    return [from_prompt(args.prompt, args.subject, args.target, target_true=args.target_true)]


def _saver(method_name: str):
    try:
        mod = importlib.import_module(
            {"mend": "jaxedit.methods.mend.editor"}.get(
                method_name, f"jaxedit.methods.{method_name}"
            )
        )
    except ImportError:
        return None
    return getattr(mod, "save_record", None)


def run(args) -> dict:
    # Validate everything cheap before the expensive part: nothing is written on an error.
    reqs = _requests(args)
    if args.top_k <= 0:
        raise InputError("--top-k must be positive")
    method = methods.get(args.method)
    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise InputError(f"--save {args.save}: exists and is not empty")
    saver = _saver(method.name) if args.save_delta else None
    if args.save_delta and saver is None:
        raise InputError(f"method {method.name!r} has no parameter change to save (--save-delta)")
    lm = load_model(args)
    prompts = [r.rewrite_prompt for r in reqs] + list(args.check)
    before = [{"prompt": q, "top": top_k(lm, q, args.top_k)} for q in prompts]
    t0 = time.perf_counter()
    editor = method.prepare(lm, args)
    t1 = time.perf_counter()
    result = editor(lm, reqs)
    t2 = time.perf_counter()
    ctx = result.context or ""
    after = [{"prompt": q, "top": top_k(result.model, ctx + q, args.top_k)} for q in prompts]
    summary = result.summary or {}
    out = {
        "method": method.name,
        "model": lm.name,
        "request": _request_json(reqs[0]),
        "before": before,
        "after": after,
        "delta": {"layer": summary.get("layer"), "norm": summary.get("norm")}
        if "norm" in summary
        else None,
        "seconds": {"stats": round(t1 - t0, 3), "edit": round(t2 - t1, 3)},
        "summary": summary,
    }
    if len(reqs) > 1:
        out["requests"] = [_request_json(r) for r in reqs]
    if args.save_delta:
        out["saved_delta"] = str(saver(result.record, args.save_delta, {"model": lm.name}))
    if args.save:
        out["saved"] = str(save_hf(result.model, args.save))
    return out


def _request_json(r: EditRequest) -> dict:
    return {
        "prompt": r.prompt,
        "subject": r.subject,
        "target_new": r.target_new,
        "target_true": r.target_true,
    }


def render(r: dict) -> str:
    fmt = lambda top: ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in top)
    lines = [
        f"{r['method']} edit of {r['model']}: {r['request']['subject']!r} -> "
        f"{r['request']['target_new']!r}"
    ]
    for b, a in zip(r["before"], r["after"], strict=True):
        lines.append(f"  {b['prompt']!r}")
        lines.append(f"      before: {fmt(b['top'])}")
        lines.append(f"      after:  {fmt(a['top'])}")
    if r["delta"]:
        lines.append(f"  delta: layer {r['delta']['layer']}, |ΔW| = {r['delta']['norm']:.4g}")
    s = r["seconds"]
    lines.append(f"  time: preparation (statistics) {s['stats']} s, edit {s['edit']} s")
    for k in ("saved", "saved_delta"):
        if k in r:
            lines.append(f"  {k.replace('_', ' ')}: {r[k]}")
    return "\n".join(lines)
