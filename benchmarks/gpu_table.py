"""The README's GPU table ("Benchmarks", "On a GPU"), printed from the JSON that
`benchmarks/gpu.sh` wrote on the lent H200 (`benchmarks/results/gpu_h200/`): jaxedit and the
PyTorch baseline on the same GPU, the ratio, and how closely the two agree.

    uv run python benchmarks/gpu_table.py [benchmarks/results/gpu_h200]

`tests/test_docs.py` checks that the README holds exactly this table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_h200"
HEADER = "| benchmark | jaxedit | PyTorch, same GPU | ratio | agreement |\n|---|---|---|---|---|"


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
    print(gpu_table(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
