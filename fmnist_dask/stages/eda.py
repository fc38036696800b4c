"""Exploration stage: sample images, class counts, pixel histogram, mean and std.

Everything is reduced on the workers (per-block histograms and sums); only the nine
sample images, the counts and the histogram reach the client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from fmnist_dask import plots, runfiles
from fmnist_dask.config import EdaSpec
from fmnist_dask.schema import LABEL_NAMES
from fmnist_dask.stages.clean import CleanData


def label_name(label: int) -> str:
    """Class name of a label id, or ``"unlabelled"`` for -1."""
    return LABEL_NAMES[label] if 0 <= label < len(LABEL_NAMES) else "unlabelled"


def explore(data: CleanData, splits: list[str], spec: EdaSpec, out_dir: Path, seed: int
            ) -> dict[str, Any]:
    """Write ``eda/*.png`` and return the summary recorded in the manifest.

    Returns
    -------
    dict
        ``pixel_mean`` and ``pixel_std`` of the scaled pixels (over all pixels of all kept
        rows), ``class_counts`` per split (by class name), ``histogram`` counts and edges.
    """
    pixels = data.pixels
    total = pixels.astype(np.float64).sum()
    total_sq = (pixels.astype(np.float64) ** 2).sum()
    counts, edges = da.histogram(pixels, bins=spec.histogram_bins, range=(0.0, 1.0))
    shifted = (data.label + 1).astype(np.int64)  # bin 0 holds unlabelled rows (-1)
    per_split = {
        s: da.bincount(shifted, weights=(data.split == s).astype(np.int64),
                       minlength=len(LABEL_NAMES) + 1)
        for s in splits
    }
    rng = np.random.default_rng(seed)
    n_show = min(spec.sample_grid**2, data.n_rows)
    chosen = np.sort(rng.choice(data.n_rows, size=n_show, replace=False))
    # One submission: computing the sample images apart made the scheduler see the scaled
    # pixel blocks twice under the same keys with different fusion (a run_spec warning).
    total, total_sq, counts, per_split, images, labels, sample_ids = dask.compute(
        total, total_sq, counts, per_split, pixels[chosen], data.label[chosen],
        data.row_id[chosen])
    n_values = data.n_rows * pixels.shape[1]
    mean = total / n_values
    std = float(np.sqrt(max(total_sq / n_values - mean**2, 0.0)))
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
