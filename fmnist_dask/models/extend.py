"""Carry cluster labels fitted on a sample to every row: a k-nearest-neighbour vote per block.

The fitted index (a kd-tree over the sample, its labels and the sample's row positions) is
small next to the data and travels once to each worker as one graph key; every block of the
full data is then labelled where it lives. Rows that belong to the sample keep exactly the
label the sample model gave them: they are recognised by their position, not by distance, so
duplicated points that the sample model put in different clusters stay as they were.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted

from fmnist_dask._blocks import per_block, rows_in_sample


@dataclass(frozen=True)
class _FittedIndex:
    """What the workers need to label a block (pickled once per worker)."""

    tree: cKDTree
    codes: np.ndarray  # (n_sample,) label codes in [0, n_classes)
    classes: np.ndarray  # (n_classes,) original labels
    sample_indices: np.ndarray | None  # (n_sample,) sorted row positions, or None
    sample_order: np.ndarray | None  # sample rows in the order of sample_indices
    n_neighbors: int


def _vote(neighbour_codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority label of each row of neighbour codes (nearest first); ties go to nearer ones.

    Each neighbour adds 1 plus a rank bonus; the bonuses of all k neighbours sum to 0.5,
    so they only ever break ties between equal counts.
    """
    m, k = neighbour_codes.shape
    bonus = (k - np.arange(k)) / (k * (k + 1.0))
    votes = np.zeros((m, n_classes))
    rows = np.arange(m)
    for rank in range(k):  # a loop over k neighbours, vectorised over the rows
        votes[rows, neighbour_codes[:, rank]] += 1.0 + bonus[rank]
    return np.argmax(votes, axis=1)


#: Queries are grouped into cells of ``_ORDER_BINS`` quantiles along each of the first
#: ``_ORDER_DIMS`` features before they go to the tree.
_ORDER_DIMS, _ORDER_BINS = 3, 8


def _locality_order(X: np.ndarray) -> np.ndarray:
    """A permutation of the rows of ``X`` that puts nearby rows next to each other.

    Rows sorted by their cell in a coarse grid of quantiles of the first features (the
    leading principal components for the job's PCA rows). Consecutive queries of the
    kd-tree then walk the same nodes while they are in cache: 10,000-row blocks of the 16x
    PCA-10 rows against a 70,000-row tree were answered 1.4x faster (docs/benchmarks.md,
    "k-NN extension"); each query's answer is the same in any order.
    """
    keys = []
    for j in reversed(range(min(_ORDER_DIMS, X.shape[1]))):
        edges = np.quantile(X[:, j], np.linspace(0, 1, _ORDER_BINS + 1)[1:-1])
        keys.append(np.searchsorted(edges, X[:, j]))
    return np.lexsort(tuple(keys))


def _label_block(
    block: np.ndarray, model: _FittedIndex, block_info: dict | None = None
) -> np.ndarray:
    """Labels of one block of rows; rows of the sample get their sample label."""
    codes = np.empty(block.shape[0], dtype=np.int64)
    todo = np.ones(block.shape[0], dtype=bool)
    if model.sample_indices is not None:
        in_sample, where = rows_in_sample(model.sample_indices, block.shape[0], block_info)
        codes[in_sample] = model.codes[model.sample_order[where[in_sample]]]
        todo = ~in_sample
    if todo.any():
        k = min(model.n_neighbors, model.codes.size)
        queries = np.asarray(block[todo], np.float64)
        order = _locality_order(queries)
        distance = np.empty((len(queries), k))
        neighbours = np.empty((len(queries), k), dtype=np.intp)
        # scipy drops the neighbour axis for k=1: reshape puts it back
        found_d, found_i = model.tree.query(queries[order], k=k)
        distance[order] = np.reshape(found_d, (-1, k))
        neighbours[order] = np.reshape(found_i, (-1, k))
        voted = _vote(model.codes[neighbours], model.classes.size)
        if model.sample_indices is None:
            # Without positions, a point identical to a sample point takes its label.
            exact = distance[:, 0] == 0.0
            voted[exact] = model.codes[neighbours[exact, 0]]
        codes[todo] = voted
    return model.classes[codes]


