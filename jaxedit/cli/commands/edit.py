"""jaxedit edit: edit facts with any registered method and show the predictions before/after.

    jaxedit edit --method rome --prompt "{} is located in the city of" \
        --subject "The Eiffel Tower" --target "Rome" --check "The capital of Germany is"
    jaxedit edit --method memit --requests edits.jsonl [--n 100] [--show 5]

The method runs through the protocol only (`jaxedit.methods`: hparams -> prepare -> compute ->
`jaxedit.apply`); its settings come from its hparams dataclass: `--hparams PRESET|FILE` and
`--set key=value`.

`--requests FILE` edits many facts as one edit, all of them in ONE `compute` call (MEMIT and
AlphaEdit write them in one solve; ROME and FT edit them one after another, as their `compute`
does). FILE is JSON lines or a JSON list of `{prompt, subject, target_new (or target)[,
target_true]}` (prompt with "{}" or containing the subject; ROME's `{"str": ...}` targets are
accepted), or any data-set file `jaxedit.eval.datasets.load` reads (CounterFact, zsRE, KnowEdit,
MQuAKE); `--n N` takes the first N records. A compact table shows, for the first `--show`
requests, the top-1 prediction and p(target_new) before and after.

A model without a preset is edited with ROME hparams chosen for it (the layer from a causal
trace of facts it knows: `jaxedit.methods.common.auto_hparams`); the output names the layer and
`--explain` says why (for a preset or a file: which one, and its description). `--json` gives
p(target) before and after for every probe of the shown requests (the rewrite prompt and its
paraphrases: target_new; neighbourhood, portability and reverse probes: their answer) and for
each `--check` prompt (the unedited model's top-1 token).

`--save-edit FILE` writes the edit alone (`jaxedit.load_edit` reads it back; a weight edit
records the model it was made for, so that `jaxedit apply FILE [--invert]` can check it);
`--save DIR` the edited model (weight edits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jaxedit import hparams as hparams_lib
from jaxedit import progress
from jaxedit.cli.method_args import add_method_arguments, hparams_json, method_and_hparams
from jaxedit.cli.shared import load_model
from jaxedit.edit_target import stamp
from jaxedit.edits import WeightEdit, apply, save_edit
from jaxedit.errors import InputError
from jaxedit.eval import datasets
from jaxedit.eval.scoring import score_targets
from jaxedit.io.checkpoint import save_hf
from jaxedit.methods.common import auto_hparams
from jaxedit.models.generate import top_k
from jaxedit.models.lm import LanguageModel
from jaxedit.requests import EditRequest, from_prompt

NAME = "edit"
HELP = "edit facts (ROME, MEMIT, AlphaEdit, MEND, IKE, ...) and compare predictions before/after"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_method_arguments(p, default="rome")
    p.add_argument("--prompt", help='prompt with "{}" for the subject (or containing it)')
    p.add_argument("--subject", help="the subject, e.g. 'The Eiffel Tower'")
    p.add_argument("--target", help="the new answer, e.g. 'Rome'")
    p.add_argument("--target-true", default=None, help="the current answer (optional)")
    p.add_argument(
        "--requests",
        default=None,
        metavar="FILE",
        help="many requests, edited in one call: JSON lines or a JSON list of {prompt, subject, "
        "target_new[, target_true]}, or a data-set file (CounterFact, zsRE, KnowEdit, MQuAKE)",
    )
    p.add_argument("--n", type=int, default=None, help="with --requests: take the first N records")
    p.add_argument(
        "--show", type=int, default=5, help="requests shown in the before/after table (default 5)"
    )
    p.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="PROMPT",
        help="also show predictions for this prompt (repeatable)",
    )
    p.add_argument("--top-k", type=int, default=3, help="predictions shown per prompt")
    p.add_argument(
        "--explain",
        action="store_true",
        help="say which hparams were used and why (chosen automatically for a model without a "
        "preset: the layer from a causal trace)",
    )
    p.add_argument("--save", default=None, metavar="DIR", help="write the edited model (HF dir)")
    p.add_argument(
        "--save-edit",
        default=None,
        metavar="FILE",
        help="write the edit alone (.safetensors; jaxedit.load_edit reads it)",
    )


# ----------------------------------------------------------------------------- requests file


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON list / one JSON object / JSON-lines file;
    `where` names the line (JSON lines) or the list index, for error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"--requests {path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"--requests {path}: not UTF-8 text ({e.reason})") from e
    if not text.strip():
        raise InputError(f"--requests {path}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path, text)
    values = list(data.values()) if isinstance(data, dict) else []
    if len(values) == 1 and isinstance(values[0], list):
        data = values[0]  # {"data": [...]}, as datasets.read_records reads it
    if isinstance(data, dict):
        return [("line 1", data)]
    if not isinstance(data, list):
        raise InputError(
            f"--requests {path}: expected JSON objects, got a JSON {type(data).__name__}"
        )
    return [(f"record {i}", rec) for i, rec in enumerate(data)]


def _json_lines(path: Path, text: str) -> list[tuple[str, object]]:
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"--requests {path}: line {i}: not JSON ({e.msg})") from None
    return out


def _simple(rec: object) -> bool:
    return (
        isinstance(rec, dict)
        and {"prompt", "subject"} <= set(rec)
        and ("target_new" in rec or "target" in rec)
    )


def _string(value: object) -> object:
    """ROME's `{"str": ..., "id": ...}` targets as their string."""
    return value.get("str") if isinstance(value, dict) else value


