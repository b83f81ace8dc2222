"""The README's GPU tables ("Benchmarks", "On a GPU"), printed from the JSON that
`benchmarks/gpu.sh` wrote on the lent H200 (`benchmarks/results/gpu_h200/`): jaxedit and the
PyTorch baseline on the same GPU, the ratio, and how closely the two agree; then the many-edits
run (`many_edits.json`): each method's time for the same CounterFact edits, and its efficacy.

    uv run python benchmarks/gpu_table.py [benchmarks/results/gpu_h200]

`tests/test_docs.py` checks that the README holds exactly these tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_h200"
HEADER = "| benchmark | jaxedit | PyTorch, same GPU | ratio | agreement |\n|---|---|---|---|---|"
MANY_HEADER = "| method | edits | seconds | per edit | efficacy |\n|---|---|---|---|---|"
PYTORCH_RUNS = ("forward", "forward_bf16", "trace", "rome")  # gpu_table's files; many_edits apart


def _read(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _tok(x: float) -> str:
    return f"{x:,.0f} tokens/s"


def _forward_row(r: dict) -> str:
    j, b = r["jaxedit"], r["baseline"]
    label = f"`forward.py` {r['model'].split('(')[1][:-1]} (B={r['batch']}, T={r['tokens']})"
    if "vs_fp32" in r:
        v = r["vs_fp32"]
        agree = (
            f"top-1 vs fp32 {v['jaxedit']['top1_agreement']:.3f} (theirs "
            f"{v['baseline']['top1_agreement']:.3f})"
        )
    else:
        agree = f"max abs logit diff {r['max_abs_logit_diff']:.1e}"
    return (
        f"| {label} | {_tok(j['tokens_per_s'])} (compile {j['compile_s']:.1f} s) "
        f"| {_tok(b['tokens_per_s'])} | {r['speedup_vs_torch']:.2f}× | {agree} |"
    )


def _trace_row(r: dict) -> str:
    b = r["baseline"]
    return (
        f"| `trace.py` grid ({r['grid_cells']} cells × {r['samples']} samples) "
        f"| {r['jaxedit_per_fact_s']:.2f} s per fact (compile {r['jaxedit_compile_s']:.0f} s) "
        f"| {b['per_fact_s_extrapolated']:.1f} s ({b['per_cell_s'] * 1e3:.0f} ms per cell) "
        f"| {b['speedup_per_fact']:.1f}× | max abs diff {b['max_abs_diff_vs_jaxedit']:.0e} |"
    )


def _rome_rows(r: dict) -> list[str]:
    s, e = r["stats"], r["edit"]
    return [
        f"| `rome.py` statistics ({s['tokens']:,} tokens, layer {r['layer']}) "
        f"| {_tok(s['jaxedit_tokens_per_s'])} "
        f"| {_tok(s['torch_full_forward_tokens_per_s'])} (whole forward; stopped at the "
        f"layer {_tok(s['torch_tokens_per_s'])}, cold) "
        f"| ≤ {s['speedup_vs_full_forward']:.2f}× | C to {s['max_rel_diff_C']:.0e} |",
        f"| `rome.py` edit ({e['templates']} rows, {e['steps']} steps) "
        f"| {e['jaxedit_seconds']:.3f} s | {e['torch_seconds']:.3f} s | {e['speedup']:.2f}× "
        f"| cosine(v) {e['cosine_v_vs_torch']:.4f} |",
    ]


def _score(stage: dict) -> str:
    return f"{stage['efficacy']:.3f}" if "efficacy" in stage else "— (--no-score)"


def many_edits_table(results: Path = RESULTS) -> str:
    """MEMIT's one solve, AlphaEdit's rounds, ROME one by one: edits done, wall seconds (compiles
    included), seconds per edit and efficacy. A ROME run stopped by its limit (`partial`) gives
    the edits it did and its median edit."""
    r = _read(results, "many_edits")
    if r is None:
        return ""
    rows = [MANY_HEADER]
    m, a, ro = r.get("memit"), r.get("alphaedit"), r.get("rome")
    if m:
        rows.append(
            f"| MEMIT, one solve (z in {r['prepare']['memit']['hparams']['z_lanes']} lanes) "
            f"| {m['edits']:,} | {m['seconds']:.0f} (z {m['z_seconds']:.0f}) "
            f"| {m['seconds_per_edit']:.3f} s | {_score(m)} |"
        )
    if a:
        rows.append(
            f"| AlphaEdit, {a['rounds']} rounds of {a['round_size']} | {a['edits']:,} "
            f"| {a['seconds']:.0f} | {a['seconds_per_edit']:.3f} s | {_score(a)} |"
        )
    if ro:
        stopped = ro.get("partial", False)
        done = f"{ro['edits']:,} of {r['n']:,} (stopped)" if stopped else f"{ro['edits']:,}"
        eff = "— (not scored when stopped)" if stopped else _score(ro)
        rows.append(
            f"| ROME, one by one | {done} | {ro['seconds']:.0f} "
            f"| {ro['seconds_per_edit']:.3f} s (median {ro['median_edit_seconds']:.3f} s) "
            f"| {eff} |"
        )
    return "\n".join(rows)


def gpu_table(results: Path = RESULTS) -> str:
    rows = [HEADER]
    for name in ("forward", "forward_bf16"):
        if (r := _read(results, name)) is not None:
            rows.append(_forward_row(r))
    if (r := _read(results, "trace")) is not None:
        rows.append(_trace_row(r))
    if (r := _read(results, "rome")) is not None:
        rows += _rome_rows(r)
    return "\n".join(rows)


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    print(gpu_table(where))
    print()
    print(many_edits_table(where))
