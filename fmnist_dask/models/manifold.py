"""Clustering on a UMAP manifold of patch-dictionary features, fitted on a sample.

``ManifoldClustering`` chains, on an in-memory sample of images:

1. :class:`~fmnist_dask.models.features.PatchDictionaryFeatures` (learned patch atoms,
   pooled activations),
2. a linear projection to ``n_pca`` components: plain PCA, or (``max_shift`` or
   ``max_rotation`` > 0) the directions in which the features of two randomly shifted and
   rotated copies of each image agree most (canonical correlation between the two views,
   after a PCA to ``n_view_pca``): a label-free way to keep what the garment is and drop
   where and how askew it sits,
3. UMAP with clustering settings (``min_dist=0``, ``n_components`` around 10), which pulls the
   k-NN graph's dense regions apart,
4. a full-covariance Gaussian mixture on the embedding, the best of ``n_init`` starts by its
   own log-likelihood, or (``mixture_selection="balanced"``) by its log-likelihood plus a
   symmetric prior on the cluster sizes (:func:`balanced_mixture_score`): internal
   criteria, no label is read anywhere.

Every other row gets a cluster by a k-nearest-neighbour vote among the sample in the projected space
(:class:`~fmnist_dask.models.extend.KNeighborsExtension`), computed per block on the workers;
the features and the projection run per block too. The sample rows keep the labels the
mixture gave them.

``ManifoldEnsemble`` fits several of these with different seeds and keeps the partition
they agree on. docs/quality.md records what was measured, including what did not help.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, clone
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted

from fmnist_dask._blocks import per_block, rows_in_sample
from fmnist_dask.models.extend import KNeighborsExtension
from fmnist_dask.models.features import PatchDictionaryFeatures
from fmnist_dask.warp import rotate

_UMAP_MODULES = ("umap.umap_", "umap.layouts", "umap.spectral", "umap.distances", "umap.sparse",
                 "umap.utils", "pynndescent.pynndescent_", "pynndescent.distances",
                 "pynndescent.rp_trees", "pynndescent.sparse", "pynndescent.utils",
                 "pynndescent.graph_utils")


@functools.cache
def _import_umap() -> Any:
    """Import UMAP with its numba kernels cached on disk, not compiled again in every process.

    UMAP declares none of its kernels, and pynndescent only some, with ``cache=True``, so each
    new worker process spent seconds compiling them before its first fit. numba keys a cached
    kernel on its source file (path and time stamp), its argument types and the CPU, and
    recompiles when any of these change, so caching these pure numeric kernels gives the same
    code; kernels that numba cannot cache (closures over dynamic globals) warn once and are
    compiled as before. A read-only install has no cache location: then nothing changes.
    """
    import importlib

    import umap
    from numba.core.dispatcher import Dispatcher

    for name in _UMAP_MODULES:
        for kernel in vars(importlib.import_module(name)).values():
            if isinstance(kernel, Dispatcher):
                try:
                    kernel.enable_caching()
                except RuntimeError:  # no writable cache location for this file
                    return umap
    return umap


def _project_block(block: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Fitted projection of one block of features."""
    return (np.asarray(block, dtype=np.float32) - mean) @ components.T


def _predict_block(block: np.ndarray, model: Any, block_info: dict | None = None) -> np.ndarray:
    """Clusters of one block of images; features are computed only for rows outside the sample.

    Sample rows are recognised by position and get their fitted label from the k-NN vote,
    which never looks at their coordinates: their zero placeholder saves the feature map,
    the costly step, when the sample is most of the data.
    """
    extension = model.extension_
    todo = np.ones(block.shape[0], dtype=bool)
    if extension.sample_indices_ is not None:
        in_sample, _ = rows_in_sample(extension.sample_indices_, block.shape[0], block_info)
        todo = ~in_sample
    Z = np.zeros((block.shape[0], model.projection_components_.shape[0]), dtype=np.float32)
    if todo.any():
        Z[todo] = _project_block(model.features_.transform(block[todo]),
                                 model.projection_mean_, model.projection_components_)
    return extension.predict_block(Z, block_info)


