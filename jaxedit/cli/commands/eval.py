"""jaxedit eval: edit with a method, measure reliability / generalization / locality, summarise.

    jaxedit eval --method rome --data counterfact-edit.json --n 50 --known-only --out runs/rome
    jaxedit eval --method ike --set demos=pool.json --data DATA --mode sequential --every 10
    jaxedit eval --method alphaedit --data DATA --n 2000 --mode sequential --batch-size 100 \
        --every 5 --out runs/alphaedit   # lifelong: 20 rounds of 100; --resume continues it
    jaxedit eval --compare runs/rome runs/memit ... [--out runs/compare]   # one table + plot

The method runs through the protocol only (`jaxedit.methods`: hparams -> prepare -> compute ->
`jaxedit.apply`); its settings come from its hparams dataclass (`--hparams PRESET|FILE`,
`--set key=value`), and results.json records them. Answer metrics by greedy generation
(`*_gen`: does the continuation begin with the answer) come with `--generation` and with any
run of at most 200 cases (`runner.GEN_METRICS_MAX_CASES`). `--generation` also adds fluency (ROME's
decoding by default: top-k 5 sampling, 100 tokens, seeded by `--seed`); with `--snippets
attribute_snippets.json` (ROME's file) also consistency, on data that carries relation and
target ids (ROME-form CounterFact, MQuAKE).

Modes: `independent` (each case edited from the unedited model), `sequential` (lifelong: rounds
of `--batch-size` requests through `method.step`, accumulated; every case measured on the final
model; `--every K` rounds a curve point; resumable with `--resume` from the checkpoint written
after every round) and `batch` (`method.compute` per chunk of `--batch-size` requests, each
chunk from the unedited model, stateless). Every run measures general ability, unedited vs
edited (`jaxedit.eval.general`: WikiText-2 perplexity, accuracy on 200 records of the data
file that the run does not edit and the unedited model knows, fluency); `--no-general` skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
from pathlib import Path

from jaxedit import progress
from jaxedit.cli.method_args import add_method_arguments, hparams_json, method_and_hparams
from jaxedit.cli.shared import load_model
from jaxedit.errors import InputError
from jaxedit.eval import compare, datasets, general, remeasure, report, runner
from jaxedit.eval.datasets.snippets import load_snippets
from jaxedit.eval.generation import DECODINGS, DEFAULT_DECODING, Decoding
from jaxedit.io.atomic import check_out_dir, first_new_dir, remove_new_empty_dirs

NAME = "eval"
HELP = "evaluate an editing method on CounterFact / zsRE / KnowEdit / MQuAKE (with baseline)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_method_arguments(p, default="none")
    p.add_argument("--data", help="data file (CounterFact, zsRE, KnowEdit or MQuAKE JSON)")
    p.add_argument(
        "--format", default="auto", choices=["auto", *datasets.FORMATS], help="data format"
    )
    p.add_argument("--n", type=int, default=None, help="number of records (default: all)")
    p.add_argument("--offset", type=int, default=0, help="first record")
    p.add_argument(
        "--sample", action="store_true", help="pick the --n records at random (under --seed)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records")
    p.add_argument("--known-only", action="store_true", help="keep facts the model knows")
    p.add_argument(
        "--max-cases",
        type=int,
        default=None,
        help="keep at most N cases after --known-only (and, in batch / sequential mode, after "
        "skipping cases that contradict an earlier one: same prompt and subject, other target)",
    )
    p.add_argument(
        "--mode",
        default="independent",
        choices=runner.MODES,
        help="independent: each case edited from the unedited model; sequential (lifelong): "
        "rounds accumulate through method.step, every case measured on the final model; batch: "
        "one stateless method.compute per chunk of --batch-size requests, each measured alone",
    )
    p.add_argument(
        "--every",
        type=int,
        default=None,
        help="sequential: a curve point (all cases so far + general) every K rounds",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequential: requests per round (default one case); batch: requests per "
        "method.compute call (default all); groups (MQuAKE cases) are never split",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/eval/METHOD-DATA)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (independent: skip finished cases; sequential: from "
        "the last round's checkpoint); a larger --n extends it",
    )
    p.add_argument("--force", action="store_true", help="overwrite the run in an existing --out")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample and of generation")
    g = p.add_argument_group("generation metrics")
    g.add_argument("--generation", action="store_true", help="also fluency (and consistency)")
    g.add_argument(
        "--decoding",
        default=DEFAULT_DECODING,
        choices=sorted(DECODINGS),
        help=f"how texts are generated (default {DEFAULT_DECODING}: ROME's top-k 5 sampling)",
    )
    g.add_argument(
        "--gen-length", type=int, default=None, help="tokens per text, prompt included (100)"
    )
    g.add_argument(
        "--snippets",
        default=None,
        help="ROME attribute_snippets.json: consistency references (needs --generation)",
    )
    k = p.add_argument_group("general ability (edited vs unedited; jaxedit.eval.general)")
    k.add_argument("--no-general", action="store_true", help="skip the general block")
    k.add_argument(
        "--ppl-corpus",
        default=None,
        help="text file for perplexity (default: the shipped WikiText-2 test slice)",
    )
    k.add_argument(
        "--ppl-tokens",
        type=int,
        default=general.PPL_TOKENS,
        help=f"perplexity on the first N tokens of the text (default {general.PPL_TOKENS})",
    )
    k.add_argument(
        "--known-facts",
        default=None,
        help="facts to keep: a known_1000-style file (prompt, attribute) or an editing data "
        "set (default: records of --data that the run does not edit)",
    )
    k.add_argument(
        "--n-known-facts",
        type=int,
        default=general.N_KNOWN_FACTS,
        help=f"known facts measured (seeded sample; default {general.N_KNOWN_FACTS})",
    )
    k.add_argument(
        "--known-facts-unfiltered",
        action="store_true",
        help="sample the known facts without asking whether the unedited model knows them "
        "(the measure of runs before this option; default: only facts it completes greedily)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="instead of evaluating: one table (Markdown + PNG plot) of these runs' results, "
        "with the unedited rows; written to --out (default runs/compare)",
    )
    p.add_argument(
        "--remeasure",
        metavar="RUN_DIR",
        default=None,
        help="instead of evaluating: measure a finished sequential run again on its final model "
        "(its last checkpoint) with today's metrics (*_gen, reverse); written to --out",
    )
    p.add_argument(
        "--common-cases",
        action="store_true",
        help="--compare: summarise every run over the cases all runs of its data set measured",
    )


def _select(args) -> datasets.Dataset:
    if not args.data:
        raise InputError("--data is required (a CounterFact / zsRE / KnowEdit / MQuAKE file)")
    if args.n is not None and args.n <= 0:
        raise InputError(f"--n must be positive, got {args.n}")
    if not args.sample:
        return datasets.load(
            args.data, format=args.format, n=args.n, offset=args.offset, skip_bad=args.skip_bad
        )
    ds = datasets.load(args.data, format=args.format, offset=args.offset, skip_bad=args.skip_bad)
    groups = datasets.group_cases(ds.requests)
    if args.n is not None and args.n < len(groups):
        groups = random.Random(args.seed).sample(groups, args.n)
    reqs = [r for g in groups for r in g]
    return dataclasses.replace(ds, requests=reqs)


def _decoding(args) -> Decoding | None:
    if not args.generation:
        if args.snippets:
            raise InputError("--snippets are the references of generated texts: add --generation")
        return None
    d = dataclasses.replace(DECODINGS[args.decoding], seed=args.seed)
    if args.gen_length is not None:
        d = dataclasses.replace(d, max_out_len=args.gen_length)
    return d


def _general(args, ds: datasets.Dataset) -> general.GeneralSuite | None:
    """The general block's suite: the text, the known facts (default: records of the data
    file that this run does not edit), the fluency prompts."""
    if args.no_general:
        if args.ppl_corpus or args.known_facts:
            raise InputError("--ppl-corpus / --known-facts set what --no-general skips")
        return None
    if args.n_known_facts <= 0 or args.ppl_tokens < 2:
        raise InputError("--n-known-facts must be positive and --ppl-tokens at least 2")
    # Filtered (default): every candidate in a seeded order; the runner keeps the first n that
    # the unedited model knows (`general.with_known_facts`).
    n = args.n_known_facts if args.known_facts_unfiltered else None
    if args.known_facts:
        facts, source = general.load_known_facts(args.known_facts, n=n), args.known_facts
    else:
        every = datasets.load(args.data, format=ds.format, skip_bad=True).requests
        facts = general.facts_from_requests(every, ds.requests, n=n)
        source = f"{ds.path} (records not edited, seed {general.KNOWN_FACTS_SEED})"
    kw = {"facts": tuple(facts), "facts_source": source, "max_tokens": args.ppl_tokens}
    if not args.known_facts_unfiltered:
        kw |= {"known_n": args.n_known_facts, "cache_dir": args.cache_dir}
    if args.ppl_corpus:
        return general.GeneralSuite.from_file(args.ppl_corpus, **kw)
    return general.GeneralSuite.default(**kw)


def _n_cases(args, ds: datasets.Dataset) -> int:
    """The most cases this run can evaluate (before --known-only drops any)."""
    n = len(datasets.group_cases(ds.requests))
    return n if args.max_cases is None else min(n, args.max_cases)


def run(args) -> dict:
    if args.compare:
        if args.data:
            raise InputError("--compare reads finished runs' directories: drop --data")
        out = args.out or str(Path("runs") / "compare")
        return {"compare": compare.compare(args.compare, out, common=args.common_cases)}
    if args.remeasure:
        if args.data or not args.out:
            raise InputError("--remeasure reads the run's own data: drop --data, give --out")
        res = remeasure.remeasure(load_model(args), args.remeasure, args.out)
        return report.as_jsonable(res | {"out": args.out})
    ds = _select(args)
    suite = _general(args, ds)
    decoding = _decoding(args)
    snippets = load_snippets(args.snippets) if args.snippets else None
    out = args.out or str(Path("runs") / "eval" / f"{args.method}-{Path(args.data).stem}")
    if args.resume and args.force:
        raise InputError("--resume continues the run in --out, --force replaces it: choose one")
    check_out_dir(out, resume=args.resume, force=args.force)  # before the model loads
    fresh = not os.path.exists(out)
    new = first_new_dir(out)  # runs/ and runs/eval/ too, when the default creates them
    try:
        return _evaluate(args, ds, suite, decoding, snippets, out)
    except BaseException:
        if fresh:  # a run that failed before its first case leaves no directory behind
            _remove_unstarted(out)
            if new is not None:
                remove_new_empty_dirs([new])
        raise


def _remove_unstarted(out: str) -> None:
    """Remove `out` (created by this run) if no case was measured: it holds at most the run's
    header, nothing to resume."""
    d = Path(out)
    cases = d / "cases.jsonl"
    if (
        d.is_dir()
        and not (cases.exists() and cases.stat().st_size)
        and not (d / "lifelong").exists()
    ):
        shutil.rmtree(d, ignore_errors=True)


def _evaluate(args, ds, suite, decoding, snippets, out: str) -> dict:
    lm = load_model(args)
    if decoding is not None and decoding.max_out_len > lm.config.max_positions:
        raise InputError(
            f"--gen-length {decoding.max_out_len}: the model has {lm.config.max_positions} "
            "positions"
        )
    method, hp = method_and_hparams(args, lm)
    state = method.prepare(lm, hp, cache_dir=args.cache_dir, progress=progress.shown())
    result = runner.evaluate(
        lm,
        ds.requests,
        method,
        state,
        mode=args.mode,
        known_only=args.known_only,
        max_cases=args.max_cases,
        every=args.every,
        batch_size=args.batch_size,
        out=out,
        resume=args.resume,
        progress=progress.shown(),
        generation=decoding,
        snippets=snippets,
        general=suite or False,
        gen_metrics=decoding is not None or _n_cases(args, ds) <= runner.GEN_METRICS_MAX_CASES,
        info={
            "data": ds.path,
            "format": ds.format,
            "offset": args.offset,
            "seed": args.seed,
            "n_bad": ds.n_bad,
            "hparams": hparams_json(hp),
        },
    )
    result["out"] = out
    return report.as_jsonable(result)


def render(r: dict) -> str:
    if "compare" in r:
        c = r["compare"]
        return c["markdown"] + "\n\n(written to " + ", ".join(c["files"]) + ")"
    return report.render(r) + f"\n(results in {r['out']}/results.json, results.md)"
