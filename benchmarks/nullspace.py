"""How much room AlphaEdit's null space leaves: the spectrum of each edited layer's key second
moment C = E[k kᵀ] and, per threshold, the directions P keeps and the share of C's trace inside
them (tr(P C) / tr(C), the `nullspace_energy` every AlphaEdit run reports).

AlphaEdit (Fang et al. 2025) projects each update onto the eigenvectors of C with eigenvalue
below a threshold (2e-2 in the paper), assuming preserved keys leave such directions nearly
empty; an update there cannot disturb them. When C's spectrum has no gap, a threshold either
keeps few directions (little room for edits) or keeps directions that ordinary text uses
(the edits disturb it). The `lowest` entries give the number of directions that hold the
lowest 1 / 5 / 10 / 20 % of the trace: the most room any threshold can give at that cost.

    uv run python benchmarks/nullspace.py [--hparams smollm2-135m] [--out FILE.json]
        [--other-corpus ../shared/data/wikitext/wiki.valid.raw --other-tokens 131072]

Statistics come from the jaxedit cache (computed once if missing: the preset's corpus).
`--other-corpus` also reads C' of the same layers from another text and reports its spectrum and
how much of *its* key energy the preset's null space holds, tr(P C') / tr(C'): the preset builds
P from text the model samples itself, while perplexity is measured on WikiText.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from machine import machine

from jaxedit import methods
from jaxedit.io.checkpoint import load
from jaxedit.methods.common import linalg
from jaxedit.methods.common.value_hparams import key_stats

OUT = Path(__file__).parent / "results" / "nullspace.json"
THRESHOLDS = (5e-3, 1e-2, 2e-2, 5e-2)
LOWEST = (0.01, 0.05, 0.10, 0.20)


def spectrum_report(C: np.ndarray, thresholds=THRESHOLDS) -> dict:
    w = np.linalg.eigvalsh(np.asarray(C, np.float64))  # ascending
    share = np.cumsum(w) / w.sum()
    return {
        "width": int(w.size),
        "trace": float(w.sum()),
        "eigenvalues": {q: float(np.quantile(w, p)) for q, p in
                        (("min", 0), ("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1))},
        "thresholds": {
            f"{t:g}": {"dims": int((w < t).sum()), "energy": float(w[w < t].sum() / w.sum())}
            for t in thresholds
        },
        "lowest": {f"{e:g}": int((share <= e).sum()) for e in LOWEST},
    }  # fmt: skip


def projector_energy(C: np.ndarray, C_other: np.ndarray, threshold: float) -> float:
    """tr(P C') / tr(C'), P AlphaEdit's projector from C (`linalg.null_space_projector`)."""
    P = linalg.null_space_projector(C, threshold)
    C2 = np.asarray(C_other, np.float64)
    return float(np.sum(P * C2) / np.trace(C2))  # P, C' symmetric: tr(P C') = Σ P∘C'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hparams", default="smollm2-135m", help="AlphaEdit preset")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--other-corpus", help="a text file: also the spectrum of its keys' C'")
    ap.add_argument("--other-tokens", type=int, default=131072)
    args = ap.parse_args()
    lm = load()
    hp = methods.get("alphaedit").hparams(args.hparams)
    # only C: not `prepare`, which also samples context templates and builds the projectors
    stats = key_stats(lm, hp, hp.layers, cache_dir=None, progress=False)
    thresholds = sorted({*THRESHOLDS, hp.nullspace_threshold})
    layers = {str(layer): spectrum_report(st.mom2, thresholds) for layer, st in stats.items()}
    for layer, r in layers.items():
        t = r["thresholds"][f"{hp.nullspace_threshold:g}"]
        e = r["eigenvalues"]
        print(
            f"layer {layer}: eigenvalues {e['min']:.1e} .. {e['median']:.1e} .. {e['max']:.1e}, "
            f"trace {r['trace']:.1f}; threshold {hp.nullspace_threshold:g}: "
            f"{t['dims']} of {r['width']} dims, {t['energy']:.2f} of the trace; "
            f"lowest 1/5/10/20 % of the trace: {'/'.join(map(str, r['lowest'].values()))} dims"
        )
    other = None
    if args.other_corpus:
        hp2 = dataclasses.replace(
            hp, mom2_corpus=args.other_corpus, mom2_n_tokens=args.other_tokens
        )
        stats2 = key_stats(lm, hp2, hp.layers, cache_dir=None, progress=False)
        other = {"mom2_corpus": args.other_corpus, "mom2_n_tokens": args.other_tokens, "layers": {}}
        for layer, st in stats2.items():
            r = spectrum_report(st.mom2, thresholds)
            r["preset_projector_energy"] = projector_energy(
                stats[layer].mom2, st.mom2, hp.nullspace_threshold
            )
            other["layers"][str(layer)] = r
            print(
                f"layer {layer}, {Path(args.other_corpus).name}: its own threshold keeps "
                f"{r['thresholds'][f'{hp.nullspace_threshold:g}']['energy']:.2f} of its trace; "
                f"the preset's P holds {r['preset_projector_energy']:.2f} of it"
            )
    result = {
        "machine": machine(),
        "model": lm.name,
        "hparams": args.hparams,
        "nullspace_threshold": hp.nullspace_threshold,
        "corpus": {"mom2_corpus": hp.mom2_corpus, "mom2_n_tokens": hp.mom2_n_tokens},
        "layers": layers,
        "other_corpus": other,
    }
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
