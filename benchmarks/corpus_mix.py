"""Corpora for the key statistics C of the MEMIT-1000 probes (README, Many edits).

Writes two corpus folders (`--set mom2_corpus=DIR`, every line a document, files in name order):

    OUT/wiki/1_wiki.txt   the first lines of WikiText-2 *validation* up to 131,072 tokens
                          (each line cut to 256 tokens, as the statistics cut it; disjoint from
                          the perplexity slice, which comes from the test split)
    OUT/mix/1_wiki.txt    the same lines
    OUT/mix/2_cf.txt      true statements of CounterFact's *train* split (`counterfact-train.json`:
                          "<prompt> <ground truth>." and "<rephrase prompt> <ground truth>." of
                          each record, 20,000 lines, ~240k tokens; its locality prompts are left
                          out: they are the same kind of sentence as the evaluation's neighbours)

`mix` weights the keys of subject tokens up: more than half of its tokens are short factual
sentences about named subjects, the kind of key every edit writes to.

    uv run python benchmarks/corpus_mix.py --out runs/cmix
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
WIKI_TOKENS = 131072


def wiki_lines(tok, path: Path, n_tokens: int = WIKI_TOKENS) -> list[str]:
    """Non-blank lines from the top of `path` until they hold `n_tokens` tokens (each line
    counted up to the statistics' own cut, MEMIT's `mom2_max_len`)."""
    from jaxedit.methods.memit import MEMITHparams

    max_len = MEMITHparams.mom2_max_len
    lines, total = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        lines.append(line)
        total += len(tok.encode(line)[:max_len])
        if total >= n_tokens:
            break
    return lines


def true_statements(records: list[dict]) -> list[str]:
    """'<prompt> <ground truth>.' and the same for the rephrased prompt, per record."""
    out = []
    for r in records:
        for prompt in (r.get("prompt"), r.get("rephrase_prompt")):
            if prompt and r.get("ground_truth"):
                out.append(f"{prompt} {r['ground_truth']}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wiki", type=Path, default=DATA / "wikitext" / "wiki.valid.raw")
    ap.add_argument("--train", type=Path, default=DATA / "counterfact" / "counterfact-train.json")
    args = ap.parse_args()
    from jaxedit.io.checkpoint import load

    tok = load("smollm2-135m").tokenizer
    wiki = "\n".join(wiki_lines(tok, args.wiki)) + "\n"
    facts = "\n".join(true_statements(json.loads(args.train.read_text()))) + "\n"
    for name, files in {
        "wiki": {"1_wiki.txt": wiki},
        "mix": {"1_wiki.txt": wiki, "2_cf.txt": facts},
    }.items():
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (folder / fname).write_text(text, encoding="utf-8")
        print(f"{folder}: {', '.join(files)}")


if __name__ == "__main__":
    main()
