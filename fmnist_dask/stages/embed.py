"""Embed stage: 2-D t-SNE map of the reduced sample (openTSNE, FFT-accelerated).

The sample is embedded on a worker; only its 2-D coordinates come back. Rows outside the
sample are placed only when ``tsne.embed_all`` asks for it, block by block on the workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from fmnist_dask import runfiles
from fmnist_dask._blocks import on_worker, one_block, rows_like
from fmnist_dask.artefacts import write_aligned_parquet
from fmnist_dask.config import TSNESpec
from fmnist_dask.models.tsne import TSNEEmbedding, subsample_trustworthiness
from fmnist_dask.sampling import Sample, take_rows


@dataclass
class Embedding:
    """t-SNE coordinates of the sample rows (``indices`` are their positions in the data)."""

    indices: np.ndarray
    coordinates: np.ndarray


def _fit(rows: np.ndarray, spec: TSNESpec, seed: int) -> TSNEEmbedding:
    return TSNEEmbedding(perplexity=spec.perplexity, n_jobs=spec.n_jobs,
                         random_state=seed).fit(rows)


def tsne(projected: da.Array, sample: Sample, row_id: da.Array, spec: TSNESpec, seed: int,
         out_dir: Path) -> tuple[Embedding, dict[str, Any]]:
    """Fit t-SNE on the sample and write ``embedding/part.N.parquet`` (row_id, x, y).

    Returns
    -------
    Embedding
        The sample's coordinates, for the scatter plots.
    dict
        ``sample_size``, ``embedded_rows``, ``kl_divergence`` and ``fit_seconds``.
    """
    start = time.perf_counter()
    model = on_worker(_fit, one_block(sample.rows), spec, seed)
    fit_seconds = time.perf_counter() - start
    if spec.embed_all:
        ids = row_id
        coordinates = model.transform_blocks(projected, sample_indices=sample.indices)
    else:
        ids = take_rows(row_id, sample.indices)
        coordinates = rows_like(model.embedding_, ids)
    write_aligned_parquet(out_dir / runfiles.EMBEDDING,
                          {"row_id": ids, "x": coordinates[:, 0], "y": coordinates[:, 1]})
    summary = {
        "sample_size": sample.size,
        "embedded_rows": int(projected.shape[0]) if spec.embed_all else sample.size,
        "kl_divergence": float(model.kl_divergence_),
        "fit_seconds": fit_seconds,
    }
    return Embedding(indices=sample.indices, coordinates=model.embedding_), summary


def trustworthiness(sample: Sample, embedding: Embedding, seed: int) -> float:
    """Trustworthiness of the map: 5 neighbours, on up to 5,000 sample points (the same
    points for a seed), computed on a worker.

    A stage of its own after the fit: its 1.6 s (a full sort of 5,000 x 5,000 distances)
    run beside the figures instead of after the fit, on the client.
    """
    return float(on_worker(subsample_trustworthiness, one_block(sample.rows),
                           embedding.coordinates, random_state=seed))
