"""Exact PCA of a tall dask array from one pass of per-block scatter matrices.

For n >> d (Fashion-MNIST: 70,000 x 784) the d x d covariance holds everything PCA needs.
Each row block returns the sum of its shifted rows and their scatter matrix; a tree
reduction adds them; the client eigendecomposes the d x d covariance. That is the
``covariance_eigh`` solver scikit-learn itself picks for such shapes, made distributed,
with the same outputs and sign convention.

Why not dask-ml: ``dask_ml.decomposition.IncrementalPCA`` with its default solver gave a
far too low explained-variance ratio with scikit-learn 1.9, and ``PCA(svd_solver=
'randomized').transform`` fails (see ``docs/benchmarks.md`` for the comparison).

Numerical care: rows are shifted by an approximate mean (the mean of the first rows)
before the products, so the final centring subtracts a small correction instead of
cancelling two large sums; products run in float32 BLAS over at most
``SUB_ROWS`` rows and are accumulated in float64 (float64 throughout for float64 input).
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.extmath import svd_flip
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from fmnist_dask._blocks import (
    SUB_ROWS,
    as_row_chunked,
    block_partials,
    scratch,
    tree_sum,
    validate_rows,
)

#: Rows used to estimate the shift (an approximate mean).
_SHIFT_ROWS = 1000


def _k_scatter(xb: np.ndarray, shift: np.ndarray, **_: Any) -> np.ndarray:
    """[sum of (x - shift); scatter (x - shift)^T (x - shift)] as a (d + 1) x d array."""
    d = xb.shape[1]
    out = np.zeros((d + 1, d))
    s32 = shift.astype(xb.dtype)
    for s in range(0, len(xb), SUB_ROWS):
        xs = xb[s : s + SUB_ROWS]
        # reused buffers: a fresh 12 MB temporary per sub-block costs page faults
        # comparable to its arithmetic (see _blocks.scratch)
        z = np.subtract(xs, s32, out=scratch("pca_z", xs.shape, xb.dtype))
        out[0] += z.sum(axis=0, dtype=np.float64)
        out[1:] += np.matmul(z.T, z, out=scratch("pca_zz", (d, d), xb.dtype))
    return out


def _k_transform(
    xb: np.ndarray, mean: np.ndarray, components: np.ndarray, scale: np.ndarray | None
) -> np.ndarray:
    """(x - mean) @ components.T in float64 as x @ components.T - mean @ components.T,
    by sub-blocks of rows converted into a reused float64 buffer.

    Converting and centring the whole block first made two fresh float64 copies of it:
    their page faults and passes cost 8x the product (docs/benchmarks.md, "Big data,
    session 9").
    """
    out = np.empty((len(xb), len(components)), dtype=xb.dtype)
    shift = mean @ components.T
    for s in range(0, len(xb), SUB_ROWS):
        xs = xb[s : s + SUB_ROWS]
        x64 = scratch("pca_x64", xs.shape, np.float64)
        x64[:] = xs
        z = x64 @ components.T
        z -= shift
        if scale is not None:
            z /= scale
        out[s : s + SUB_ROWS] = z
    return out


def _k_inverse(
    zb: np.ndarray, mean: np.ndarray, components: np.ndarray, scale: np.ndarray | None
) -> np.ndarray:
    z = zb.astype(np.float64)
    if scale is not None:
        z = z * scale
    return (z @ components + mean).astype(zb.dtype, copy=False)


class DaskPCA(TransformerMixin, BaseEstimator):
    """Principal component analysis of a tall row-chunked dask array (exact, distributed).

    Parameters
    ----------
    n_components : int, default=10
        Number of components kept (1 <= n_components <= min(n_samples, n_features)).
    whiten : bool, default=False
        Divide the projections by the square roots of the explained variances.
    split_every : int, default=8
        Fan-in of the tree reduction.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Principal axes (unit rows), sign fixed as scikit-learn's ``svd_flip``
        (``u_based_decision=False``): the largest-magnitude loading of each is positive.
    explained_variance_ : ndarray of shape (n_components,)
        Variance along each component (units of X squared), with ddof=1.
    explained_variance_ratio_ : ndarray of shape (n_components,)
        Fraction of the total variance along each component.
    singular_values_ : ndarray of shape (n_components,)
        Singular values of the centred data.
    mean_ : ndarray of shape (n_features,)
        Per-feature mean.
    n_components_ : int
    n_samples_ : int
    n_features_in_ : int
    noise_variance_ : float
        Mean of the discarded eigenvalues (probabilistic PCA noise), 0 if none.
    """

    def __init__(self, n_components: int = 10, *, whiten: bool = False, split_every: int = 8):
        self.n_components = n_components
        self.whiten = whiten
        self.split_every = split_every

    def fit(self, X: Any, y: None = None) -> DaskPCA:
        """Fit the components with one pass over X.

        Parameters
        ----------
        X : dask.array.Array of shape (n_samples, n_features)
            Row-chunked float data (numpy is accepted and wrapped in one block).
        y : None
            Ignored.

        Returns
        -------
        self : DaskPCA
        """
        X = self._validate(X, reset=True)
        n, d = X.shape
        k = self.n_components
        if not 1 <= k <= min(n, d):
            raise ValueError(f"n_components={k} must be between 1 and min(n, d)={min(n, d)}")
        # the shift goes into the blocks' tasks as a task of the same graph: one round trip
        # to the workers, not one for the shift and one for the scatter
        shift = dask.delayed(np.asarray, pure=True)(
            X[: min(n, _SHIFT_ROWS)].mean(axis=0, dtype=np.float64))
        shift, stats = dask.compute(shift, tree_sum(
            block_partials(_k_scatter, X, consts=(shift,), out_shape=(d + 1, d)),
            self.split_every,
        ))
        delta = stats[0] / n  # mean - shift
        cov = (stats[1:] - n * np.outer(delta, delta)) / (n - 1)
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        # One BLAS thread: the client's thread count otherwise changes the eigenvectors
        # in the last bits, and the job's results must not depend on the machine that
        # submits it.
        with threadpool_limits(limits=1, user_api="blas"):
            eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
        eigvals = np.maximum(eigvals, 0.0)
        _, vt = svd_flip(None, eigvecs.T.copy(), u_based_decision=False)

        total = eigvals.sum()
        self.mean_ = shift + delta
        self.n_samples_ = n
        self.n_components_ = k
        self.components_ = vt[:k].copy()
        self.explained_variance_ = eigvals[:k].copy()
        self.explained_variance_ratio_ = eigvals[:k] / total
        self.singular_values_ = np.sqrt(eigvals[:k] * (n - 1))
        self.noise_variance_ = float(eigvals[k : min(n, d)].mean()) if k < min(n, d) else 0.0
        return self

    def transform(self, X: Any) -> da.Array:
        """Project X on the components.

        Parameters
        ----------
        X : dask.array.Array of shape (n_samples, n_features)

        Returns
        -------
        dask.array.Array of shape (n_samples, n_components)
            Lazy, chunked like X by rows, in X's float dtype (computed in float64).
        """
        check_is_fitted(self, "components_")
        X = self._validate(X)
        return X.map_blocks(
            _k_transform, self.mean_, self.components_, self._scale(),
            chunks=(X.chunks[0], (self.n_components_,)), dtype=X.dtype,
        )

    def inverse_transform(self, Z: Any) -> da.Array:
        """Map projections back to the feature space.

        Parameters
        ----------
        Z : dask.array.Array of shape (n_samples, n_components)

        Returns
        -------
        dask.array.Array of shape (n_samples, n_features)
            Lazy; exact inverse of the whitening when ``whiten=True``.
        """
        check_is_fitted(self, "components_")
        Z = as_row_chunked(Z)
        if Z.shape[1] != self.n_components_:
            raise ValueError(f"expected {self.n_components_} columns, got {Z.shape[1]}")
        if not np.issubdtype(Z.dtype, np.floating):
            Z = Z.astype(np.float64)
        return Z.map_blocks(
            _k_inverse, self.mean_, self.components_, self._scale(),
            chunks=(Z.chunks[0], (self.components_.shape[1],)), dtype=Z.dtype,
        )

    def _scale(self) -> np.ndarray | None:
        if not self.whiten:
            return None
        # as scikit-learn: standard deviations, floored at machine epsilon
        return np.maximum(np.sqrt(self.explained_variance_), np.finfo(np.float64).eps)

    def _validate(self, X: Any, reset: bool = False) -> da.Array:
        return validate_rows(self, X, reset)
