"""Figures shared by the stages: image grids, bar charts, histograms.

Matplotlib runs headless (Agg); every figure is closed after saving so long jobs do not
accumulate memory. Stages run in threads of their own, and pyplot keeps global state (the
current figure, the figure registry): one figure is drawn at a time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402

from fmnist_dask.schema import IMAGE_SHAPE  # noqa: E402

_PYPLOT = threading.RLock()
_F = TypeVar("_F", bound=Callable)


def _one_at_a_time(func: _F) -> _F:
    """Draw and save the figure while holding the pyplot lock."""
    @functools.wraps(func)
    def locked(*args, **kwargs):
        with _PYPLOT:
            return func(*args, **kwargs)
    return locked  # type: ignore[return-value]


def save(fig: plt.Figure, path: Path) -> Path:
    """Save a figure as PNG (creating the folder) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@_one_at_a_time
def image_grid(images: np.ndarray, titles: Sequence[str], n_cols: int, path: Path,
               suptitle: str | None = None) -> Path:
    """Grid of 28x28 images (rows of ``images``, values in [0, 1]) with a title each.

    Drawn as one picture with the titles above its rows of images: an axes per image
    took 0.37 s of the client's time for ten images, and the stages draw four such grids.
    """
    n_rows = max(1, -(-len(images) // n_cols))
    rows = [images[r * n_cols : (r + 1) * n_cols] for r in range(n_rows)]
    canvas = image_mosaic(rows, n_cols, title_gap=_TITLE_GAP)
    fig, ax = plt.subplots(figsize=(1.6 * n_cols, 1.8 * n_rows))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    (h, w), gap = IMAGE_SHAPE, MOSAIC_GAP
    for i, title in enumerate(titles[: len(images)]):
        r, c = divmod(i, n_cols)
        ax.text(c * (w + gap) + w / 2 - 0.5, _TITLE_GAP + r * (h + _TITLE_GAP) - 1.5, title,
                ha="center", va="bottom", fontsize=8)
    if suptitle:
        ax.set_title(suptitle, pad=12)
    return save(fig, path)


@_one_at_a_time
def bar_chart(names: Sequence[str], series: dict[str, Sequence[float]], path: Path,
              title: str, ylabel: str) -> Path:
    """Grouped bar chart: one group per name, one bar per series (e.g. per split)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(names))
    hatches = ("", "//", "..", "xx")  # series stay apart in grey and for colour-blind readers
    for i, (label, values) in enumerate(series.items()):
        ax.bar(positions + i * width, values, width, label=label,
               hatch=hatches[i % len(hatches)], edgecolor="white")
    ax.set_xticks(positions + width * (len(series) - 1) / 2, names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return save(fig, path)


@_one_at_a_time
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


@_one_at_a_time
def explained_variance(ratio: np.ndarray, path: Path) -> Path:
    """Bars of each component's explained-variance ratio and the cumulative curve."""
    fig, ax = plt.subplots(figsize=(7, 4))
    components = np.arange(1, len(ratio) + 1)
    ax.bar(components, ratio, label="per component")
    ax.plot(components, np.cumsum(ratio), marker="o", color="black", label="cumulative")
    for x, y in zip(components, np.cumsum(ratio), strict=True):
        ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set_xticks(components)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("principal component")
    ax.set_ylabel("fraction of variance")
    ax.set_title("PCA explained variance")
    ax.legend(loc="center right")
    return save(fig, path)


#: Blank pixels between the images of a mosaic.
MOSAIC_GAP = 2
#: Blank pixels above each row of an image grid, where the images' titles go.
_TITLE_GAP = 9


def image_mosaic(rows: Sequence[np.ndarray], width: int, title_gap: int = 0) -> np.ndarray:
    """One picture of rows of 28x28 images (each row an (m, 784) array, m <= ``width``),
    :data:`MOSAIC_GAP` blank pixels between images; with ``title_gap``, that many blank
    pixels above every row instead (room for titles). Values in [0, 1], blank cells 0."""
    h, w = IMAGE_SHAPE
    between = title_gap or MOSAIC_GAP
    canvas = np.zeros((len(rows) * (h + between) - between + title_gap,
                       width * (w + MOSAIC_GAP) - MOSAIC_GAP))
    for r, images in enumerate(rows):
        for c, image in enumerate(images[:width]):
            top, left = title_gap + r * (h + between), c * (w + MOSAIC_GAP)
            canvas[top : top + h, left : left + w] = np.reshape(image, IMAGE_SHAPE)
    return canvas


@_one_at_a_time
def cluster_samples(images: np.ndarray, clusters: np.ndarray, n_clusters: int, per_cluster: int,
                    path: Path, title: str, cluster_titles: Sequence[str] | None = None) -> Path:
    """One row per cluster with up to ``per_cluster`` of its images (values in [0, 1]).

    Drawn as one image with the clusters' names as row labels: an axes per picture (110
    for 10 clusters) took seconds of the client's time per method.
    """
    canvas = image_mosaic([images[clusters == k] for k in range(n_clusters)], per_cluster)
    fig, ax = plt.subplots(figsize=(1.0 * (per_cluster + 1) + 1.2, 1.05 * n_clusters))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    step = IMAGE_SHAPE[0] + MOSAIC_GAP
    ax.set_yticks(np.arange(n_clusters) * step + IMAGE_SHAPE[0] / 2 - 0.5,
                  [cluster_titles[k] if cluster_titles else f"cluster {k}"
                   for k in range(n_clusters)], fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title)
    return save(fig, path)


@_one_at_a_time
def contingency_heatmap(table: np.ndarray, class_names: Sequence[str],
                        cluster_names: Sequence[str], path: Path, title: str) -> Path:
    """Counts of each class (rows) in each cluster (columns), annotated."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * table.shape[1], 1.0 + 0.5 * table.shape[0]))
    image = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), cluster_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), class_names, fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_ylabel("true class (evaluation only)")
    threshold = table.max() / 2 if table.size else 0
    for (i, j), value in np.ndenumerate(table):
        ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=6,
                color="black" if value > threshold else "white")
    fig.colorbar(image, ax=ax, label="images")
    ax.set_title(title)
    return save(fig, path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


@_one_at_a_time
def scatter_by_group(xy: np.ndarray, groups: np.ndarray, names: Sequence[str], path: Path,
                     title: str) -> Path:
    """2-D scatter coloured (tab10) and shaped by group, with a legend by name.

    Colour and marker both encode the group, and each group's name is written at its median
    point, so the plot still reads in grey or for colour-blind readers.
    """
    fig, ax = plt.subplots(figsize=(8.5, 7))
    cmap = plt.get_cmap("tab10")
    size = max(0.5, min(6.0, 20000 / max(len(xy), 1)))
    for g, name in enumerate(names):
        members = xy[groups == g]
        if not len(members):
            continue
        ax.scatter(members[:, 0], members[:, 1], s=size, color=cmap(g % 10),
                   marker=MARKERS[g % len(MARKERS)], linewidths=0, alpha=0.6,
                   label=f"{name} ({len(members):,})", rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    for g, name in enumerate(names):
        members = xy[groups == g]
        if len(members):
            x, y = np.median(members, axis=0)
            ax.text(x, y, name.removeprefix("cluster "), fontsize=8, fontweight="bold",
                    ha="center", va="center",
                    path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])
    # Legend markers about 7 pt across whatever the point size (s is an area in pt^2).
    legend = ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                       markerscale=max(1.0, float(np.sqrt(40 / size))), frameon=False)
    for handle in legend.legend_handles:
        handle.set_alpha(1)
    return save(fig, path)


@_one_at_a_time
def method_comparison(methods: Sequence[str], scores: dict[str, Sequence[float]], path: Path,
                      title: str) -> Path:
    """Grouped bars: one group per score (silhouette, ACC, NMI, ARI), one bar per method."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("tab10")
    hatches = ("", "//", "..", "xx", "\\\\", "--", "oo", "++")
    width = 0.8 / max(len(methods), 1)
    positions = np.arange(len(scores))
    for i, method in enumerate(methods):
        values = [scores[s][i] for s in scores]
        bars = ax.bar(positions + i * width, values, width, label=method, color=cmap(i % 10),
                      hatch=hatches[i % len(hatches)], edgecolor="white")
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(positions + width * (len(methods) - 1) / 2, list(scores))
    ax.set_ylabel("score (higher is better)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(methods), 6), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.axhline(0, color="black", linewidth=0.5)
    return save(fig, path)


@_one_at_a_time
def timeline(names: Sequence[str], starts: Sequence[float], ends: Sequence[float],
             done: Sequence[bool], path: Path, title: str,
             workers: dict[str, list[tuple[str, float, float]]] | None = None) -> Path:
    """The run over time: one bar per stage from its start to its end, and below it, given
    ``workers`` (``{worker: [(stage, start, end), ...]}``), one row per worker with the
    intervals it computed each stage's tasks, coloured by stage. Times are seconds since
    the run began.

    Stages that did not finish (``done`` false) are hatched, so the picture also reads in
    grey.
    """
    workers = workers or {}
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    heights = [0.32 * len(names) + 0.9] + ([0.4 * len(workers) + 0.9] if workers else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, sum(heights) + 0.6), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    ax = axes[0, 0]
    rows = np.arange(len(names))
    widths = np.maximum(np.subtract(ends, starts), 0)
    bars = ax.barh(rows, widths, left=starts, height=0.6, edgecolor="white",
                   color=[colours[n] if workers else "#0b4f8a" for n in names])
    for bar, ok in zip(bars, done, strict=True):
        if not ok:
            bar.set(color="#8a1f11", hatch="//")
    for row, end, width in zip(rows, ends, widths, strict=True):
        ax.text(end, row, f" {width:.1f} s", va="center", fontsize=7)
    ax.set_yticks(rows, names, fontsize=8)
    ax.invert_yaxis()  # the first stage on top, as in the table
    ax.set_xlim(0, max(ends, default=1) * 1.12 or 1)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    if workers:
        wax = axes[1, 0]
        for row, spans in enumerate(workers.values()):
            wax.broken_barh([(a, b - a) for _, a, b in spans], (row - 0.3, 0.6),
                            facecolors=[colours.get(stage, "grey") for stage, _, _ in spans])
        wax.set_yticks(range(len(workers)), list(workers), fontsize=8)
        wax.set_ylim(len(workers) - 0.5, -0.5)
        wax.set_title("when each worker computed each stage's tasks (same colours)",
                      fontsize=9)
        wax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the run started")
    return save(fig, path)