def _request(rec: object) -> EditRequest:
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}")
    target = _string(rec.get("target_new", rec.get("target")))
    fields = {"prompt": rec.get("prompt"), "subject": rec.get("subject"), "target_new": target}
    missing = [k for k, v in fields.items() if not isinstance(v, str)]
    if missing:
        raise InputError(f"missing string field(s) {missing}")
    true = _string(rec.get("target_true"))
    if true is not None and not isinstance(true, str):
        raise InputError("target_true must be a string")
    return _checked(from_prompt(rec["prompt"], rec["subject"], target, target_true=true))


def _checked(req: EditRequest) -> EditRequest:
    """`req`, refused when its prompt is not a template with one "{}" for the subject (a
    second "{}" or a brace such as "{name}" would fail later, deep in formatting)."""
    try:
        ok = req.prompt.count("{}") == 1 and req.prompt.format("") is not None
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"prompt {req.prompt!r}: needs exactly one {{}} where the subject goes and no other "
            "braces (write a literal brace as {{ or }})"
        )
    return req


def read_requests(path: str | Path, n: int | None = None) -> list[EditRequest]:
    """The first `n` (all by default) requests of a requests file or a data-set file.

    Records `{prompt, subject, target_new | target[, target_true]}` are read here, a bad one
    named by its line (JSON lines) or index (JSON list); a file in a data-set format
    (`jaxedit.eval.datasets.detect_format` knows its first record) goes to
    `jaxedit.eval.datasets.load`, where `n` counts records.
    """
    path = Path(path)
    if n is not None and n <= 0:
        raise InputError(f"--n must be positive, got {n}")
    if not path.is_file():
        raise InputError(f"--requests {path}: file not found")
    records = _records(path)
    if not records:
        raise InputError(f"--requests {path}: no requests")
    first = records[0][1]
    try:
        fmt = datasets.detect_format(first)
    except InputError as e:
        if not _simple(first):
            where = records[0][0]
            raise InputError(
                f"--requests {path}: {where}: not a request {{prompt, subject, target_new}} "
                f"and not a known data set ({e})"
            ) from None
        fmt = None
    if fmt is not None:  # a data set: its loader maps the fields (paraphrases etc. come along)
        ds = datasets.load(path, format=fmt, n=n, skip_bad=True)
        if ds.n_bad:
            raise InputError(f"--requests {path}: {ds.bad[0]}")
        for i, r in enumerate(ds.requests):
            try:
                _checked(r)
            except InputError as e:
                raise InputError(f"--requests {path}: record {i}: {e}") from None
        return ds.requests
    out = []
    for where, rec in records[:n]:
        try:
            out.append(_request(rec))
        except InputError as e:
            raise InputError(f"--requests {path}: {where}: {e}") from None
    return out


def _requests(args) -> list[EditRequest]:
    if args.requests:
        if args.prompt or args.subject or args.target is not None or args.target_true:
            raise InputError("give either --requests FILE or --prompt/--subject/--target, not both")
        return read_requests(args.requests, args.n)
    if args.n is not None:
        raise InputError("--n takes the first N records of --requests FILE; no file given")
    if not (args.prompt and args.subject and args.target is not None):
        raise InputError("--prompt, --subject and --target are required (or --requests FILE)")
    req = from_prompt(args.prompt, args.subject, args.target, target_true=args.target_true)
    return [_checked(req)]


# ----------------------------------------------------------------------------- the command


