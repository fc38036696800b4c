"""Image features learned without labels: a dictionary of whitened patches (Coates & Ng, 2011).

``PatchDictionaryFeatures`` learns, on a sample of images, ``n_atoms`` k-means centroids of
small normalised and whitened patches; every image is then described by how strongly each
atom is present in each of ``pool x pool`` regions ("triangle" activation, sum-pooled, square
root). On Fashion-MNIST these features give clearly better clusters than raw pixels or HOG
(docs/quality.md): they are shift-tolerant within a region and ignore the overall brightness
of a garment, two nuisances that pixel distances are dominated by.

The fitted state is a few kilobytes (mean, whitening matrix, atoms), so ``transform`` runs per
block on the workers with ``map_blocks`` and only the features of a block come out of it.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import MiniBatchKMeans
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted

from fmnist_dask._blocks import per_block

#: Images per internal step of the per-block transform. Its (images x patches x atoms)
#: temporaries take ~270 KB per image for 128 atoms on 6x6 patches of 28x28 images: at 8
#: images they stay in the core's cache between the steps that make them, about twice as
#: fast as 256 images a step (docs/benchmarks.md, "Patch features"). Each image is computed
#: on its own, so the output does not depend on it (tested).
_SUB_ROWS = 8


def _normalise_patches(patches: np.ndarray, contrast_eps: float) -> np.ndarray:
    """Remove each patch's mean and divide by its (regularised) standard deviation."""
    patches = patches - patches.mean(axis=-1, keepdims=True)
    return patches / np.sqrt(patches.var(axis=-1, keepdims=True) + contrast_eps)


def _all_patches(images: np.ndarray, size: int) -> tuple[np.ndarray, int, int]:
    """All ``size x size`` patches (stride 1) of images (n, h, w) -> (n, ph * pw, size**2)."""
    windows = sliding_window_view(images, (size, size), axis=(1, 2))
    n, ph, pw = windows.shape[:3]
    return windows.reshape(n, ph * pw, size * size), ph, pw


def _pool_edges(length: int, pool: int) -> list[int]:
    """Boundaries of ``pool`` near-equal regions along an axis of ``length`` positions."""
    return [int(round(i * length / pool)) for i in range(pool + 1)]


def _encode_block(
    block: np.ndarray,
    *,
    image_shape: tuple[int, int],
    patch_size: int,
    pool: int,
    contrast_eps: float,
    mean: np.ndarray,
    whitening: np.ndarray,
    atoms: np.ndarray,
) -> np.ndarray:
    """Pooled triangle activations of one block of flattened images -> (rows, pool^2 * k)."""
    n_atoms = atoms.shape[0]
    atom_sqnorm = np.einsum("ij,ij->i", atoms, atoms)
    out = np.empty((block.shape[0], pool * pool * n_atoms), dtype=np.float32)
    for start in range(0, block.shape[0], _SUB_ROWS):
        images = np.asarray(block[start : start + _SUB_ROWS], dtype=np.float32)
        images = images.reshape(-1, *image_shape)
        patches, ph, pw = _all_patches(images, patch_size)
        z = (_normalise_patches(patches, contrast_eps) - mean) @ whitening
        # Distances to the atoms by the expansion |z|^2 - 2 z.c + |c|^2 (float32 is ample).
        dist = np.einsum("npd,npd->np", z, z)[..., None] - 2.0 * (z @ atoms.T) + atom_sqnorm
        np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
        # "Triangle" coding: an atom fires where it is closer than the average atom.
        act = np.maximum(dist.mean(axis=-1, keepdims=True) - dist, 0.0)
        act = act.reshape(len(images), ph, pw, n_atoms)
        rows, cols = _pool_edges(ph, pool), _pool_edges(pw, pool)
        pooled = [
            act[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].sum(axis=(1, 2))
            for i in range(pool)
            for j in range(pool)
        ]
        # The square root evens out the variance of pooled counts (large where busy).
        out[start : start + len(images)] = np.sqrt(np.concatenate(pooled, axis=1))
    return out


