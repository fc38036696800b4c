"""Figures shared by the stages: image grids, bar charts, histograms.

Matplotlib runs headless (Agg); every figure is closed after saving so long jobs do not
accumulate memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist_dask.fetch import IMAGE_SHAPE  # noqa: E402


def save(fig: plt.Figure, path: Path) -> Path:
    """Save a figure as PNG (creating the folder) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, titles: Sequence[str], n_cols: int, path: Path,
               suptitle: str | None = None) -> Path:
    """Grid of 28x28 images (rows of ``images``, values in [0, 1]) with a title each."""
    n_rows = max(1, -(-len(images) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(np.asarray(image).reshape(IMAGE_SHAPE), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path)


def bar_chart(names: Sequence[str], series: dict[str, Sequence[float]], path: Path,
              title: str, ylabel: str) -> Path:
    """Grouped bar chart: one group per name, one bar per series (e.g. per split)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(positions + i * width, values, width, label=label)
    ax.set_xticks(positions + width * (len(series) - 1) / 2, names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return save(fig, path)


def histogram(counts: np.ndarray, edges: np.ndarray, path: Path, title: str,
              xlabel: str) -> Path:
    """Bar plot of precomputed histogram counts (log scale: background pixels dominate)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="none")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pixels (log scale)")
    ax.set_title(title)
    return save(fig, path)
