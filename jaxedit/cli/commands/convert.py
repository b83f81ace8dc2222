"""jaxedit convert: export a model as a HF directory or an orbax checkpoint."""

from jaxedit.cli.shared import load_model
from jaxedit.io.checkpoint import save_hf, save_orbax

NAME = "convert"
HELP = "export the model to a HF directory (safetensors) or an orbax checkpoint"


def add_arguments(p):
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf")


def run(args) -> dict:
    lm = load_model(args)
    out = (save_hf if args.format == "hf" else save_orbax)(lm, args.out)
    return {"model": lm.name, "format": args.format, "out": str(out)}


def render(r: dict) -> str:
    return f"wrote {r['format']} checkpoint of {r['model']} to {r['out']}"
