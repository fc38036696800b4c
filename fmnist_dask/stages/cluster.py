"""Cluster stage: k-means across the workers, on raw pixels and on the PCA projection; the
sample-based models (GMM, spectral, manifold-gmm) fitted on a worker and carried to every row.

Each method yields a :class:`ClusterResult`; the evaluate stage scores them all alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
from sklearn.mixture import GaussianMixture

from fmnist_dask import plots, runfiles
from fmnist_dask._blocks import computed, on_worker, one_block
from fmnist_dask.config import GMMSpec, KMeansSpec, ManifoldSpec, SpectralSpec
from fmnist_dask.models.extend import KNeighborsExtension
from fmnist_dask.models.gmm import fit_gmm, gmm_summary, predict_blocks
from fmnist_dask.models.kmeans import MAX_LOCAL_BYTES, DaskKMeans
from fmnist_dask.models.manifold import ManifoldClustering, ManifoldEnsemble, fit_on_workers
from fmnist_dask.models.spectral import FastSpectralClustering
from fmnist_dask.results import ClusterResult
from fmnist_dask.sampling import Sample, take_rows


def kmeans(X: da.Array, spec: KMeansSpec, seed: int, method: str, features: str,
           divide_by: float = 1.0, max_local_bytes: int = MAX_LOCAL_BYTES
           ) -> tuple[ClusterResult, DaskKMeans]:
    """Fit :class:`DaskKMeans` (k-means|| then Lloyd) on ``X / divide_by``; label every row.

    X of at most ``max_local_bytes`` is fitted in one task on one worker, larger X across
    the workers (see :class:`DaskKMeans`). The labels are persisted on the workers: every
    later score and artefact reuses them.
    """
    start = time.perf_counter()
    model = DaskKMeans(n_clusters=spec.n_clusters, max_iter=spec.max_iter, tol=spec.tol,
                       random_state=seed, divide_by=divide_by,
                       max_local_bytes=max_local_bytes).fit(X)
    labels = model.labels_.persist()
    computed(labels)  # the wall time covers labelling too
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
    table = out_dir / runfiles.centroids(method, "parquet")
    table.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(centers, columns=[f"f{j + 1}" for j in range(centers.shape[1])])
    frame.insert(0, "cluster", np.arange(len(centers)))
    frame.to_parquet(table, index=False)
    if images is not None:
        plots.image_grid(np.clip(images, 0, 1), [f"cluster {k}" for k in range(len(images))], 5,
                         out_dir / runfiles.centroids(method), f"{method}: cluster centres")


def _fit_gmm_and_summary(rows: np.ndarray, **params: Any) -> tuple[GaussianMixture, dict]:
    # one task: a second one for the summary waited, on the worker holding the sample,
    # behind whichever fit started there meanwhile
    model = fit_gmm(rows, **params)
    return model, gmm_summary(model, rows)


def gmm(projected: da.Array, sample: Sample, spec: GMMSpec, seed: int) -> ClusterResult:
    """Gaussian mixture fitted on the sample on a worker; every row assigned per block."""
    start = time.perf_counter()
    rows = one_block(sample.rows)
    model, summary = on_worker(_fit_gmm_and_summary, rows, n_components=spec.n_components,
                               covariance_type=spec.covariance_type, random_state=seed)
    labels = predict_blocks(model, projected).persist()
    computed(labels)
    return ClusterResult(
        method="gmm", labels=labels, n_clusters=spec.n_components, features="pca",
        fit_seconds=time.perf_counter() - start,
        scores={"log_likelihood": summary["avg_log_likelihood"], "bic": summary["bic"],
                "n_iter": summary["n_iter"], "converged": summary["converged"],
                "sample_size": sample.size},
    )


def _fit_spectral(rows: np.ndarray, spec: SpectralSpec, seed: int) -> np.ndarray:
    model = FastSpectralClustering(n_clusters=spec.n_clusters, n_neighbors=spec.n_neighbors,
                                   random_state=seed)
    return model.fit(rows).labels_


def spectral(projected: da.Array, sample: Sample, spec: SpectralSpec, seed: int
             ) -> ClusterResult:
    """Spectral clustering of the sample on a worker; other rows by a k-NN vote per block."""
    start = time.perf_counter()
    rows = one_block(sample.rows)
    sample_labels = on_worker(_fit_spectral, rows, spec, seed)
    extension = KNeighborsExtension(n_neighbors=spec.extension_neighbors).fit(
        sample.rows.compute(), sample_labels, sample_indices=sample.indices
    )
    labels = extension.predict(projected).astype(np.int32).persist()
    computed(labels)
    return ClusterResult(
        method="spectral", labels=labels, n_clusters=spec.n_clusters, features="pca",
        fit_seconds=time.perf_counter() - start, scores={"sample_size": sample.size},
    )


def manifold_ensemble(spec: ManifoldSpec, seed: int) -> ManifoldEnsemble:
    """The unfitted consensus a ``manifold:`` spec describes (also what the quality
    benchmark fits, so that its figures are the job's)."""
    member = ManifoldClustering(**spec.model_dump(exclude={"enabled", "n_runs"}))
    return ManifoldEnsemble(member, n_runs=spec.n_runs, random_state=seed)


def manifold(pixels: da.Array, sample: Sample, spec: ManifoldSpec, seed: int) -> ClusterResult:
    """``manifold-gmm``: a consensus of ``spec.n_runs`` fits on the sample's images, run in
    parallel on the workers; other rows by a k-NN vote per block.

    The model needs the images, not their PCA projection: the same sampled rows are taken
    from the scaled pixels. Only the combined model (one member's feature atoms and
    projection, and the sample's k-NN index: ~15 MB at 70,000 rows) comes back to the
    client, to be sent with the per-block vote. Its silhouette is measured in the job's PCA
    space, like the other sample-based methods, so that the scores compare.
    """
    start = time.perf_counter()
    images = one_block(take_rows(pixels, sample.indices))
    model = fit_on_workers(manifold_ensemble(spec, seed), images, sample.indices)
    labels = model.predict(pixels).astype(np.int32).persist()
    computed(labels)
    return ClusterResult(
        method="manifold_gmm", labels=labels, n_clusters=spec.n_clusters, features="pca",
        fit_seconds=time.perf_counter() - start,
        scores={"sample_size": sample.size, "n_runs": spec.n_runs,
                "stability": model.stability_},
    )
