"""Reduce stage: exact PCA fitted across the workers, projections written as parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from fmnist_dask import plots, runfiles
from fmnist_dask.artefacts import write_aligned_parquet
from fmnist_dask.config import ReduceSpec
from fmnist_dask.models.pca import DaskPCA


@dataclass
class Reduction:
    """The fitted PCA and the projected rows.

    Attributes
    ----------
    pca : DaskPCA
    projected : dask.array, shape (n_rows, n_components), float32
        Chunked like the cleaned pixels, persisted on the workers.
    """

    pca: DaskPCA
    projected: da.Array


def reduce(pixels: da.Array, row_id: da.Array, spec: ReduceSpec, out_dir: Path
           ) -> tuple[Reduction, dict[str, Any]]:
    """Fit PCA on ``pixels`` (n_rows, 784) and write its artefacts into ``out_dir``.

    Writes ``projected/part.N.parquet`` (``row_id``, ``pc1..pcK``), ``pca/explained_variance.
    parquet`` (component, ratio, cumulative), ``pca/explained_variance.png`` and
    ``pca/components.png`` (the mean image and the first components as images).

    Returns
    -------
    Reduction
    dict
        Summary for the manifest (explained variance ratios, cumulative total).
    """
    pca = DaskPCA(n_components=spec.n_components).fit(pixels)
    # Persisted before it is written: the parquet files and every later stage read the
    # same blocks, projected once.
    projected = pca.transform(pixels).astype(np.float32).persist()
    (out_dir / runfiles.EXPLAINED_VARIANCE).parent.mkdir(parents=True, exist_ok=True)
    ratio = np.asarray(pca.explained_variance_ratio_)
    pd.DataFrame(
        {
            "component": np.arange(1, len(ratio) + 1),
            "explained_variance": pca.explained_variance_,
            "explained_variance_ratio": ratio,
            "cumulative_ratio": np.cumsum(ratio),
        }
    ).to_parquet(out_dir / runfiles.EXPLAINED_VARIANCE, index=False)
    plots.explained_variance(ratio, out_dir / runfiles.EXPLAINED_VARIANCE_PNG)
    shown = min(9, len(ratio))
    images = np.vstack([pca.mean_[None], pca.components_[:shown]])
    # Components have both signs: map them to [0, 1] around 0.5 for display.
    scale = np.abs(images[1:]).max(axis=1, keepdims=True)
    images[1:] = 0.5 + 0.5 * images[1:] / scale
    plots.image_grid(images, ["mean"] + [f"PC{i + 1} ({ratio[i]:.1%})" for i in range(shown)],
                     5, out_dir / runfiles.COMPONENTS_PNG, "Mean image and principal components")
    write_aligned_parquet(out_dir / runfiles.PROJECTED, {"row_id": row_id, "pc": projected})
    summary = {
        "n_components": int(pca.n_components_),
        "explained_variance_ratio": [float(r) for r in ratio],
        "cumulative_explained_variance": float(ratio.sum()),
    }
    return Reduction(pca=pca, projected=projected), summary