def _predictions(lm: LanguageModel, shown: list[EditRequest], checks: list[str], k: int):
    """Top-k for each shown rewrite prompt and check prompt."""
    prompts = [r.rewrite_prompt for r in shown] + checks
    return [{"prompt": q, "top": top_k(lm, q, k)} for q in prompts]


def _probes(shown: list[EditRequest], checks: list[dict]) -> list[dict]:
    """Every probe of the shown requests, the rewrite prompts first (request i's is probe i):
    rewrite and paraphrases score target_new; neighbourhood, portability and reverse probes
    their first answer; a check prompt the unedited model's top-1 token (`checks`: its top-k)."""
    out = [
        {"request": i, "kind": "rewrite", "prompt": r.rewrite_prompt, "target": r.target_new}
        for i, r in enumerate(shown)
    ]
    for i, r in enumerate(shown):
        out += [
            {"request": i, "kind": "paraphrase", "prompt": q, "target": r.target_new}
            for q in r.paraphrase_prompts
        ]
        for kind, probes in (
            ("neighborhood", r.neighborhood),
            ("portability", r.portability),
            ("reverse", r.reverse),
        ):
            out += [
                {
                    "request": i,
                    "kind": pr.kind or kind,
                    "prompt": pr.prompt,
                    "target": pr.answers[0],
                }
                for pr in probes
                if pr.answers and pr.answers[0].strip()
            ]
    out += [
        {"request": None, "kind": "check", "prompt": c["prompt"], "target": c["top"][0]["token"]}
        for c in checks
        if c["top"][0]["token"].strip()  # a whitespace token is no answer to score
    ]
    return out


def _probe_probs(lm: LanguageModel, probes: list[dict]) -> list[float]:
    """p(target) of each probe: exp of the mean target-token log-prob (ROME's P(target);
    `score_targets`)."""
    if not probes:
        return []
    scores = score_targets(lm, [p["prompt"] for p in probes], [p["target"] for p in probes])
    return [float(p) for p in scores.prob]


def _hparams_origin(args, method, lm: LanguageModel) -> dict:
    """Where the hparams came from: chosen automatically (with the reasons), a preset or a file
    (with its description), or the method's defaults."""
    if args.hparams is None and method.default_hparams is not None:
        return {"kind": "defaults", "summary": f"{method.name} defaults", "explanation": ""}
    raw, where = hparams_lib.read(method.name, args.hparams if args.hparams is not None else lm)
    choice = auto_hparams.chosen(lm) if method.name in auto_hparams.METHODS else None
    if args.hparams is None and choice is not None and raw.get("layer") == choice.layer:
        return {
            "kind": "automatic",
            "summary": f"chosen automatically: {auto_hparams.summary(choice)}",
            "explanation": auto_hparams.explain(choice),
            "choice": dataclasses.asdict(choice),
        }
    return {"kind": "file", "summary": where, "explanation": str(raw.get("description", ""))}


