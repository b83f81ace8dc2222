"""jaxedit predict: the most likely next tokens after a prompt."""

from jaxedit.cli.shared import load_model, top_table
from jaxedit.models.generate import top_k

NAME = "predict"
HELP = "top-k next-token predictions after a prompt"


def add_arguments(p):
    p.add_argument(
        "--prompt", required=True, help="the prompt (no BOS added unless the tokenizer says so)"
    )
    p.add_argument("--top-k", type=int, default=5)


def run(args) -> dict:
    lm = load_model(args)
    top = top_k(lm, args.prompt, args.top_k)
    ids = lm.tokenizer.encode(args.prompt)
    return {
        "model": lm.name,
        "prompt": args.prompt,
        "tokens": lm.tokenizer.token_strings(ids),
        "top": top,
    }


def render(r: dict) -> str:
    return f"{r['prompt']!r} ->\n{top_table(r['top'])}"
