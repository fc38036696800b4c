"""Clustering on a UMAP manifold of patch-dictionary features, fitted on a sample.

``ManifoldClustering`` chains, on an in-memory sample of images:

1. :class:`~fmnist_dask.models.features.PatchDictionaryFeatures` (learned patch atoms,
   pooled activations),
2. PCA to ``n_pca`` components,
3. UMAP with clustering settings (``min_dist=0``, ``n_components`` around 10), which pulls the
   k-NN graph's dense regions apart,
4. a full-covariance Gaussian mixture on the embedding, the best of ``n_init`` starts by its
   own log-likelihood (an internal criterion: no label is read anywhere).

Every other row gets a cluster by a k-nearest-neighbour vote among the sample in the PCA space
(:class:`~fmnist_dask.models.extend.KNeighborsExtension`), computed per block on the workers;
the features and the PCA projection run per block too. The sample rows keep the labels the
mixture gave them. docs/quality.md records what was measured, including what did not help.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_array, check_random_state

from fmnist_dask.models.extend import KNeighborsExtension, _label_block
from fmnist_dask.models.features import PatchDictionaryFeatures, _encode_block


def _project_block(block: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA projection of one block of features."""
    return (np.asarray(block, dtype=np.float32) - mean) @ components.T


def _predict_block(
    block: np.ndarray,
    feature_params: dict,
    mean: np.ndarray,
    components: np.ndarray,
    index: Any,
    block_info: dict | None = None,
) -> np.ndarray:
    """Clusters of one block of images; features are computed only for rows outside the sample.

    Sample rows are recognised by position (``index.sample_indices``) and get their fitted
    label from ``_label_block``, which never looks at their coordinates: their zero
    placeholder saves the feature map, the costly step, when the sample is most of the data.
    """
    todo = np.ones(block.shape[0], dtype=bool)
    if index.sample_indices is not None:
        start = block_info[0]["array-location"][0][0] if block_info else 0
        positions = start + np.arange(block.shape[0], dtype=np.int64)
        where = np.minimum(np.searchsorted(index.sample_indices, positions),
                           index.sample_indices.size - 1)
        todo = index.sample_indices[where] != positions
    Z = np.zeros((block.shape[0], components.shape[0]), dtype=np.float32)
    if todo.any():
        Z[todo] = _project_block(_encode_block(block[todo], **feature_params), mean, components)
    return _label_block(Z, index, block_info)