def run(args) -> dict:
    # Validate everything cheap before the expensive part: nothing is written on an error.
    reqs = _requests(args)
    if args.top_k <= 0:
        raise InputError("--top-k must be positive")
    if args.show < 0:
        raise InputError("--show must be >= 0")
    if args.save and Path(args.save).exists() and any(Path(args.save).iterdir()):
        raise InputError(f"--save {args.save}: exists and is not empty")
    lm = load_model(args)
    method, hp = method_and_hparams(args, lm)
    origin = _hparams_origin(args, method, lm)
    # Without --requests the one request is always shown (as before --show existed).
    shown = reqs[: max(args.show, 0 if args.requests else 1)]
    before = _predictions(lm, shown, list(args.check), args.top_k)
    probes = _probes(shown, before[len(shown) :])
    p_before = _probe_probs(lm, probes)
    t0 = time.perf_counter()
    state = method.prepare(lm, hp, cache_dir=args.cache_dir, progress=progress.shown())
    t1 = time.perf_counter()
    edit, info = method.compute(lm, state, reqs)  # all requests in one call
    edited = apply(lm, edit)
    t2 = time.perf_counter()
    if args.save and not isinstance(edit, WeightEdit):
        raise InputError(f"--save: {method.name} changes no weight; use --save-edit")
    after = _predictions(edited, shown, list(args.check), args.top_k)
    p_after = _probe_probs(edited, probes)
    table = [
        {
            "prompt": r.rewrite_prompt,
            "target_new": r.target_new,
            "before": {"top1": b["top"][0]["token"], "p_top1": b["top"][0]["prob"], "p_target": pb},
            "after": {"top1": a["top"][0]["token"], "p_top1": a["top"][0]["prob"], "p_target": pa},
        }
        for r, b, a, pb, pa in zip(shown, before, after, p_before, p_after, strict=False)
    ]
    out = {
        "method": method.name,
        "model": lm.name,
        "request": _request_json(reqs[0]),
        "n_requests": len(reqs),
        "before": before,
        "after": after,
        "table": table,
        "edit": _edit_summary(edit),
        "seconds": {"prepare": round(t1 - t0, 3), "edit": round(t2 - t1, 3)},
        "hparams": hparams_json(hp),
        "hparams_origin": origin,
        "explain": bool(args.explain),
        "probes": [
            {**pr, "p_before": pb, "p_after": pa}
            for pr, pb, pa in zip(probes, p_before, p_after, strict=True)
        ],
        "info": info,
    }
    if args.requests:
        out["requests_file"] = str(args.requests)
    if len(reqs) > 1:
        out["requests"] = [_request_json(r) for r in reqs]
    if args.save_edit:
        if isinstance(edit, WeightEdit):  # which model it belongs to (`jaxedit apply` checks)
            edit = stamp(edit, lm, edited)
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


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _table(rows: list[dict]) -> list[str]:
    """One line per shown request: top-1 (its probability) and p(target_new), before → after."""
    w = min(44, max(len(r["prompt"]) for r in rows))
    head = lambda label: f"{label:<20}{'p(new)':>9}"
    lines = [
        f"  {'#':>3}  {'prompt':<{w}}  {'target_new':<14}  {head('before: top-1')}   "
        f"{head('after: top-1')}"
    ]
    cell = lambda s: f"{_cut(repr(s['top1']), 15):<15} {s['p_top1']:.2f}  {s['p_target']:7.4f}"
    for i, r in enumerate(rows):
        lines.append(
            f"  {i:>3}  {_cut(r['prompt'], w):<{w}}  {_cut(repr(r['target_new']), 14):<14}  "
            f"{cell(r['before'])}   {cell(r['after'])}"
        )
    return lines


def render(r: dict) -> str:
    fmt = lambda top: ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in top)
    n, s = r["n_requests"], r["seconds"]
    if n > 1 or "requests_file" in r:
        lines = [
            f"{r['method']} edit of {r['model']}: {n} request(s) edited in one call, "
            f"{s['edit']} s (preparation {s['prepare']} s)"
        ]
        if r["table"]:
            lines.append(
                f"  first {len(r['table'])} of {n}; p(new) = p(target_new), geometric mean over "
                "its tokens"
            )
            lines += _table(r["table"])
        checks = list(zip(r["before"], r["after"], strict=True))[len(r["table"]) :]
    else:
        req = r["request"]
        lines = [f"{r['method']} edit of {r['model']}: {req['subject']!r} -> {req['target_new']!r}"]
        checks = list(zip(r["before"], r["after"], strict=True))
    for b, a in checks:
        lines.append(f"  {b['prompt']!r}")
        lines.append(f"      before: {fmt(b['top'])}")
        lines.append(f"      after:  {fmt(a['top'])}")
    if n == 1 and "requests_file" not in r and r["table"]:
        t = r["table"][0]
        lines.append(
            f"  p({t['target_new']!r}): {t['before']['p_target']:.4f} -> "
            f"{t['after']['p_target']:.4f}"
        )
    e = r["edit"]
    if e["kind"] == "weight" and e["weights"]:
        lines.append(f"  weights: {', '.join(e['weights'])}, |ΔW| = {e['norm']:.4g}")
    elif e["kind"] == "context":
        lines.append(f"  context: {len(e['facts'])} fact(s), {e['demonstrations']} demonstrations")
    if n == 1 and "requests_file" not in r:
        lines.append(f"  time: preparation {s['prepare']} s, edit {s['edit']} s")
    origin = r.get("hparams_origin", {})
    if r.get("explain"):
        lines.append(f"  hparams: {origin.get('summary', '')}")
        lines += ["    " + ln for ln in origin.get("explanation", "").splitlines() if ln.strip()]
    elif origin.get("kind") == "automatic":
        lines.append(f"  hparams: {origin['summary']} (--explain: why)")
    for k in ("saved", "saved_edit"):
        if k in r:
            lines.append(f"  {k.replace('_', ' ')}: {r[k]}")
    return "\n".join(lines)
