"""What a clustering method hands to the stages after it: its labels and scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask.array as da


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
