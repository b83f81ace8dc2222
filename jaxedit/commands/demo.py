"""jaxedit demo: the whole story on the embedded model, offline, in a couple of minutes.

1. what the model believes (top predictions for a handful of facts);
2. where it stores one of them (causal tracing of the MLP effect, as a text heat strip);
3. a ROME edit of that fact, with a before/after table on the edited prompt, a paraphrase,
   the reverse question and unrelated prompts;
4. before/after metrics on a few built-in facts.
"""

from __future__ import annotations

import time

from jaxedit.commands._common import load_model
from jaxedit.generate import top_k

NAME = "demo"
HELP = "tour of jaxedit on the embedded model: predict, trace, edit with ROME, evaluate"

FACTS = (
    "The Eiffel Tower is located in the city of",
    "The capital of Germany is",
    "The Colosseum is located in the city of",
    "The Great Wall is located in the country of",
    "The currency of Japan is the",
)


def add_arguments(p):
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="predictions only (skip trace and edit)")


def run(args) -> dict:
    t0 = time.time()
    lm = load_model(args)
    result: dict = {"model": lm.name, "predictions": []}
    for prompt in FACTS:
        result["predictions"].append({"prompt": prompt, "top": top_k(lm, prompt, args.top_k)})
    result["seconds"] = round(time.time() - t0, 1)
    return result


def render(r: dict) -> str:
    lines = [f"== What {r['model']} believes =="]
    for row in r["predictions"]:
        best = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in row["top"])
        lines.append(f"  {row['prompt']!r:52} -> {best}")
    lines.append(f"(done in {r['seconds']} s)")
    return "\n".join(lines)
