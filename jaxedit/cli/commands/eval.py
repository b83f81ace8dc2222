"""jaxedit eval: edit with a method, measure reliability / generalization / locality, summarise.

    jaxedit eval --method rome --data counterfact-edit.json --n 50 --known-only --out runs/rome

Every registered method's own flags (`--hparams`, `--editor`, `--demos`, ...) are accepted; a
flag two methods share is defined once (by the first method, in name order).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from jaxedit.cli.shared import SharedFlags, load_model
from jaxedit.errors import InputError
from jaxedit.eval import datasets as data_mod
from jaxedit.eval import runner as evaluate
from jaxedit.eval import scoring as metrics
from jaxedit.methods import legacy as methods

NAME = "eval"
HELP = "evaluate an editing method on CounterFact / zsRE / KnowEdit / MQuAKE (with baseline)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="none", help="editing method (`jaxedit.methods`)")
    p.add_argument("--data", help="data file (CounterFact, zsRE, KnowEdit or MQuAKE JSON)")
    p.add_argument(
        "--format", default="auto", choices=["auto", *data_mod.FORMATS], help="data format"
    )
    p.add_argument("--n", type=int, default=None, help="number of records (default: all)")
    p.add_argument("--offset", type=int, default=0, help="first record")
    p.add_argument(
        "--sample", action="store_true", help="pick the --n records at random (under --seed)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records")
    p.add_argument("--known-only", action="store_true", help="keep facts the model knows")
    p.add_argument("--mode", default="independent", choices=evaluate.MODES)
    p.add_argument("--every", type=int, default=None, help="sequential: measure every N edits")
    p.add_argument("--batch-size", type=int, default=None, help="batch mode: requests per edit")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval/METHOD-DATA)")
    p.add_argument("--resume", action="store_true", help="skip cases already in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation", action="store_true", help="also fluency (and consistency)")
    p.add_argument("--idf-corpus", default=None, help="raw text file to fit TF-IDF on")
    p.add_argument("--no-progress", action="store_true")
    for name in methods.names():
        m = methods.get(name)
        group = p.add_argument_group(f"{name} options")
        m.add_arguments(SharedFlags(p, group))


def _select(args) -> data_mod.Dataset:
    if not args.data:
        raise InputError("--data is required (a CounterFact / zsRE / KnowEdit / MQuAKE file)")
    if args.n is not None and args.n <= 0:
        raise InputError(f"--n must be positive, got {args.n}")
    if not args.sample:
        return data_mod.load(
            args.data, format=args.format, n=args.n, offset=args.offset, skip_bad=args.skip_bad
        )
    ds = data_mod.load(args.data, format=args.format, offset=args.offset, skip_bad=args.skip_bad)
    groups = data_mod.group_cases(ds.requests)
    if args.n is not None and args.n < len(groups):
        groups = random.Random(args.seed).sample(groups, args.n)
    reqs = [r for g in groups for r in g]
    return data_mod.Dataset(reqs, ds.format, ds.path, ds.n_bad, ds.n_records, ds.bad)


def run(args) -> dict:
    ds = _select(args)
    method = methods.get(args.method)
    lm = load_model(args)
    edit = method.prepare(lm, args)
    tfidf = None
    if args.generation and args.idf_corpus:
        tfidf = metrics.TfIdf.fit(metrics.load_corpus(args.idf_corpus))
    out = args.out or str(Path("runs") / "eval" / f"{args.method}-{Path(args.data).stem}")
    hparams = getattr(args, "hparams", None)
    result = evaluate.evaluate(
        lm,
        ds.requests,
        edit,
        method=args.method,
        mode=args.mode,
        known_only=args.known_only,
        every=args.every,
        batch_size=args.batch_size,
        out=out,
        resume=args.resume,
        progress=not args.no_progress,
        generation=args.generation,
        tfidf=tfidf,
        info={
            "data": ds.path,
            "format": ds.format,
            "offset": args.offset,
            "seed": args.seed,
            "n_bad": ds.n_bad,
            "hparams": hparams if hparams is None or isinstance(hparams, str) else str(hparams),
        },
    )
    result["out"] = out
    return evaluate.as_jsonable(result)


def render(r: dict) -> str:
    return evaluate.render(r) + f"\n(results in {r['out']}/results.json, results.md)"