def shifted_views(images: np.ndarray, max_shift: int, image_shape: tuple[int, int],
                  rng: np.random.RandomState) -> np.ndarray:
    """Each image moved by a random whole-pixel offset in ``[-max_shift, max_shift]`` along
    both axes, uncovered pixels set to 0. Shape (n, height * width), like ``images``."""
    h, w = image_shape
    n = images.shape[0]
    padded = np.pad(images.reshape(n, h, w), ((0, 0), (max_shift,) * 2, (max_shift,) * 2))
    dy, dx = rng.randint(-max_shift, max_shift + 1, size=(2, n))
    out = np.empty((n, h, w), dtype=images.dtype)
    for oy in range(-max_shift, max_shift + 1):  # one slice per offset, not per row
        for ox in range(-max_shift, max_shift + 1):
            rows = np.flatnonzero((dy == oy) & (dx == ox))
            out[rows] = padded[rows, max_shift + oy: max_shift + oy + h,
                               max_shift + ox: max_shift + ox + w]
    return out.reshape(n, h * w)


def random_views(images: np.ndarray, max_shift: int, max_rotation: float,
                 image_shape: tuple[int, int], rng: np.random.RandomState) -> np.ndarray:
    """Each image shifted by whole pixels (:func:`shifted_views`), then rotated about its
    centre by a uniform random angle in ``[-max_rotation, max_rotation]`` degrees (bilinear,
    zero outside). Shape (n, height * width), float32."""
    out = shifted_views(images, max_shift, image_shape, rng)
    if max_rotation > 0:
        out = rotate(out, rng.uniform(-max_rotation, max_rotation, len(out)), image_shape)
    return out.astype(np.float32, copy=False)


