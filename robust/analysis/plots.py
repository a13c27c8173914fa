"""The gradient analysis's figure: per norm layer, the gradient norms of the clean and adversarial
losses, and their cosine (``robust analyze -o``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from robust.curves import save_png


def plot_gradient_analysis(analysis: dict[str, Any], path: str | Path, overwrite: bool = True) -> Path:
    """Per norm layer (x axis): gradient norms of the clean and adversarial losses, and their cosine."""

    layers = analysis["layers"]
    x = list(range(len(layers)))
    fig = Figure(figsize=(max(8.0, 0.42 * len(layers) + 3), 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    lines = [
        ("shared_clean", "shared affine, clean loss", "C0", "-"),
        ("shared_adv", "shared affine, adv loss", "C3", "-"),
        ("route_clean", "clean-route affine, clean loss", "C0", "--"),
        ("route_adv", "adv-route affine, adv loss", "C3", "--"),
    ]
    for key, label, colour, style in lines:
        values = [layer[key] for layer in layers]
        if all(v is not None for v in values):
            top.plot(x, values, style, color=colour, marker="o", markersize=3, label=label)
    top.set_yscale("log")
    top.set_ylabel("gradient norm (mean over batches)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(x, [layer["cosine"] for layer in layers], color="C2", marker="o", markersize=3,
                label=analysis.get("cosine_of", "cosine"))
    bottom.axhline(0.0, color="grey", linewidth=0.8)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("cosine(clean grad, adv grad)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    bottom.set_xticks(x)
    bottom.set_xticklabels([layer["layer"] for layer in layers], rotation=70, fontsize=7)
    bottom.set_xlabel("norm layer")
    fig.suptitle(f"gradient analysis: norm={analysis['norm']}, {analysis['settings']['batches']} batches, eps {analysis['settings']['eps']:.4g}")
    return save_png(fig, path, overwrite)
