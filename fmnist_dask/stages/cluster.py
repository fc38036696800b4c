"""Cluster stage: k-means across the workers, on raw pixels and on the PCA projection.

Each method yields a :class:`ClusterResult`; the evaluate stage scores them all alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from fmnist_dask import plots
from fmnist_dask.config import KMeansSpec
from fmnist_dask.models.kmeans import DaskKMeans


@dataclass
class ClusterResult:
    """One clustering method's output.

    Attributes
    ----------
    method : str
        Name used in tables, file names and column names (``kmeans_raw``, ...).
    labels : dask.array, shape (n_rows,), int32
        Cluster of every row, chunked like the cleaned data.
    n_clusters : int
    features : str
        The feature space the method saw, and where its silhouette is measured
        (``pixels`` or ``pca``).
    fit_seconds : float
        Wall time of fitting and labelling every row.
    scores : dict
        Method-specific scores (``inertia``, ``log_likelihood``, ``bic``, ...).
    """

    method: str
    labels: da.Array
    n_clusters: int
    features: str
    fit_seconds: float
    scores: dict[str, Any] = field(default_factory=dict)


def kmeans(X: da.Array, spec: KMeansSpec, seed: int, method: str, features: str
           ) -> tuple[ClusterResult, DaskKMeans]:
    """Fit :class:`DaskKMeans` (k-means|| then Lloyd) on ``X`` and label every row.

    The labels are persisted on the workers: every later score and artefact reuses them.
    """
    start = time.perf_counter()
    model = DaskKMeans(n_clusters=spec.n_clusters, max_iter=spec.max_iter, tol=spec.tol,
                       random_state=seed).fit(X)
    labels = model.labels_.persist()
    da.compute(labels.sum())  # wait, so the wall time covers labelling too
    result = ClusterResult(
        method=method, labels=labels, n_clusters=spec.n_clusters, features=features,
        fit_seconds=time.perf_counter() - start,
        scores={"inertia": float(model.inertia_), "n_iter": int(model.n_iter_)},
    )
    return result, model


def save_centroids(centers: np.ndarray, method: str, out_dir: Path,
                   images: np.ndarray | None = None) -> None:
    """Write ``clusters/<method>_centroids.parquet`` and, given images, a PNG of them.

    ``centers`` has shape (k, d) in the feature space; ``images`` (k, 784) in [0, 1] are
    the centres shown as pictures (for PCA centres: their inverse transform).
    """
    cluster_dir = out_dir / "clusters"
    cluster_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(centers, columns=[f"f{j + 1}" for j in range(centers.shape[1])])
    frame.insert(0, "cluster", np.arange(len(centers)))
    frame.to_parquet(cluster_dir / f"{method}_centroids.parquet", index=False)
    if images is not None:
        plots.image_grid(np.clip(images, 0, 1), [f"cluster {k}" for k in range(len(images))], 5,
                         cluster_dir / f"{method}_centroids.png", f"{method}: cluster centres")
