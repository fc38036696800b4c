"""Exploration stage: sample images, class counts, pixel histogram, mean and std.

Everything is reduced on the workers in one level of tasks, one per block of the stored
uint8 pixels: how often each of the 256 byte values occurs (from which the histogram,
mean and std follow exactly), the rows per class, and the sample rows that fall in the
block. Only these small partials reach the client, which adds them up. One level, so that
every task is ready as the stage starts and its priority puts it ahead of the longer
stages' tasks on the worker that holds its block (a tree of partials put its later levels
behind a k-means fit of seconds; docs/benchmarks.md, "Session 18").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmnist_dask import plots, runfiles
from fmnist_dask._blocks import block_partials, gather_blocks
from fmnist_dask.config import EdaSpec
from fmnist_dask.sampling import take_rows
from fmnist_dask.schema import LABEL_NAMES
from fmnist_dask.stages.clean import CleanData

#: Bins of the per-block class counts: label + 1 (bin 0 holds unlabelled rows, -1).
_CLASS_BINS = len(LABEL_NAMES) + 1


def label_name(label: int) -> str:
    """Class name of a label id, or ``"unlabelled"`` for -1."""
    return LABEL_NAMES[label] if 0 <= label < len(LABEL_NAMES) else "unlabelled"


def _k_value_counts(xb: np.ndarray) -> np.ndarray:
    """How often each byte value 0..255 occurs in a block of uint8 pixels."""
    flat = xb.reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    step = 256 * xb.shape[1]  # bincount's int64 copy of 256 rows stays in cache
    for s in range(0, flat.size, step):
        counts += np.bincount(flat[s : s + step], minlength=256)
    return counts


def _k_counts(xb: np.ndarray, labels: np.ndarray, **_: Any) -> np.ndarray:
    """``[byte-value counts (256) | rows per label + 1 (11)]`` of one block."""
    classes = np.bincount(labels.astype(np.int64) + 1, minlength=_CLASS_BINS)
    return np.concatenate([_k_value_counts(xb), classes])


def pixel_statistics(value_counts: np.ndarray, bins: int
                     ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Mean, std and histogram of the scaled pixels from the counts of their byte values.

    Parameters
    ----------
    value_counts : numpy.ndarray of shape (256,)
        How many pixels hold each stored value 0..255.
    bins : int
        Equal-width histogram bins over [0, 1].

    Returns
    -------
    mean, std : float
        Of the scaled values (float32 ``v / 255``, as the models see them), over all pixels.
    counts : numpy.ndarray of shape (bins,), int64
    edges : numpy.ndarray of shape (bins + 1,)
        ``numpy.histogram`` of every scaled pixel, bin for bin: each value falls in the
        bin numpy puts it in, counted as often as it occurs.
    """
    scaled = np.arange(256, dtype=np.float32) / np.float32(255)
    weights = value_counts.astype(np.float64)
    n_values = weights.sum()
    mean = float((weights * scaled).sum() / n_values)
    var = float((weights * (scaled.astype(np.float64) - mean) ** 2).sum() / n_values)
    hist, edges = np.histogram(scaled, bins=bins, range=(0.0, 1.0), weights=value_counts)
    return mean, float(np.sqrt(var)), hist.astype(np.int64), edges


def explore(data: CleanData, splits: list[str], spec: EdaSpec, out_dir: Path, seed: int
            ) -> dict[str, Any]:
    """Write ``eda/*.png`` and return the summary recorded in the manifest.

    Returns
    -------
    dict
        ``pixel_mean`` and ``pixel_std`` of the scaled pixels (over all pixels of all kept
        rows), ``class_counts`` per split (by class name), ``histogram`` counts and edges.
    """
    rng = np.random.default_rng(seed)
    n_show = min(spec.sample_grid**2, data.n_rows)
    chosen = np.sort(rng.choice(data.n_rows, size=n_show, replace=False))
    # Per-block partials, added up here (no tree of tasks: see the module's docstring).
    partials, pixels, labels, sample_ids = gather_blocks(
        block_partials(_k_counts, data.raw_pixels, data.label, out_shape=(256 + _CLASS_BINS,),
                       dtype=np.int64),
        *(take_rows(x, chosen) for x in (data.raw_pixels, data.label, data.row_id)))
    value_counts = partials[:, :256].sum(axis=0)
    per_split = {s: np.zeros(_CLASS_BINS, dtype=np.int64) for s in splits}
    for split, block in zip(data.block_splits, partials[:, 256:], strict=True):
        per_split[split] += block
    # scaled as the models see the pixels (float32 v / 255, clean.scale_pixels)
    images = pixels.astype(np.float32) / np.float32(255)
    mean, std, counts, edges = pixel_statistics(value_counts, spec.histogram_bins)
    plots.image_grid(images, [label_name(int(v)) for v in labels], spec.sample_grid,
                     out_dir / runfiles.SAMPLE_IMAGES, "Random sample of cleaned images")
    names = [*LABEL_NAMES, "unlabelled"]
    class_counts = {
        split: {names[i - 1]: int(c) for i, c in enumerate(row) if c and i > 0}
        | ({"unlabelled": int(row[0])} if row[0] else {})
        for split, row in per_split.items()
    }
    present = [n for n in names if any(n in c for c in class_counts.values())]
    plots.bar_chart(present, {s: [c.get(n, 0) for n in present] for s, c in class_counts.items()},
                    out_dir / runfiles.CLASS_DISTRIBUTION, "Images per class", "images")
    plots.histogram(counts, edges, out_dir / runfiles.PIXEL_HISTOGRAM,
                    f"Pixel values ({spec.histogram_bins} bins), mean {mean:.4f}, std {std:.4f}",
                    "scaled pixel value")
    return {
        "pixel_mean": float(mean),
        "pixel_std": std,
        "class_counts": class_counts,
        "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        "sample_row_ids": [int(r) for r in sample_ids],
    }
