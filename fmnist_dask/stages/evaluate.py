"""Evaluate stage: score every clustering alike and write the per-row assignments.

Internal scores (inertia, silhouette) use only the features; the labels are read here, after
every model is fitted, to report accuracy (Hungarian matching), NMI and ARI.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from fmnist_dask import plots, runfiles
from fmnist_dask.artefacts import write_aligned_parquet
from fmnist_dask.config import ScoreSpec
from fmnist_dask.metrics import contingency, external_scores, silhouette
from fmnist_dask.results import ClusterResult
from fmnist_dask.sampling import choose_sample_indices, take_rows
from fmnist_dask.schema import LABEL_NAMES
from fmnist_dask.stages.clean import CleanData, scale_pixels

#: Rows drawn to find sample images of every cluster (only their labels travel).
IMAGE_POOL = 5_000


def content_cluster_names(table: np.ndarray) -> list[str]:
    """Name each cluster by what it holds: its largest class and that class's share.

    Parameters
    ----------
    table : numpy.ndarray of shape (n_classes, n_clusters)
        Rows of each class in each cluster.

    Returns
    -------
    list of str
        ``"6: Bag 41%"`` per cluster (``"6"`` for an empty one). A cluster of bags and
        sandals is titled by the bags, not by the class the one-to-one matching behind ACC
        happens to pair it with.
    """
    names = []
    for k in range(table.shape[1]):
        size = table[:, k].sum()
        if size == 0:
            names.append(f"{k}")
            continue
        largest = int(np.argmax(table[:, k]))
        names.append(f"{k}: {LABEL_NAMES[largest]} {table[largest, k] / size:.0%}")
    return names


def _sample_images(raw_pixels: da.Array, labels: da.Array, n_clusters: int, per_cluster: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_cluster`` random images of every cluster, scaled to [0, 1]; only those
    rows travel. Taken from the uint8 pixels and scaled here: taking them from the lazily
    scaled pixels scaled every block they sit in, a pass over all rows per method."""
    pool = choose_sample_indices(raw_pixels.shape[0], min(IMAGE_POOL, raw_pixels.shape[0]), seed)
    pool_labels = take_rows(labels, pool).compute()
    chosen = np.sort(np.concatenate(
        [pool[pool_labels == k][:per_cluster] for k in range(n_clusters)]
    ))
    images, chosen_labels = dask.compute(scale_pixels(take_rows(raw_pixels, chosen)),
                                         take_rows(labels, chosen))
    return images, chosen_labels


def score(result: ClusterResult, features: da.Array, data: CleanData, spec: ScoreSpec,
          out_dir: Path, seed: int) -> tuple[dict[str, Any], list[str]]:
    """Scores of one method, plus its PNGs in ``clusters/``.

    Returns
    -------
    dict
        The method's metrics row.
    list of str
        Display names of its clusters (``"3: Coat 62%"``: its largest class and that
        class's share), for every later figure that names them. Returned, not stored on
        ``result``: the methods are scored at the same time, and no stage changes another's
        output.
    """
    start = time.perf_counter()
    row: dict[str, Any] = {"method": result.method, "features": result.features,
                           "n_clusters": result.n_clusters, **result.scores}
    with ThreadPoolExecutor(1, thread_name_prefix=f"silhouette-{result.method}") as pool:
        # The silhouette (seconds of worker time) runs while this thread computes the
        # table and draws the figures, which do not need it: drawn after it, they held
        # the next stage back by a second (docs/benchmarks.md, "Session 16"). In this
        # thread's context: the stage's priority and span hold for its tasks too.
        pending = None if spec.silhouette == "off" else pool.submit(
            contextvars.copy_context().run, silhouette, features, result.labels,
            mode=spec.silhouette,
            exact_max_rows=spec.exact_silhouette_max_rows,
            sample_size=spec.silhouette_sample_size,
            reference_size=spec.silhouette_reference_size, random_state=seed,
            dtype=np.dtype(spec.silhouette_precision))
        external, names = _external_scores_and_figures(result, data, spec, out_dir, seed)
        if pending is not None:
            estimate = pending.result()
            row.update(silhouette=estimate.value, silhouette_method=estimate.method,
                       silhouette_ci_low=estimate.ci_low, silhouette_ci_high=estimate.ci_high,
                       silhouette_sample_size=estimate.sample_size,
                       silhouette_reference_size=estimate.reference_size)
    row.update(external)
    row.update(fit_seconds=result.fit_seconds, score_seconds=time.perf_counter() - start)
    return row, names


