"""jaxedit generate: continue a prompt (greedy by default)."""

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
    return f"{r['prompt']}\033[1m{r['completion']}\033[0m"