class ManifoldClustering(ClusterMixin, BaseEstimator):
    """Patch features -> PCA -> UMAP -> Gaussian mixture on a sample; k-NN vote for the rest.

    Parameters
    ----------
    n_clusters : int, default=10
        Clusters (mixture components).
    n_atoms : int, default=128
        Patch-dictionary atoms (see :class:`PatchDictionaryFeatures`).
    patch_size : int, default=6
        Side of the patches, in pixels.
    pool : int, default=2
        Pooling grid (``pool x pool`` regions).
    n_pca : int, default=50
        Principal components of the features kept for UMAP and for the k-NN vote.
    n_neighbors : int, default=20
        UMAP's neighbourhood size.
    n_components : int, default=10
        Dimension of the UMAP embedding the mixture is fitted in.
    n_init : int, default=3
        Mixture starts; the one with the highest log-likelihood on the sample is kept.
    extension_neighbors : int, default=10
        Sample neighbours voting for each row outside the sample.
    image_shape : tuple of int, default=(28, 28)
        Height and width of the images.
    random_state : int, RandomState or None
        Seed of every random step (patch draw, k-means, PCA solver, UMAP, mixture). With a
        seed UMAP runs single-threaded (its reproducible mode).

    Attributes
    ----------
    features_ : PatchDictionaryFeatures
        Fitted feature map.
    pca_ : sklearn.decomposition.PCA
        PCA of the sample's features.
    embedding_ : numpy.ndarray of shape (n_sample, n_components)
        UMAP coordinates of the sample.
    mixture_ : sklearn.mixture.GaussianMixture
        Mixture fitted on ``embedding_``.
    labels_ : numpy.ndarray of shape (n_sample,)
        Cluster of each sample row, in ``range(n_clusters)``.
    extension_ : KNeighborsExtension
        k-NN vote over the sample in the PCA space.
    n_features_in_ : int
        Pixels per image.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        n_atoms: int = 128,
        patch_size: int = 6,
        pool: int = 2,
        n_pca: int = 50,
        n_neighbors: int = 20,
        n_components: int = 10,
        n_init: int = 3,
        extension_neighbors: int = 10,
        image_shape: tuple[int, int] = (28, 28),
        random_state: Any = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.n_atoms = n_atoms
        self.patch_size = patch_size
        self.pool = pool
        self.n_pca = n_pca
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.n_init = n_init
        self.extension_neighbors = extension_neighbors
        self.image_shape = image_shape
        self.random_state = random_state

    def fit(
        self, X: np.ndarray, y: None = None, *, sample_indices: np.ndarray | None = None
    ) -> ManifoldClustering:
        """Cluster an in-memory sample of images.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_sample, height * width)
            The sample: pixel intensities scaled to [0, 1].
        y : None
            Must be None: the method never sees labels (a value raises ``TypeError``).
        sample_indices : numpy.ndarray of shape (n_sample,), optional
            Positions of the sample rows in the full array later given to :meth:`predict`;
            with them those rows keep exactly ``labels_``.

        Returns
        -------
        self : ManifoldClustering
            Fitted estimator.
        """
        if y is not None:
            raise TypeError("ManifoldClustering is unsupervised: fit takes no labels (y=None)")
        import umap  # imported here: numba compiles it on first import (seconds)

        X = check_array(X, dtype=np.float32)
        rng = check_random_state(self.random_state)
        seeds = rng.randint(2**31 - 1, size=4)
        self.features_ = PatchDictionaryFeatures(
            self.n_atoms, patch_size=self.patch_size, pool=self.pool,
            image_shape=self.image_shape, random_state=seeds[0],
        ).fit(X)
        F = self.features_.transform(X)
        self.pca_ = PCA(self.n_pca, random_state=seeds[1]).fit(F)
        Z = self.pca_.transform(F).astype(np.float32)
        reducer = umap.UMAP(
            n_neighbors=self.n_neighbors, min_dist=0.0, n_components=self.n_components,
            random_state=None if self.random_state is None else int(seeds[2]),
        )
        self.embedding_ = reducer.fit_transform(Z)
        self.mixture_ = GaussianMixture(
            self.n_clusters, covariance_type="full", n_init=self.n_init,
            random_state=seeds[3],
        ).fit(self.embedding_)
        self.labels_ = self.mixture_.predict(self.embedding_)
        self.extension_ = KNeighborsExtension(self.extension_neighbors).fit(
            Z, self.labels_, sample_indices=sample_indices
        )
        self.n_features_in_ = X.shape[1]
        return self

    def fit_predict(
        self, X: np.ndarray, y: None = None, *, sample_indices: np.ndarray | None = None
    ) -> np.ndarray:
        """Fit on the sample and return ``labels_`` (shape (n_sample,))."""
        return self.fit(X, y, sample_indices=sample_indices).labels_

    def transform_pca(self, X: np.ndarray | da.Array) -> np.ndarray | da.Array:
        """Features of ``X`` projected on the fitted PCA, per block for a dask array.

        Parameters
        ----------
        X : numpy.ndarray or dask.array.Array of shape (n_rows, height * width)
            Pixel intensities scaled to [0, 1].

        Returns
        -------
        numpy.ndarray or dask.array.Array of shape (n_rows, n_pca), float32
        """
        if not hasattr(self, "pca_"):
            raise AttributeError("ManifoldClustering is not fitted; call fit first")
        F = self.features_.transform(X)
        mean = self.pca_.mean_.astype(np.float32)
        components = self.pca_.components_.astype(np.float32)
        if not isinstance(F, da.Array):
            return _project_block(F, mean, components)
        return F.map_blocks(
            _project_block, mean, components, dtype=np.float32,
            chunks=(F.chunks[0], (components.shape[0],)),
            meta=np.empty((0, 0), dtype=np.float32),
        )

    def predict(self, X: np.ndarray | da.Array) -> np.ndarray | da.Array:
        """Cluster of every row (sample rows keep ``labels_`` when positions were given).

        Parameters
        ----------
        X : numpy.ndarray or dask.array.Array of shape (n_rows, height * width)
            Pixel intensities scaled to [0, 1]; for a dask array, row chunks must be known.

        Returns
        -------
        numpy.ndarray or dask.array.Array of shape (n_rows,), int64
            Cluster indices in ``range(n_clusters)``; lazy for a dask input.
        """
        if not hasattr(self, "extension_"):
            raise AttributeError("ManifoldClustering is not fitted; call fit first")
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}), got {X.shape}")
        args = (
            self.features_._kernel_params(),
            self.pca_.mean_.astype(np.float32),
            self.pca_.components_.astype(np.float32),
        )
        index = self.extension_._index
        if not isinstance(X, da.Array):
            return _predict_block(np.asarray(X), *args, index)
        if any(np.isnan(c) for c in X.chunks[0]):
            raise ValueError("row chunk sizes are unknown; call X.compute_chunk_sizes() first")
        if X.numblocks[1] != 1:
            X = X.rechunk({1: -1})  # an image needs all its pixels
        # The k-d tree travels once per worker under one key, as in KNeighborsExtension.
        index = dask.delayed(index, name=self.extension_._key, pure=True)
        return da.map_blocks(
            _predict_block, X, *args, index=index, drop_axis=1, dtype=np.int64,
            meta=np.empty((0,), dtype=np.int64),
        )
