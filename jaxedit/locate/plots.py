"""Plots of causal traces: per-fact heatmaps and data-set average effects (Meng et al. 2022,
Figures 1 and 2). Matplotlib with the Agg backend (files, no display needed) unless pyplot was
imported first (a notebook keeps its inline backend).

Heatmaps: tokens on y (subject tokens starred), layers on x, colour = p(answer) from
`low_score` up; purple = hidden states, green = MLP, red = attention (the paper's colours). An
attribution-patching result (`jaxedit.locate.atp`) is titled as an estimate, its exactly
verified cells circled.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # keep a notebook's inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
TITLES = {
    "hidden": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring Attn after corrupted input",
}


def heatmap(result: dict[str, Any], kind: str, ax=None):
    """Draw one kind's [tokens, layers] grid of p(answer) on `ax` (a new figure if None)."""
    scores = np.asarray(result["kinds"][kind]["scores"], np.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 0.28 * len(scores) + 1.2), dpi=150)
    b, e = result["subject_range"]
    labels = [repr(t)[1:-1] + ("*" if b <= i < e else "") for i, t in enumerate(result["tokens"])]
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(scores), cmap=CMAPS[kind], vmin=result["low_score"], vmax=None
    )
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5)
    ax.set_yticklabels(labels, fontsize=8)
    L = scores.shape[1]
    step = 5 if L <= 60 else 10
    ax.set_xticks(np.arange(0, L, step) + 0.5)
    ax.set_xticklabels(range(0, L, step), fontsize=8)
    atp = result.get("method") == "atp"
    ax.set_title(("AtP estimate: " if atp else "") + TITLES[kind], fontsize=9)
    # cells re-run exactly (`--verify-top`): circled
    for cell in result.get("verified", {}).get(kind, []):
        ax.plot(cell["layer"] + 0.5, cell["token"] + 0.5, "o", ms=3, mfc="none", mec="black")
    window = result.get("window", 10)
    ax.set_xlabel(
        "single restored layer"
        if kind == "hidden"
        else f"center of interval of {window} restored {'MLP' if kind == 'mlp' else 'Attn'} layers",
        fontsize=8,
    )
    cb = plt.colorbar(mesh, ax=ax)
    cb.ax.tick_params(labelsize=7)
    # Below the colour bar, as in the paper (on top it collides with the title).
    cb.ax.set_title(f"p({result['answer'].strip()})", fontsize=8, y=-0.12)
    return ax


def save_heatmaps(result: dict[str, Any], out_dir: str, fmt: str = "png") -> list[str]:
    """DIR/trace_{kind}.{fmt} for each traced kind; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind in result["kinds"]:
        ax = heatmap(result, kind)
        path = os.path.join(out_dir, f"trace_{kind}.{fmt}")
        ax.figure.savefig(path, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(path)
    return paths


def average_effects(summary: dict[str, Any], classes: Sequence[str] | None = None, axes=None):
    """One panel per kind: average indirect effect per layer for each token class, with the 95%
    confidence band. Returns the figure."""
    kinds = list(summary["kinds"])
    if axes is None:
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), dpi=150)
    axes = np.atleast_1d(axes)
    for ax, kind in zip(axes, kinds, strict=True):
        per_class = summary["kinds"][kind]
        for cls in classes or per_class:
            if cls not in per_class:
                continue
            mean = np.asarray(per_class[cls]["mean"])
            ci = np.asarray(per_class[cls]["ci95"])
            x = np.arange(len(mean))
            (line,) = ax.plot(x, mean, label=cls, lw=1.4)
            ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.15, lw=0)
        name = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}[kind]
        ax.set_title(f"Average indirect effect of {name}", fontsize=9, color=COLOURS[kind])
        ax.set_xlabel("layer" + (" (window centre)" if kind != "hidden" else ""), fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("p(answer) − low score", fontsize=8)
    axes[-1].legend(fontsize=7, frameon=False)
    fig = axes[0].figure
    fig.suptitle(
        f"{summary.get('model', '')}: {summary['n_facts']} facts "
        f"({summary['n_skipped']} skipped: wrong clean prediction)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def save_average_effects(summary: dict[str, Any], path: str) -> str:
    fig = average_effects(summary)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