class KNeighborsExtension(BaseEstimator):
    """Label every row of a dask array by a k-NN majority vote among labelled sample points.

    Parameters
    ----------
    n_neighbors : int, default=10
        Sample neighbours that vote for each row outside the sample.
    leaf_size : int, default=40
        Leaf size of the kd-tree.

    Attributes
    ----------
    classes_ : numpy.ndarray of shape (n_classes,)
        Distinct sample labels, sorted.
    index_ : scipy.spatial.cKDTree
        (scipy's tree: the same neighbours as scikit-learn's KDTree, its queries 1.6-1.8x
        faster here on 10 PCA features of Fashion-MNIST, docs/benchmarks.md)
        Tree over the sample points (features as given to ``fit``, e.g. PCA components).
    sample_indices_ : numpy.ndarray of shape (n_sample,) or None
        Sorted positions of the sample rows in the full data, when given to ``fit``.
    n_features_in_ : int
        Features of the sample.
    """

    def __init__(self, n_neighbors: int = 10, *, leaf_size: int = 40) -> None:
        self.n_neighbors = n_neighbors
        self.leaf_size = leaf_size

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        sample_indices: np.ndarray | None = None,
    ) -> KNeighborsExtension:
        """Index the labelled sample.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_sample, n_features)
            Sample points in the space of the vote (e.g. the PCA projection).
        y : numpy.ndarray of shape (n_sample,)
            Labels the sample model gave them (cluster ids).
        sample_indices : numpy.ndarray of shape (n_sample,), optional
            Positions of the sample rows in the full array later passed to ``predict`` (as
            returned by :func:`fmnist_dask.sampling.uniform_row_sample`), unique. With them,
            the sample rows get exactly ``y``; without them, a row at distance 0 from a
            sample point takes that point's label.

        Returns
        -------
        self : KNeighborsExtension
            Fitted estimator.
        """
        X = check_array(X, dtype=np.float64)
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        self.index_ = cKDTree(X, leafsize=self.leaf_size)
        order = None
        if sample_indices is not None:
            sample_indices = np.asarray(sample_indices, dtype=np.int64)
            if sample_indices.shape != y.shape:
                raise ValueError("sample_indices must have one position per sample row")
            order = np.argsort(sample_indices, kind="stable")
            sample_indices = sample_indices[order]
            if np.any(np.diff(sample_indices) == 0):
                raise ValueError("sample_indices must be unique")
        self.sample_indices_ = sample_indices
        self._index = _FittedIndex(
            self.index_, codes.astype(np.int64), self.classes_, sample_indices, order,
            int(self.n_neighbors),
        )
        # A fixed key name: the index is tokenized once, not hashed on every predict.
        self._key = f"knn-extension-index-{uuid.uuid4().hex}"
        return self

    def relabelled(self, y: np.ndarray) -> KNeighborsExtension:
        """The same sample points (and positions) with other labels, as a new fitted vote.

        Parameters
        ----------
        y : numpy.ndarray of shape (n_sample,)
            New labels, in the order of the rows given to :meth:`fit`.
        """
        positions = None
        if self.sample_indices_ is not None:  # back to the order fit was given
            positions = np.empty_like(self.sample_indices_)
            positions[self._index.sample_order] = self.sample_indices_
        return clone(self).fit(np.asarray(self.index_.data), y, sample_indices=positions)

    def predict(self, X: da.Array | np.ndarray) -> da.Array | np.ndarray:
        """Label every row: sample rows by their sample label, the others by the k-NN vote.

        Parameters
        ----------
        X : dask.array.Array or numpy.ndarray of shape (n_rows, n_features)
            The full data in the same space as the sample, rows in the order that
            ``sample_indices`` refer to. Row chunks must be known for a dask array.

        Returns
        -------
        dask.array.Array or numpy.ndarray of shape (n_rows,)
            Labels (values of ``classes_``); lazy for a dask input, chunked like the rows.
        """
        check_is_fitted(self, "index_")
        if not isinstance(X, da.Array):
            X = check_array(X, dtype=np.float64)
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"X must have {self.n_features_in_} columns, got {X.shape}")
            return _label_block(X, self._index)
        # The vote needs whole rows and their offsets; the index travels once per worker.
        return per_block(_label_block, X, self._index, n_features=self.n_features_in_,
                         dtype=self.classes_.dtype, key=self._key)

    def predict_block(self, block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        """Labels of one in-memory block of rows, for a caller's own per-block kernel.

        Parameters
        ----------
        block : numpy.ndarray of shape (n_block_rows, n_features)
            Rows in the space of the vote. Sample rows may hold any values: they are
            recognised by position and get their sample label.
        block_info : dict, optional
            dask's ``block_info`` of the block, which gives its first row's position
            (None: the block starts at row 0).

        Returns
        -------
        numpy.ndarray of shape (n_block_rows,)
            Labels (values of ``classes_``).
        """
        check_is_fitted(self, "index_")
        return _label_block(block, self._index, block_info)
