"""t-SNE of the sample with openTSNE (FFT-accelerated, multi-threaded), and of new rows per block.

``TSNEEmbedding.fit`` embeds the in-memory sample. ``transform_blocks`` places rows of a dask
array into that embedding on the workers with openTSNE's ``transform`` (each new point is
optimised against the fixed reference embedding, not against the other new points). The
reference travels to each worker once, as one graph key, stripped of what ``transform`` does
not use (the sample's affinity matrix and neighbour lists), which leaves the k-NN index of
the sample and the 2-D reference points: about 5 MB for 70,000 rows of 10 components.
"""

from __future__ import annotations

import copy
import uuid

import dask.array as da
import numpy as np
from joblib import parallel_config
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator
from sklearn.manifold import trustworthiness
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted

from fmnist_dask._blocks import per_block, rows_in_sample


class KDTreeNeighbors:
    """openTSNE's exact k-NN index (its ``KNNIndex`` interface), searched with ``cKDTree``.

    openTSNE's ``"exact"`` method is scikit-learn's ``NearestNeighbors`` (a kd-tree on 10
    components). scipy's tree finds the same neighbours at the same distances (to ~2e-15)
    in 5.6 s instead of 9.8 s for the 90 neighbours of each of 70,000 PCA-10 rows on one
    thread (docs/benchmarks.md, "Big data, session 12"). Given to openTSNE's affinities as
    ``knn_index``, which only calls ``build``/``query`` and reads ``k``/``n_samples``.

    Parameters
    ----------
    data : numpy.ndarray of shape (n_samples, n_features)
        Points to index.
    k : int
        Neighbours per point that ``build`` returns.
    n_jobs : int, default=1
        Threads of the queries (``-1``: all cores).
    """

    def __init__(self, data: np.ndarray, k: int, n_jobs: int = 1) -> None:
        self.k = k
        self.n_samples = data.shape[0]
        self.n_jobs = n_jobs
        self.index = cKDTree(data, leafsize=40)

    def build(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest other points of every indexed point: indices and distances,
        each of shape (n_samples, k), nearest first. As scikit-learn's ``kneighbors()``,
        each point is left out of its own list: itself if among its ``k + 1`` nearest
        (duplicates can tie with it), else the farthest of them."""
        distances, indices = self.index.query(self.index.data, k=self.k + 1,
                                              workers=self.n_jobs)
        others = indices != np.arange(self.n_samples)[:, None]
        others[others.all(axis=1), -1] = False
        shape = (self.n_samples, self.k)
        return indices[others].reshape(shape), distances[others].reshape(shape)

    def query(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed points of each query row: indices and distances."""
        distances, indices = self.index.query(query, k=k, workers=self.n_jobs)
        return indices.reshape(len(query), k), distances.reshape(len(query), k)


def _slim_reference(embedding: object) -> object:
    """A copy of an openTSNE embedding with only what ``transform`` needs.

    ``transform`` queries the k-NN index for the new points' affinities and optimises them
    against the reference positions. The sample's own affinity matrix ``P`` and neighbour
    lists, the bulk of the pickle at 70,000 rows, are not used there and are dropped. The
    copy is built attribute by attribute (the list openTSNE's ``__reduce__`` keeps) because
    the constructor insists on ``P``; it owns its array, so ``transform`` centring it in
    place leaves the original alone.
    """
    import openTSNE
    from openTSNE.tsne import gradient_descent

    affinities = copy.copy(embedding.affinities)
    affinities.P = None
    # The neighbour lists are private (name-mangled) attributes of the affinity class in use
    # (PerplexityBasedNN, MultiscaleMixture...).
    for name in list(vars(affinities)):
        if name.endswith(("__neighbors", "__distances")):
            setattr(affinities, name, None)
    slim = np.array(embedding, dtype=np.float64, order="C").view(openTSNE.TSNEEmbedding)
    slim.affinities = affinities
    slim.gradient_descent_params = dict(embedding.gradient_descent_params)
    slim.random_state = embedding.random_state
    slim.optimizer = gradient_descent()
    slim.kl_divergence = embedding.kl_divergence
    slim.interp_coeffs = slim.box_x_lower_bounds = slim.box_y_lower_bounds = None
    return slim


def _transform_block(
    block: np.ndarray,
    model: TSNEEmbedding,
    sample_indices: np.ndarray | None,
    block_info: dict | None = None,
) -> np.ndarray:
    """2-D coordinates of one block; sample rows keep their fitted coordinates."""
    out = np.empty((block.shape[0], model.n_components), dtype=np.float64)
    todo = np.ones(block.shape[0], dtype=bool)
    if sample_indices is not None:
        in_sample, where = rows_in_sample(sample_indices, block.shape[0], block_info)
        out[in_sample] = model.embedding_[where[in_sample]]
        todo = ~in_sample
    if todo.any():
        # transform centres the reference in place; it is centred already at fit.
        out[todo] = np.asarray(model.reference_.transform(
            np.asarray(block[todo], dtype=np.float64), **model._transform_params()))
    return out


class TSNEEmbedding(BaseEstimator):
    """openTSNE t-SNE of an in-memory sample, with per-block placement of other rows.

    Parameters
    ----------
    n_components : int, default=2
        Embedding dimension (the FFT gradient supports 1 or 2).
    perplexity : float, default=30
        Effective number of neighbours (as scikit-learn's default).
    early_exaggeration_iter : int, default=250
        Iterations with exaggerated attraction (as scikit-learn).
    n_iter : int, default=300
        Iterations after the exaggeration phase (openTSNE's default is 500; scikit-learn
        runs 750). On the 70,000 Fashion-MNIST rows 300 keep the neighbourhoods as faithful
        as scikit-learn's map (trustworthiness) at a little higher KL divergence, i.e. a
        little less relaxed (docs/benchmarks.md, "Sample-based models").
    learning_rate : float or "auto", default="auto"
        ``"auto"`` is ``n / 12`` (the same step as scikit-learn's ``"auto"``, whose gradient
        carries an extra factor 4).
    neighbors : str, default="exact"
        k-NN method for the ``3 * perplexity`` input neighbours: ``"exact"`` is a kd-tree
        (scipy's, :class:`KDTreeNeighbors`: the neighbours of openTSNE's own ``"exact"``,
        a scikit-learn kd-tree as in scikit-learn's TSNE, found 1.75x faster), on 10
        components both faster than ``"annoy"`` and far smaller to pickle
        (docs/benchmarks.md); other values are openTSNE's methods.
    negative_gradient_method : str, default="auto"
        ``"fft"``: FFT-accelerated interpolation (linear in ``n``); ``"bh"``: Barnes-Hut;
        ``"auto"`` (openTSNE's rule): FFT from 10,000 points, Barnes-Hut below, where the
        FFT grid's fixed cost dominates.
    ints_in_interval : float, default=4.0
        Embedding units per FFT interpolation interval (openTSNE's default is 1). The
        gradient's cost follows the number of grid cells, which grows with the embedding's
        spread as it expands: coarser intervals cost much less for nearly the same
        trustworthiness (docs/benchmarks.md, "Sample-based models").
    initialization : str, default="pca"
        Start from the scaled first two principal components (as scikit-learn).
    transform_perplexity : float, default=5
        Perplexity of the new points' affinities in :meth:`transform_blocks` (openTSNE's).
    transform_n_iter : int, default=250
        Optimisation steps of new points (openTSNE's default).
    n_jobs : int, default=1
        Threads of the fit (neighbour search and gradient).
    random_state : int, RandomState or None
        Seed of the neighbour index and the PCA initialisation.

    Attributes
    ----------
    embedding_ : numpy.ndarray of shape (n_samples, n_components), float64
        Coordinates of the fitted points, centred on the middle of their bounding box.
    kl_divergence_ : float
        Final Kullback-Leibler divergence of the fit.
    reference_ : openTSNE.TSNEEmbedding
        The openTSNE embedding with its k-NN index, without the sample's affinity matrix
        (what :meth:`transform` needs; about 5 MB at 70,000 rows).
    n_features_in_ : int
        Features of the fitted sample.
    """

    def __init__(
        self,
        n_components: int = 2,
        *,
        perplexity: float = 30.0,
        early_exaggeration_iter: int = 250,
        n_iter: int = 300,
        learning_rate: float | str = "auto",
        neighbors: str = "exact",
        negative_gradient_method: str = "auto",
        ints_in_interval: float = 4.0,
        initialization: str = "pca",
        transform_perplexity: float = 5.0,
        transform_n_iter: int = 250,
        n_jobs: int = 1,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.n_components = n_components
        self.perplexity = perplexity
        self.early_exaggeration_iter = early_exaggeration_iter
        self.n_iter = n_iter
        self.learning_rate = learning_rate
        self.neighbors = neighbors
        self.negative_gradient_method = negative_gradient_method
        self.ints_in_interval = ints_in_interval
        self.initialization = initialization
        self.transform_perplexity = transform_perplexity
        self.transform_n_iter = transform_n_iter
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: None = None) -> TSNEEmbedding:
        """Embed the sample.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_samples, n_features)
            Sample rows (e.g. 10 PCA components).
        y : None
            Ignored.

        Returns
        -------
        self : TSNEEmbedding
            Fitted estimator.
        """
        import openTSNE

        X = check_array(X, dtype=np.float64, ensure_min_samples=2)
        tsne = openTSNE.TSNE(
            n_components=self.n_components,
            perplexity=self.perplexity,
            early_exaggeration_iter=self.early_exaggeration_iter,
            n_iter=self.n_iter,
            learning_rate=self.learning_rate,
            neighbors=self.neighbors,
            negative_gradient_method=self.negative_gradient_method,
            ints_in_interval=self.ints_in_interval,
            initialization=self.initialization,
            n_jobs=self.n_jobs,
            random_state=self.random_state,  # openTSNE takes an int or a RandomState
        )
        affinities = None
        if self.neighbors == "exact":  # the same neighbours as openTSNE's, found faster
            index = KDTreeNeighbors(X, min(len(X) - 1, int(3 * self.perplexity)),
                                    n_jobs=self.n_jobs)
            affinities = openTSNE.affinity.MultiscaleMixture(
                perplexities=[self.perplexity], knn_index=index, n_jobs=self.n_jobs,
                random_state=self.random_state)
        # Threads for the neighbour search: joblib's default process backend is refused in a
        # (daemonic) Dask worker and falls back to one core, with a warning.
        with parallel_config(backend="threading"):
            reference = tsne.fit(X, affinities=affinities)
        # Centre now, as transform would in place, so fitted and transformed coordinates agree.
        reference -= (np.max(reference, axis=0) + np.min(reference, axis=0)) / 2
        # Keep only what transform needs: the estimator stays small to pickle and ship.
        self.reference_ = _slim_reference(reference)
        self.embedding_ = np.array(reference, dtype=np.float64)
        self.kl_divergence_ = float(reference.kl_divergence)
        self.n_features_in_ = X.shape[1]
        self._key = f"tsne-reference-{uuid.uuid4().hex}"
        return self

    def fit_transform(self, X: np.ndarray, y: None = None) -> np.ndarray:
        """Fit and return ``embedding_``, shape (n_samples, n_components)."""
        return self.fit(X).embedding_

    def _transform_params(self) -> dict:
        return {"perplexity": self.transform_perplexity, "n_iter": self.transform_n_iter}

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Place new rows into the fitted embedding (in memory).

        Parameters
        ----------
        X : numpy.ndarray of shape (n_rows, n_features)
            Rows in the fitted feature space.

        Returns
        -------
        numpy.ndarray of shape (n_rows, n_components)
            Their coordinates; each row is optimised against the fixed reference only.
        """
        X = check_array(X, dtype=np.float64)
        reference = _slim_reference(self.reference_)
        return np.asarray(reference.transform(X, **self._transform_params()), dtype=np.float64)

    def transform_blocks(
        self, X: da.Array, sample_indices: np.ndarray | None = None
    ) -> da.Array:
        """Embed every row of a dask array, block by block on the workers.

        Parameters
        ----------
        X : dask.array.Array of shape (n_rows, n_features)
            Full data in the fitted feature space, row chunks known.
        sample_indices : numpy.ndarray of shape (n_samples,), optional
            Sorted positions in ``X`` of the fitted rows, in the order they were fitted (as
            :func:`fmnist_dask.sampling.uniform_row_sample` returns them). Those rows get
            exactly ``embedding_`` and only the others are transformed.

        Returns
        -------
        dask.array.Array of shape (n_rows, n_components), float64
            Coordinates; lazy. Cost: each block pays the neighbour queries against the sample
            index and ``transform_n_iter`` gradient steps of its new rows against the
            reference (the reference's interpolation grid is rebuilt per block).
        """
        check_is_fitted(self, "reference_")
        if sample_indices is not None:
            sample_indices = np.asarray(sample_indices, dtype=np.int64)
            if sample_indices.shape != (self.embedding_.shape[0],):
                raise ValueError("sample_indices must have one position per fitted row")
            if np.any(np.diff(sample_indices) <= 0):
                raise ValueError("sample_indices must be sorted and unique")
        # The estimator (the slim reference and the sample's coordinates) travels once per
        # worker under its own key.
        return per_block(_transform_block, X, self, n_features=self.n_features_in_,
                         dtype=np.float64, n_columns=self.n_components, key=self._key,
                         sample_indices=sample_indices)


def subsample_trustworthiness(
    X: np.ndarray,
    embedding: np.ndarray,
    n_points: int = 5_000,
    n_neighbors: int = 5,
    random_state: int | np.random.RandomState | None = 0,
) -> float:
    """Trustworthiness of an embedding measured on a uniform subsample of its points.

    Parameters
    ----------
    X : numpy.ndarray of shape (n_samples, n_features)
        Input space (e.g. the PCA components).
    embedding : numpy.ndarray of shape (n_samples, n_components)
        Embedded points, in the same row order.
    n_points : int, default=5_000
        Points kept (all when fewer); the same seed picks the same points for every
        embedding compared, and neighbours are taken within the subsample.
    n_neighbors : int, default=5
        Neighbourhood size of ``sklearn.manifold.trustworthiness``.
    random_state : int, RandomState or None, default=0
        Seed of the subsample.

    Returns
    -------
    float
        Trustworthiness in ``[0, 1]``; 1 means no embedded neighbour is a stranger in ``X``.
    """
    X = np.asarray(X)
    embedding = np.asarray(embedding)
    if X.shape[0] != embedding.shape[0]:
        raise ValueError("X and embedding must have the same rows")
    rng = check_random_state(random_state)
    if X.shape[0] > n_points:
        keep = np.sort(rng.choice(X.shape[0], n_points, replace=False))
        X, embedding = X[keep], embedding[keep]
    return float(trustworthiness(X, embedding, n_neighbors=n_neighbors))
