"""jaxedit plan: will an operation fit on a mesh of chips? Compiled on abstract arrays."""

from jaxedit import plan

NAME = "plan"
HELP = (
    "per-device memory of forward / trace / stats / rome / memit / mend on a mesh, from XLA's "
    "compiled memory analysis on abstract arrays (no weights are read)"
)


def add_arguments(p):
    p.add_argument(
        "--op", default="forward", choices=plan.OPS, help="the operation to plan (default forward)"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16"),
        help="param dtype (default bfloat16)",
    )
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: per op)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default: per op)")
    p.add_argument("--layer", type=int, default=None, help="edited / stopping layer")
    p.add_argument(
        "--device-memory",
        default=None,
        help=f"memory of one chip: a size (16GiB, 80GB) or one of {', '.join(plan.DEVICE_MEMORY)}",
    )


def run(args) -> dict:
    """--model: a known architecture (jaxedit/configs), a config.json or a HF directory."""
    return plan.plan(
        args.model,
        args.mesh or "fsdp=1",
        args.dtype,
        args.op,
        batch=args.batch,
        length=args.length,
        layer=args.layer,
        device_memory=args.device_memory,
    )


def render(r: dict) -> str:
    return plan.render(r)