def view_invariant_projection(
    F1: np.ndarray, F2: np.ndarray, n_components: int, n_view_pca: int, random_state: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine map of features onto the directions two views of the same images share.

    ``F1[i]`` and ``F2[i]`` are features of two random variants of image i. After a PCA
    of both views (``n_view_pca`` components, for a well-conditioned covariance), the
    canonical directions of the symmetrised cross-covariance are kept: the
    ``n_components`` along which a row's two views correlate most.

    Returns
    -------
    mean : ndarray of shape (n_features,)
    components : ndarray of shape (n_components, n_features)
        Project with ``(F - mean) @ components.T``.
    correlations : ndarray of shape (n_components,)
        Canonical correlation of each kept direction, in decreasing order.
    """
    pca = PCA(n_view_pca, random_state=random_state).fit(np.vstack([F1, F2]))
    A, B = pca.transform(F1), pca.transform(F2)
    centre = (A.mean(axis=0) + B.mean(axis=0)) / 2
    A -= centre
    B -= centre
    n = len(A)
    cov = (A.T @ A + B.T @ B) / (2 * n)
    cross = (A.T @ B + B.T @ A) / (2 * n)
    ridge = 1e-6 * np.trace(cov) / len(cov)  # keeps the smallest variances invertible
    w, V = np.linalg.eigh(cov + ridge * np.eye(len(cov)))
    whiten = V / np.sqrt(w)
    r, U = np.linalg.eigh(whiten.T @ cross @ whiten)
    top = np.argsort(r)[::-1][:n_components]
    P = whiten @ U[:, top]
    # PCA components are orthonormal, so the PCA, the centring and P fold into one map.
    return pca.mean_ + centre @ pca.components_, P.T @ pca.components_, r[top]


class _SampleImageClusterer(ClusterMixin):
    """``fit_predict`` and ``predict`` of a model fitted on a sample of images that labels
    other rows through ``features_``, ``projection_mean_``, ``projection_components_`` and
    the k-NN vote ``extension_``."""

    def fit_predict(
        self, X: np.ndarray, y: None = None, *, sample_indices: np.ndarray | None = None
    ) -> np.ndarray:
        """Fit on the sample and return ``labels_`` (shape (n_sample,))."""
        return self.fit(X, y, sample_indices=sample_indices).labels_

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
        check_is_fitted(self, "extension_")
        return _predict_images(X, self)


class ManifoldClustering(_SampleImageClusterer, BaseEstimator):
    """Patch features -> shift-invariant projection -> UMAP -> Gaussian mixture on a sample;
    k-NN vote for the rest.

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
    n_pca : int, default=30
        Components of the features kept for UMAP and for the k-NN vote (principal
        components, or canonical directions when the views are on).
    max_shift : int, default=2
        With ``max_shift > 0`` (or ``max_rotation > 0``) the projection keeps the
        directions shared by two copies of every sample image shifted at random by up to
        ``max_shift`` pixels in each axis and rotated (:func:`random_views`,
        :func:`view_invariant_projection`), instead of the principal components.
    max_rotation : float, default=0.0
        Largest rotation of those copies, in degrees either way. The job file pairs it with
        ``mixture_selection="balanced"``; docs/quality.md has what each choice measured.
    n_view_pca : int, default=256
        Principal components of both views' features before the canonical directions.
    n_neighbors : int, default=20
        UMAP's neighbourhood size.
    n_components : int, default=10
        Dimension of the UMAP embedding the mixture is fitted in.
    n_init : int, default=3
        Mixture starts (k-means initialisations); one is kept, by ``mixture_selection``.
    mixture_selection : {"likelihood", "balanced"}, default="likelihood"
        How the start is chosen: the highest log-likelihood on the sample, or the highest
        :func:`balanced_mixture_score` (log-likelihood plus a prior that favours clusters
        of comparable size). Use "balanced" only where the groups sought are known to be of
        similar size, as Fashion-MNIST's classes are (docs/quality.md).
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
    projection_mean_ : numpy.ndarray of shape (n_features,), float32
    projection_components_ : numpy.ndarray of shape (n_pca, n_features), float32
        The fitted projection of the features: ``(F - mean) @ components.T``.
    view_correlations_ : numpy.ndarray of shape (n_pca,)
        Canonical correlations of the kept directions (only when the views are on).
    embedding_ : numpy.ndarray of shape (n_sample, n_components)
        UMAP coordinates of the sample.
    mixture_ : sklearn.mixture.GaussianMixture
        Mixture fitted on ``embedding_`` (the start kept).
    start_scores_ : numpy.ndarray of shape (n_init,)
        :func:`balanced_mixture_score` of every start (only with
        ``mixture_selection="balanced"``).
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
        n_pca: int = 30,
        max_shift: int = 2,
        max_rotation: float = 0.0,
        n_view_pca: int = 256,
        n_neighbors: int = 20,
        n_components: int = 10,
        n_init: int = 3,
        mixture_selection: str = "likelihood",
        extension_neighbors: int = 10,
        image_shape: tuple[int, int] = (28, 28),
        random_state: Any = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.n_atoms = n_atoms
        self.patch_size = patch_size
        self.pool = pool
        self.n_pca = n_pca
        self.max_shift = max_shift
        self.max_rotation = max_rotation
        self.n_view_pca = n_view_pca
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.n_init = n_init
        self.mixture_selection = mixture_selection
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
        if self.mixture_selection not in ("likelihood", "balanced"):
            raise ValueError("mixture_selection must be 'likelihood' or 'balanced', "
                             f"got {self.mixture_selection!r}")
        umap = _import_umap()  # imported here: importing it compiles numba code (seconds)

        X = check_array(X, dtype=np.float32)
        rng = check_random_state(self.random_state)
        seeds = rng.randint(2**31 - 1, size=4)
        self.features_ = PatchDictionaryFeatures(
            self.n_atoms, patch_size=self.patch_size, pool=self.pool,
            image_shape=self.image_shape, random_state=seeds[0],
        ).fit(X)
        F = self.features_.transform(X)
        if self.max_shift > 0 or self.max_rotation > 0:
            view_rng = check_random_state(seeds[1])
            F1, F2 = (self.features_.transform(random_views(
                X, self.max_shift, self.max_rotation, self.image_shape, view_rng))
                for _ in range(2))
            mean, components, self.view_correlations_ = view_invariant_projection(
                F1, F2, self.n_pca, min(self.n_view_pca, *F.shape), seeds[1])
        else:
            pca = PCA(self.n_pca, random_state=seeds[1]).fit(F)
            mean, components = pca.mean_, pca.components_
        self.projection_mean_ = mean.astype(np.float32)
        self.projection_components_ = components.astype(np.float32)
        Z = _project_block(F, self.projection_mean_, self.projection_components_)
        reducer = umap.UMAP(
            n_neighbors=self.n_neighbors, min_dist=0.0, n_components=self.n_components,
            random_state=None if self.random_state is None else int(seeds[2]),
            # The same approximate neighbour search (NN-descent) at every sample size: below
            # 4,096 rows UMAP would otherwise compute all pairwise distances by calling its
            # metric from Python once per pair, most of the fit's time on small samples.
            force_approximation_algorithm=True,
        )
        with warnings.catch_warnings():
            # Seeded UMAP is single-threaded by design (its reproducible mode), and says so.
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            warnings.filterwarnings("ignore", message="Cannot cache compiled function")
            self.embedding_ = reducer.fit_transform(Z)
        self.mixture_ = self._fit_mixture(self.embedding_, seeds[3])
        self.labels_ = self.mixture_.predict(self.embedding_)
        self.extension_ = KNeighborsExtension(self.extension_neighbors).fit(
            Z, self.labels_, sample_indices=sample_indices
        )
        self.n_features_in_ = X.shape[1]
        return self

    def _fit_mixture(self, embedding: np.ndarray, seed: int) -> GaussianMixture:
        if self.mixture_selection == "likelihood":
            # sklearn's own n_init loop keeps the start with the highest likelihood bound.
            return GaussianMixture(self.n_clusters, covariance_type="full",
                                   n_init=self.n_init, random_state=seed).fit(embedding)
        starts = [GaussianMixture(self.n_clusters, covariance_type="full",
                                  random_state=start_seed).fit(embedding)
                  for start_seed in check_random_state(seed).randint(2**31 - 1,
                                                                     size=self.n_init)]
        self.start_scores_ = np.array([balanced_mixture_score(m, embedding) for m in starts])
        return starts[int(np.argmax(self.start_scores_))]


def balanced_mixture_score(mixture: GaussianMixture, X: np.ndarray) -> float:
    """Mean log-likelihood per row plus the sum of the log cluster shares.

    ``mixture.score(X) + sum_k log(n_k / n)``, with ``n_k`` the rows of ``X`` the mixture
    assigns to component ``k``: the log posterior, per row, under a symmetric Dirichlet prior
    on the cluster shares with concentration ``n + 1``. The prior term is largest
    (``-K log K``) for equal shares and falls fast as a cluster shrinks, so among starts of
    similar likelihood it prefers the one with clusters of comparable size. An empty
    cluster counts as holding half a row.

    Parameters
    ----------
    mixture : sklearn.mixture.GaussianMixture
        Fitted mixture with ``K`` components.
    X : numpy.ndarray of shape (n, n_features)
        The rows it was fitted on.

    Returns
    -------
    float
        Nats per row.
    """
    counts = np.bincount(mixture.predict(X), minlength=mixture.n_components)
    shares = np.maximum(counts, 0.5) / len(X)
    return float(mixture.score(X) + np.log(shares).sum())


def _predict_images(X: np.ndarray | da.Array, model: Any) -> np.ndarray | da.Array:
    if not isinstance(X, da.Array):
        if X.ndim != 2 or X.shape[1] != model.n_features_in_:
            raise ValueError(f"X must have shape (n, {model.n_features_in_}), got {X.shape}")
        return _predict_block(np.asarray(X), model)
    # The fitted model (features, projection, k-d tree) travels once per worker.
    return per_block(_predict_block, X, model, n_features=model.n_features_in_, dtype=np.int64)


def consensus_labels(
    member_labels: np.ndarray, n_clusters: int, n_init: int, random_state: Any
) -> np.ndarray:
    """The partition the members' labels agree on most.

    Each row is described by its one-hot cluster in every member (``n_runs * k`` columns,
    ``k`` the members' cluster count); the squared distance between two rows is twice the
    number of members that put them apart. k-means on these vectors therefore minimises
    the disagreement inside clusters (the co-association criterion) without forming the
    ``n x n`` co-association matrix.

    Parameters
    ----------
    member_labels : numpy.ndarray of shape (n_runs, n_rows), int
        Each member's cluster of each row, in ``range(k)``.

    Returns
    -------
    numpy.ndarray of shape (n_rows,), int64
        Consensus cluster of each row, in ``range(n_clusters)``.
    """
    from sklearn.cluster import KMeans

    n_runs, n_rows = member_labels.shape
    k = int(member_labels.max()) + 1
    onehot = np.zeros((n_rows, n_runs * k), dtype=np.float32)
    for run, labels in enumerate(member_labels):  # a loop over members, not rows
        onehot[np.arange(n_rows), run * k + labels] = 1.0
    model = KMeans(n_clusters, n_init=n_init, random_state=random_state).fit(onehot)
    return model.labels_.astype(np.int64)


def fit_member(estimator: ManifoldClustering, X: np.ndarray, seed: int,
               sample_indices: np.ndarray | None = None) -> ManifoldClustering:
    """A fresh copy of ``estimator`` with ``random_state=seed``, fitted on ``X``."""
    return clone(estimator).set_params(random_state=int(seed)).fit(
        X, sample_indices=sample_indices)


class ManifoldEnsemble(_SampleImageClusterer, BaseEstimator):
    """Consensus of several :class:`ManifoldClustering` fits that differ only in their seed.

    One fit's clusters depend on its random patch dictionary, views and mixture start; the
    partition the members agree on (:func:`consensus_labels`) scores better than their mean
    (docs/quality.md, "All 70,000 images"). No label is read: members are combined by their
    agreement only.

    Rows outside the sample are labelled by the k-NN vote of the *reference* member (the
    one agreeing most with the others, by mean NMI), its sample points now carrying the
    consensus labels, so prediction costs one feature map, as for a single model.

    Parameters
    ----------
    estimator : ManifoldClustering, optional
        The member's settings (its ``random_state`` is replaced per member). Default:
        ``ManifoldClustering()``.
    n_runs : int, default=4
        Members. With 1 the ensemble is that one fit.
    n_init : int, default=10
        k-means starts of the consensus; the lowest disagreement wins.
    random_state : int, RandomState or None
        Seeds the members' seeds and the consensus.

    Attributes
    ----------
    member_labels_ : numpy.ndarray of shape (n_runs, n_sample), int64
        Each member's clusters of the sample.
    agreement_ : numpy.ndarray of shape (n_runs, n_runs)
        NMI between every two members' clusters (1 on the diagonal).
    stability_ : float
        Mean NMI between distinct members: an internal score of how reproducible the
        clusters are (1.0 with one member).
    reference_ : int
        Member whose features, projection and sample points carry the k-NN vote.
    labels_ : numpy.ndarray of shape (n_sample,), int64
        Consensus cluster of each sample row.
    features_, projection_mean_, projection_components_ :
        The reference member's feature map and projection.
    extension_ : KNeighborsExtension
        k-NN vote over the reference member's projected sample, with the consensus labels.
    n_features_in_ : int
        Pixels per image.
    """

    def __init__(self, estimator: ManifoldClustering | None = None, *, n_runs: int = 4,
                 n_init: int = 10, random_state: Any = None) -> None:
        self.estimator = estimator
        self.n_runs = n_runs
        self.n_init = n_init
        self.random_state = random_state

    def member_seeds(self) -> np.ndarray:
        """The members' seeds, shape (n_runs,): fixed by ``random_state``."""
        if self.n_runs < 1:
            raise ValueError(f"n_runs must be >= 1, got {self.n_runs}")
        return check_random_state(self.random_state).randint(2**31 - 1, size=self.n_runs)

    def member_template(self) -> ManifoldClustering:
        """The unfitted member (``estimator``, or the default ``ManifoldClustering()``)."""
        return ManifoldClustering() if self.estimator is None else self.estimator

    def fit(
        self, X: np.ndarray, y: None = None, *, sample_indices: np.ndarray | None = None
    ) -> ManifoldEnsemble:
        """Fit the members one after another in this process, then combine them.

        :func:`fit_on_workers` fits the members in parallel as dask tasks instead.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_sample, height * width)
            The sample: pixel intensities scaled to [0, 1].
        y : None
            Must be None (a value raises ``TypeError``): the method never sees labels.
        sample_indices : numpy.ndarray of shape (n_sample,), optional
            Positions of the sample rows in the full array later given to :meth:`predict`.
        """
        if y is not None:
            raise TypeError("ManifoldEnsemble is unsupervised: fit takes no labels (y=None)")
        template = self.member_template()
        members = [fit_member(template, X, seed, sample_indices)
                   for seed in self.member_seeds()]
        return self.fit_from_members(members)

    def fit_from_members(self, members: list[ManifoldClustering]) -> ManifoldEnsemble:
        """Combine members fitted on the same sample (see :meth:`member_seeds`).

        Returns
        -------
        self : ManifoldEnsemble
        """
        from sklearn.metrics import normalized_mutual_info_score

        labels = np.stack([m.labels_ for m in members]).astype(np.int64)
        n = len(members)
        agreement = np.ones((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                agreement[i, j] = agreement[j, i] = normalized_mutual_info_score(
                    labels[i], labels[j])
        self.member_labels_ = labels
        self.agreement_ = agreement
        mean_agreement = (agreement.sum(axis=1) - 1) / max(n - 1, 1)
        self.stability_ = float(mean_agreement.mean()) if n > 1 else 1.0
        self.reference_ = int(np.argmax(mean_agreement))
        reference = members[self.reference_]
        if n == 1:
            self.labels_ = labels[0]
        else:
            seed = check_random_state(self.random_state).randint(2**31 - 1, size=n + 1)[-1]
            self.labels_ = consensus_labels(
                labels, reference.n_clusters, self.n_init, int(seed))
        self.features_ = reference.features_
        self.projection_mean_ = reference.projection_mean_
        self.projection_components_ = reference.projection_components_
        self.extension_ = reference.extension_.relabelled(self.labels_)
        self.n_features_in_ = reference.n_features_in_
        return self


def _combine(ensemble: ManifoldEnsemble, members: list[ManifoldClustering]) -> ManifoldEnsemble:
    return ensemble.fit_from_members(members)


def fit_on_workers(ensemble: ManifoldEnsemble, X: Any,
                   sample_indices: np.ndarray | None = None) -> ManifoldEnsemble:
    """Fit the members as parallel dask tasks, combine them in one more; return the result.

    Under a distributed client the members run on its workers (one per worker thread at a
    time) and only the combined model (the reference member's feature map, projection and
    k-NN index) comes back; the members stay where they were fitted.

    Parameters
    ----------
    ensemble : ManifoldEnsemble
        Unfitted; a fitted copy is returned.
    X : numpy.ndarray, dask.delayed.Delayed or distributed.Future
        The sample images, shape (n_sample, height * width), in [0, 1]. Pass a delayed
        block or a scattered future for large samples, so the graph stays small.
    sample_indices : numpy.ndarray of shape (n_sample,), optional
        Positions of the sample rows in the full array later given to ``predict``.

    Returns
    -------
    ManifoldEnsemble
        A fitted copy of ``ensemble``.
    """
    template = ensemble.member_template()
    members = [dask.delayed(fit_member, pure=False)(template, X, seed, sample_indices)
               for seed in ensemble.member_seeds()]
    return dask.delayed(_combine, pure=False)(ensemble, members).compute()


def compile_umap_kernels() -> None:
    """Fit a tiny seeded model once so UMAP's numba kernels are compiled into the disk cache.

    ``make install`` calls it, so a job's workers load the kernels on their first manifold fit
    instead of compiling them (docs/benchmarks.md, "UMAP's compiled kernels"); the argument
    types match a real fit's, which is what the cache keys on.
    """
    images = np.random.default_rng(0).random((300, 28 * 28), dtype=np.float32)
    ManifoldClustering(n_atoms=8, n_pca=5, n_view_pca=16, n_init=1,
                       random_state=0).fit(images)
