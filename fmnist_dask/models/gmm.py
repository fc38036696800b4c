"""Gaussian mixture fitted on an in-memory sample, applied to every block of the full data.

The mixture is scikit-learn's ``GaussianMixture``, fitted on the sample (small: at most
70,000 rows of 10 PCA components). Its parameters (a few kilobytes) travel to the workers as
one graph key, and the full projected data is assigned and scored block by block; the mean
log-likelihood over all rows is a tree reduction of per-block sums.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from fmnist_dask._blocks import per_block


def fit_gmm(
    sample: np.ndarray,
    n_components: int = 10,
    covariance_type: str = "full",
    random_state: int | np.random.RandomState | None = None,
    **kwargs: Any,
) -> GaussianMixture:
    """Fit a Gaussian mixture on a sample.

    Parameters
    ----------
    sample : numpy.ndarray of shape (n_sample, n_features)
        Rows to fit (e.g. the PCA-projected sample).
    n_components : int, default=10
        Mixture components.
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
        Covariance parametrisation.
    random_state : int, RandomState or None
        Seed of the k-means initialisation.
    **kwargs
        Other ``GaussianMixture`` parameters (``n_init``, ``max_iter``, ``tol``...).

    Returns
    -------
    sklearn.mixture.GaussianMixture
        The fitted mixture.
    """
    gmm = GaussianMixture(
        n_components=n_components,
        covariance_type=covariance_type,
        random_state=random_state,
        **kwargs,
    )
    # Single-threaded BLAS: the products are (n x 10) by (10 x 10), too small to share, and
    # multithreaded OpenBLAS made this fit slower (docs/benchmarks.md, "Figures behind
    # choices in the code").
    with threadpool_limits(limits=1, user_api="blas"):
        return gmm.fit(sample)


def gmm_summary(gmm: GaussianMixture, sample: np.ndarray) -> dict[str, float | int | bool]:
    """Scores of a fitted mixture on the sample it was fitted on.

    Parameters
    ----------
    gmm : sklearn.mixture.GaussianMixture
        Fitted mixture.
    sample : numpy.ndarray of shape (n_sample, n_features)
        The fitting sample.

    Returns
    -------
    dict
        ``avg_log_likelihood`` (mean log density per row, nats), ``bic`` (lower is better),
        ``converged`` and ``n_iter`` of EM.
    """
    return {
        "avg_log_likelihood": float(gmm.score(sample)),
        "bic": float(gmm.bic(sample)),
        "converged": bool(gmm.converged_),
        "n_iter": int(gmm.n_iter_),
    }


def _predict_block(block: np.ndarray, model: GaussianMixture) -> np.ndarray:
    with threadpool_limits(limits=1, user_api="blas"):
        return model.predict(block).astype(np.int32)


def _score_samples_block(block: np.ndarray, model: GaussianMixture) -> np.ndarray:
    # float64 whatever the input: the mean over millions of rows is summed in this type.
    with threadpool_limits(limits=1, user_api="blas"):
        return model.score_samples(block).astype(np.float64)


def predict_blocks(gmm: GaussianMixture, X: da.Array) -> da.Array:
    """Most likely component of every row, computed per block on the workers.

    Parameters
    ----------
    gmm : sklearn.mixture.GaussianMixture
        Fitted mixture.
    X : dask.array.Array of shape (n_rows, n_features)
        Full data in the space the mixture was fitted in.

    Returns
    -------
    dask.array.Array of shape (n_rows,), int32
        Component of each row; lazy, chunked like the rows of ``X``.
    """
    return per_block(_predict_block, X, gmm, n_features=gmm.n_features_in_, dtype=np.int32)


def score_samples_blocks(gmm: GaussianMixture, X: da.Array) -> da.Array:
    """Log density of every row under the mixture, per block.

    Parameters
    ----------
    gmm : sklearn.mixture.GaussianMixture
        Fitted mixture.
    X : dask.array.Array of shape (n_rows, n_features)
        Full data.

    Returns
    -------
    dask.array.Array of shape (n_rows,), float64
        ``log p(x)`` of each row in nats; lazy.
    """
    return per_block(_score_samples_block, X, gmm, n_features=gmm.n_features_in_,
                     dtype=np.float64)


def score_blocks(gmm: GaussianMixture, X: da.Array) -> da.Array:
    """Mean log-likelihood per row over all rows (``gmm.score`` of the full data).

    Parameters
    ----------
    gmm : sklearn.mixture.GaussianMixture
        Fitted mixture.
    X : dask.array.Array of shape (n_rows, n_features)
        Full data.

    Returns
    -------
    dask.array.Array of shape ()
        Mean log density in nats, reduced as a tree of per-block sums; lazy.
    """
    return score_samples_blocks(gmm, X).mean()
