"""jaxedit generate: continue a prompt (greedy by default).

The completion is shown in bold on a terminal only: a pipe or a file gets plain text (and
`NO_COLOR` turns the bold off everywhere, https://no-color.org)."""

import os
import sys

from jaxedit.cli.shared import load_model
from jaxedit.models.generate import generate

NAME = "generate"
HELP = "generate a continuation of a prompt (KV-cached decoding)"


def add_arguments(p):
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    lm = load_model(args)
    text = generate(lm, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    return {"prompt": args.prompt, "completion": text}


def render(r: dict) -> str:
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"{r['prompt']}\033[1m{r['completion']}\033[0m"
    return f"{r['prompt']}{r['completion']}"
