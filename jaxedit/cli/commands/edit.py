"""jaxedit edit: edit a fact with any registered method and show the predictions before/after.

    jaxedit edit --method rome --prompt "{} is located in the city of" \
        --subject "The Eiffel Tower" --target "Rome" --check "The capital of Germany is"

The method runs through the protocol only (`jaxedit.methods`: hparams -> prepare -> compute ->
`jaxedit.apply`); its settings come from its hparams dataclass: `--hparams PRESET|FILE` and
`--set key=value`. `--requests FILE.jsonl` edits many facts, one after another, as one edit.
`--save-edit FILE` writes the edit alone (`jaxedit.load_edit` reads it back); `--save DIR` the
edited model (weight edits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxedit.cli.method_args import add_method_arguments, hparams_json, method_and_hparams
from jaxedit.cli.shared import load_model
from jaxedit.edits import WeightEdit, apply, save_edit
from jaxedit.errors import InputError
from jaxedit.io.checkpoint import save_hf
from jaxedit.models.generate import top_k
from jaxedit.requests import EditRequest, from_prompt

NAME = "edit"
HELP = "edit a fact (ROME, MEND, IKE, ...) and compare top predictions before and after"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_method_arguments(p, default="rome")
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
        "--save-edit",
        default=None,
        metavar="FILE",
        help="write the edit alone (.safetensors; jaxedit.load_edit reads it)",
    )


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


def run(args) -> dict:
    # Validate everything cheap before the expensive part: nothing is written on an error.
    reqs = _requests(args)
    if args.top_k <= 0:
        raise InputError("--top-k must be positive")
    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise InputError(f"--save {args.save}: exists and is not empty")
    lm = load_model(args)
    method, hp = method_and_hparams(args, lm)
    prompts = [r.rewrite_prompt for r in reqs] + list(args.check)
    before = [{"prompt": q, "top": top_k(lm, q, args.top_k)} for q in prompts]
    t0 = time.perf_counter()
    state = method.prepare(lm, hp, cache_dir=args.cache_dir, progress=not args.json)
    t1 = time.perf_counter()
    edit, info = method.compute(lm, state, reqs)
    edited = apply(lm, edit)
    t2 = time.perf_counter()
    if args.save and not isinstance(edit, WeightEdit):
        raise InputError(f"--save: {method.name} changes no weight; use --save-edit")
    after = [{"prompt": q, "top": top_k(edited, q, args.top_k)} for q in prompts]
    out = {
        "method": method.name,
        "model": lm.name,
        "request": _request_json(reqs[0]),
        "before": before,
        "after": after,
        "edit": _edit_summary(edit),
        "seconds": {"prepare": round(t1 - t0, 3), "edit": round(t2 - t1, 3)},
        "hparams": hparams_json(hp),
        "info": info,
    }
    if len(reqs) > 1:
        out["requests"] = [_request_json(r) for r in reqs]
    if args.save_edit:
        out["saved_edit"] = str(save_edit(edit, args.save_edit))
    if args.save:
        out["saved"] = str(save_hf(edited, args.save))
    return out


def _edit_summary(edit) -> dict:
    if isinstance(edit, WeightEdit):
        return {
            "kind": "weight",
            "weights": [f"{site}.{layer}" for site, layer in edit.sites()],
            "norm": edit.norm(),
        }
    return {
        "kind": "context",
        "facts": list(edit.facts),
        "demonstrations": len(edit.demonstrations),
    }


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
    e = r["edit"]
    if e["kind"] == "weight" and e["weights"]:
        lines.append(f"  weights: {', '.join(e['weights'])}, |ΔW| = {e['norm']:.4g}")
    elif e["kind"] == "context":
        lines.append(f"  context: {len(e['facts'])} fact(s), {e['demonstrations']} demonstrations")
    s = r["seconds"]
    lines.append(f"  time: preparation {s['prepare']} s, edit {s['edit']} s")
    for k in ("saved", "saved_edit"):
        if k in r:
            lines.append(f"  {k.replace('_', ' ')}: {r[k]}")
    return "\n".join(lines)
