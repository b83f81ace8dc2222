"""jaxedit mend-train: meta-train a MEND editor on CounterFact, zsRE or KnowEdit edits — or an
InstructEdit editor on several of them at once.

    jaxedit mend-train --data counterfact-train.json --out editors/mend
    jaxedit mend-train --data counterfact-train.json,zsre_mend_train-1k.json \
        --instructions default --out editors/instructedit     # InstructEdit (task-balanced)

`--data` takes a comma-separated list; each entry is PATH or TASK=PATH (default task: the
format's, `jaxedit.methods.mend.instructions.TASK_OF_FORMAT`). `--instructions
default|varied|FILE` writes each case's task instruction into its edit and rephrase inputs
(varied: four training descriptions per task beside the default, which stays the use-time one;
FILE: a JSON object {task: template with "{prompt}", or a list [use-time, training...]} over the
defaults); without it the editor is plain MEND.
"""

from __future__ import annotations

from jaxedit import progress
from jaxedit.cli.shared import load_model
from jaxedit.io.atomic import check_out_dir

NAME = "mend-train"
HELP = "meta-train a MEND editor (writes DIR/ with checkpoints, config.json, train_log.jsonl)"


def add_arguments(p):
    p.add_argument(
        "--data",
        required=True,
        help="training JSON (CounterFact EasyEdit, zsRE or KnowEdit); several: A.json,B.json "
        "(one task each, sampled in turn), TASK=PATH names an entry's task",
    )
    p.add_argument("--format", default="auto", choices=("auto", "counterfact", "zsre", "knowedit"))
    p.add_argument(
        "--instructions",
        default=None,
        metavar="default|varied|FILE",
        help="InstructEdit: task instructions before the edit and rephrase inputs (default "
        "templates; varied: four training descriptions per task beside them; or a JSON file "
        "{task: template with {prompt} or [use-time, training...]} over the defaults)",
    )
    p.add_argument(
        "--instruct-locality",
        action="store_true",
        help="with --instructions: the locality inputs carry the instruction too",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--hparams", help="preset name or JSON path (default: the model's preset)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="hparam_overrides",
        help="override one hparams field, e.g. --set loc_kl_positions=answer (repeatable)",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, help="edits per step (default: from hparams)")
    p.add_argument("--val-every", type=int, default=50, help="validate + checkpoint every K")
    p.add_argument(
        "--val-size", type=int, default=16, help="held-out cases (end of each --data file)"
    )
    p.add_argument("--patience", type=int, default=3, help="validations without improvement")
    p.add_argument("--limit", type=int, help="use only the first N records of each file")
    p.add_argument("--resume", action="store_true", help="continue from DIR's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> dict:
    from jaxedit import hparams as hparams_lib
    from jaxedit.errors import InputError
    from jaxedit.methods.mend import METHOD
    from jaxedit.methods.mend.data import load_data
    from jaxedit.methods.mend.instructions import load_instructions
    from jaxedit.methods.mend.train import train

    for flag, value in (("--steps", args.steps), ("--val-every", args.val_every),
                        ("--val-size", args.val_size), ("--batch", args.batch)):  # fmt: skip
        if value is not None and value < 1:
            raise InputError(f"{flag} must be positive, got {value}")
    # bad data or instructions fail before the model loads
    check_out_dir(args.out, resume=args.resume, forceable=False)  # before anything loads
    cases = load_data(args.data, args.format, args.limit)
    instructions = None
    if args.instructions:
        instructions = load_instructions(args.instructions, locality=args.instruct_locality)
    elif args.instruct_locality:
        raise InputError("--instruct-locality needs --instructions")
    overrides = hparams_lib.parse_assignments(METHOD.hparams_cls, args.hparam_overrides)
    if args.batch:
        overrides["batch"] = args.batch
    if args.hparams:  # a bad preset or key fails before loading the model too
        hp = METHOD.hparams(args.hparams, **overrides)
    lm = load_model(args)
    if not args.hparams:
        hp = METHOD.hparams(lm, **overrides)
    return train(
        lm,
        cases,
        args.out,
        hp,
        steps=args.steps,
        val_every=args.val_every,
        val_size=args.val_size,
        patience=args.patience,
        resume=args.resume,
        progress=progress.shown(),
        data_name=str(args.data),
        instructions=instructions,
    )


def render(r: dict) -> str:
    last = r.get("last_train", {})
    return (
        f"trained {r['steps']} steps ({r['steps_this_run']} this run) in {r['seconds']} s "
        f"({r['steps_per_s']} steps/s){' — early stopped' if r['early_stopped'] else ''}\n"
        f"best validation loss {r['best_val_loss']:.4f}; last train: "
        + ", ".join(f"{k}={v:.3f}" for k, v in last.items())
        + f"\neditor: {r['out']}"
    )