def _external_scores_and_figures(result: ClusterResult, data: CleanData, spec: ScoreSpec,
                                 out_dir: Path, seed: int
                                 ) -> tuple[dict[str, float], list[str]]:
    """ACC, NMI and ARI against the labels, and the method's two figures (classes in each
    cluster, sample images of each); returns the scores (none without labels) and the
    clusters' display names."""
    n_classes = len(LABEL_NAMES)
    # Unlabelled rows (-1) go to an extra row of the table, dropped before scoring.
    true = da.where(data.label < 0, n_classes, data.label).astype(np.int64)
    table = contingency(true, result.labels, n_classes + 1, result.n_clusters)[:n_classes]
    names = [str(k) for k in range(result.n_clusters)]
    scores: dict[str, float] = {}
    if table.sum() > 0:
        scores = external_scores(table)
        names = content_cluster_names(table)
        plots.contingency_heatmap(table, LABEL_NAMES, names,
                                  out_dir / runfiles.contingency(result.method),
                                  f"{result.method}: classes in each cluster")
    images, labels = _sample_images(data.raw_pixels, result.labels, result.n_clusters,
                                     spec.images_per_cluster, seed)
    plots.cluster_samples(images, labels, result.n_clusters, spec.images_per_cluster,
                          out_dir / runfiles.cluster_samples(result.method),
                          f"{result.method}: {spec.images_per_cluster} random images per cluster",
                          names)
    return scores, names


def write_assignments(results: list[ClusterResult], data: CleanData, out_dir: Path) -> int:
    """``assignments/part.N.parquet``: row_id, split, label, one cluster column per method."""
    columns = {"row_id": data.row_id, "split": data.split, "label": data.label}
    columns.update({r.method: r.labels for r in results})
    return write_aligned_parquet(out_dir / runfiles.ASSIGNMENTS, columns)


def write_metrics(rows: list[dict[str, Any]], out_dir: Path) -> pd.DataFrame:
    """``metrics.parquet``: one row per method, in the order of ``rows``."""
    frame = pd.DataFrame(rows)
    frame.to_parquet(out_dir / runfiles.METRICS, index=False)
    return frame


def tsne_figures(coordinates: np.ndarray, indices: np.ndarray, results: list[ClusterResult],
                 names: dict[str, list[str]], data: CleanData, out_dir: Path) -> list[Path]:
    """t-SNE maps of the sample coloured by each method's clusters and by the true class.

    ``names`` maps a method to its clusters' display names (from :func:`score`).
    """
    labels = dask.compute(*[take_rows(r.labels, indices) for r in results],
                          take_rows(data.label, indices))
    paths = []
    for result, clusters in zip(results, labels[:-1], strict=True):
        shown = names.get(result.method) or [f"cluster {k}" for k in range(result.n_clusters)]
        paths.append(plots.scatter_by_group(
            coordinates, clusters, shown, out_dir / runfiles.tsne_figure(result.method),
            f"t-SNE of {len(indices):,} rows coloured by {result.method} clusters"))
    truth = labels[-1]
    if (truth >= 0).any():
        paths.append(plots.scatter_by_group(
            coordinates, truth, LABEL_NAMES, out_dir / runfiles.TSNE_TRUE_CLASS,
            f"t-SNE of {len(indices):,} rows coloured by true class (evaluation only)"))
    return paths


COMPARISON_SCORES = ("silhouette", "acc", "nmi", "ari")


def write_comparison(metrics: pd.DataFrame, stage_seconds: dict[str, float], out_dir: Path
                     ) -> pd.DataFrame:
    """``comparison.png`` and ``comparison.md``: every method's scores side by side."""
    columns = [c for c in ("method", "features", "inertia", "silhouette", "log_likelihood",
                           "bic", "acc", "nmi", "ari", "fit_seconds") if c in metrics]
    table = metrics[columns].copy()
    present = [s for s in COMPARISON_SCORES if s in table]
    plots.method_comparison(list(table["method"]),
                            {s: table[s].fillna(0).tolist() for s in present},
                            out_dir / runfiles.COMPARISON_PNG, "Clustering methods compared")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells).replace("nan", "") + " |")
    lines += ["", "Stage wall times (s): " + ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in stage_seconds.items())]
    (out_dir / runfiles.COMPARISON_MD).write_text("\n".join(lines) + "\n")
    return table