class PatchDictionaryFeatures(TransformerMixin, BaseEstimator):
    """Single-layer patch-dictionary features of images (Coates & Ng, 2011).

    Parameters
    ----------
    n_atoms : int, default=128
        Patch centroids (k of the patch k-means); features per region.
    patch_size : int, default=6
        Side of the square patches, in pixels.
    pool : int, default=2
        The activation maps are summed over a ``pool x pool`` grid of regions.
    n_patches : int, default=100_000
        Random patches the dictionary is learned from.
    max_images : int, default=5_000
        The patches are drawn from at most this many images of ``X``.
    contrast_eps : float, default=0.01
        Added to each patch's variance before dividing by its standard deviation (units of
        squared intensity on the [0, 1] scale); keeps flat background patches flat.
    whiten_eps : float, default=0.1
        Added to the eigenvalues of the patch covariance in the ZCA whitening.
    image_shape : tuple of int, default=(28, 28)
        Height and width of the images; rows of ``X`` are flattened row-major.
    random_state : int, RandomState or None
        Seed of the patch draw and of the patch k-means.

    Attributes
    ----------
    mean_ : numpy.ndarray of shape (patch_size**2,)
        Mean normalised patch.
    whitening_ : numpy.ndarray of shape (patch_size**2, patch_size**2)
        ZCA whitening matrix of the normalised patches.
    atoms_ : numpy.ndarray of shape (n_atoms, patch_size**2)
        Patch centroids in the whitened space.
    n_features_in_ : int
        Pixels per image.
    n_features_out_ : int
        ``pool**2 * n_atoms``.
    """

    def __init__(
        self,
        n_atoms: int = 128,
        *,
        patch_size: int = 6,
        pool: int = 2,
        n_patches: int = 100_000,
        max_images: int = 5_000,
        contrast_eps: float = 0.01,
        whiten_eps: float = 0.1,
        image_shape: tuple[int, int] = (28, 28),
        random_state: Any = None,
    ) -> None:
        self.n_atoms = n_atoms
        self.patch_size = patch_size
        self.pool = pool
        self.n_patches = n_patches
        self.max_images = max_images
        self.contrast_eps = contrast_eps
        self.whiten_eps = whiten_eps
        self.image_shape = image_shape
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: None = None) -> PatchDictionaryFeatures:
        """Learn the whitening and the patch dictionary from a sample of images.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_images, height * width)
            Pixel intensities scaled to [0, 1], one flattened image per row.
        y : None
            Ignored; there for the scikit-learn API.

        Returns
        -------
        self : PatchDictionaryFeatures
            Fitted transformer.
        """
        X = check_array(X, dtype=np.float32)
        height, width = self.image_shape
        if X.shape[1] != height * width:
            raise ValueError(f"X must have {height * width} columns, got {X.shape[1]}")
        rng = check_random_state(self.random_state)
        images = X[rng.choice(len(X), min(len(X), self.max_images), replace=False)]
        patches, _, _ = _all_patches(images.reshape(-1, height, width), self.patch_size)
        patches = patches.reshape(-1, self.patch_size**2)
        take = rng.choice(len(patches), min(len(patches), self.n_patches), replace=False)
        patches = _normalise_patches(patches[take], self.contrast_eps).astype(np.float64)
        mean = patches.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov(patches - mean, rowvar=False))
        whitening = (eigvec / np.sqrt(eigval + self.whiten_eps)) @ eigvec.T
        kmeans = MiniBatchKMeans(
            self.n_atoms, batch_size=4096, n_init=3, random_state=rng.randint(2**31 - 1)
        ).fit((patches - mean) @ whitening)
        self.mean_ = mean.astype(np.float32)
        self.whitening_ = whitening.astype(np.float32)
        self.atoms_ = kmeans.cluster_centers_.astype(np.float32)
        self.n_features_in_ = X.shape[1]
        self.n_features_out_ = self.pool**2 * self.n_atoms
        return self

    def _kernel_params(self) -> dict[str, Any]:
        return dict(
            image_shape=tuple(self.image_shape), patch_size=self.patch_size, pool=self.pool,
            contrast_eps=self.contrast_eps, mean=self.mean_, whitening=self.whitening_,
            atoms=self.atoms_,
        )

    def transform(self, X: np.ndarray | da.Array) -> np.ndarray | da.Array:
        """Features of every image, per block for a dask array.

        Parameters
        ----------
        X : numpy.ndarray or dask.array.Array of shape (n_images, height * width)
            Pixel intensities scaled to [0, 1].

        Returns
        -------
        numpy.ndarray or dask.array.Array of shape (n_images, pool**2 * n_atoms), float32
            Square roots of the pooled activations (lazy and row-chunked like ``X`` for a
            dask input).
        """
        check_is_fitted(self, "atoms_")
        if not isinstance(X, da.Array):
            if X.ndim != 2 or X.shape[1] != self.n_features_in_:
                raise ValueError(f"X must have shape (n, {self.n_features_in_}), got {X.shape}")
            return _encode_block(np.asarray(X), **self._kernel_params())
        return per_block(_transform_block, X, self, n_features=self.n_features_in_,
                         dtype=np.float32, n_columns=self.n_features_out_)


def _transform_block(block: np.ndarray, model: PatchDictionaryFeatures) -> np.ndarray:
    return _encode_block(block, **model._kernel_params())
