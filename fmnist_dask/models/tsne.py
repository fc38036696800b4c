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
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numba
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


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _attraction_rows(indices: np.ndarray, indptr: np.ndarray, p: np.ndarray,
                     embedding: np.ndarray, gradient: np.ndarray, start: int,
                     stop: int) -> None:  # pragma: no cover
    """Adds the attractive t-SNE gradient of rows ``start:stop`` (2-D, one degree of freedom).

    openTSNE's ``estimate_positive_gradient_nn``: for each row i and each neighbour j in the
    CSR affinities, ``p_ij q_ij (y_i - y_j)`` with ``q_ij = 1 / (1 + |y_i - y_j|^2)``. The
    terms go to four running sums in registers (openTSNE adds each to ``gradient`` in
    memory, one after another): the four divisions of a round overlap, 1.3x faster on one
    thread here (docs/benchmarks.md, "The t-SNE gradient").
    """
    for i in range(start, stop):
        xi, yi = embedding[i, 0], embedding[i, 1]
        gx0 = gx1 = gx2 = gx3 = gy0 = gy1 = gy2 = gy3 = 0.0
        k, end = indptr[i], indptr[i + 1]
        while k + 4 <= end:
            j0, j1, j2, j3 = indices[k], indices[k + 1], indices[k + 2], indices[k + 3]
            dx0, dy0 = xi - embedding[j0, 0], yi - embedding[j0, 1]
            dx1, dy1 = xi - embedding[j1, 0], yi - embedding[j1, 1]
            dx2, dy2 = xi - embedding[j2, 0], yi - embedding[j2, 1]
            dx3, dy3 = xi - embedding[j3, 0], yi - embedding[j3, 1]
            pq0 = p[k] / (1.0 + (dx0 * dx0 + dy0 * dy0))
            pq1 = p[k + 1] / (1.0 + (dx1 * dx1 + dy1 * dy1))
            pq2 = p[k + 2] / (1.0 + (dx2 * dx2 + dy2 * dy2))
            pq3 = p[k + 3] / (1.0 + (dx3 * dx3 + dy3 * dy3))
            gx0 += pq0 * dx0
            gy0 += pq0 * dy0
            gx1 += pq1 * dx1
            gy1 += pq1 * dy1
            gx2 += pq2 * dx2
            gy2 += pq2 * dy2
            gx3 += pq3 * dx3
            gy3 += pq3 * dy3
            k += 4
        while k < end:
            j0 = indices[k]
            dx0, dy0 = xi - embedding[j0, 0], yi - embedding[j0, 1]
            pq0 = p[k] / (1.0 + (dx0 * dx0 + dy0 * dy0))
            gx0 += pq0 * dx0
            gy0 += pq0 * dy0
            k += 1
        gradient[i, 0] += (gx0 + gx1) + (gx2 + gx3)
        gradient[i, 1] += (gy0 + gy1) + (gy2 + gy3)


class OverlappedFFTGradient:
    """openTSNE's FFT gradient with its two terms computed at the same time.

    A drop-in ``negative_gradient_method`` for openTSNE's optimiser (it accepts a callable
    with the signature of ``openTSNE.tsne.kl_divergence_fft``). openTSNE computes the
    repulsive term (FFT interpolation on one thread, holding the GIL) and then the
    attractive term (on its threads). Here the calling thread computes the repulsion and
    then the attraction of the last rows, while the other threads take the attraction of
    the first rows in one compiled call each (:func:`_attraction_rows`, without the GIL:
    work handed out in small pieces would wait for the GIL the repulsion holds). The rows'
    split is adjusted after every step so that all threads finish together. Each
    row's terms are computed as openTSNE does and the gradient is the repulsion plus the
    row's attraction, so it agrees with openTSNE's to rounding (~1e-15 relative) and does
    not depend on the split. docs/benchmarks.md, "The t-SNE gradient", has the timings.

    Steps that evaluate the KL divergence, transforms (a reference embedding), other degrees
    of freedom and 1-D embeddings go to openTSNE's own function. The threads are the
    ``n_jobs`` openTSNE's optimiser passes (the calling one included), resolved by its rule.
    """

    def __init__(self) -> None:
        #: Threads beside the calling one, made on the first step with more than one job.
        self._pool: ThreadPoolExecutor | None = None
        #: Share of the rows whose attraction the other threads take (adjusted each step).
        self.head_share = 0.5

    def _helpers(self, n_jobs: int) -> ThreadPoolExecutor:
        # openTSNE passes one n_jobs for a whole fit
        if self._pool is None:
            self._pool = ThreadPoolExecutor(n_jobs - 1, thread_name_prefix="tsne-gradient")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> OverlappedFFTGradient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, embedding: np.ndarray, P: Any, dof: float, fft_params: dict,
                 reference_embedding: np.ndarray | None = None,
                 should_eval_error: bool = False, n_jobs: int = 1,
                 **kwargs: Any) -> tuple[float, np.ndarray]:
        from openTSNE import _tsne
        from openTSNE.tsne import kl_divergence_fft

        if (should_eval_error or reference_embedding is not None or dof != 1
                or embedding.ndim != 2 or embedding.shape[1] != 2):
            return kl_divergence_fft(embedding, P, dof, fft_params, reference_embedding,
                                     should_eval_error, n_jobs, **kwargs)
        points = np.ascontiguousarray(embedding, dtype=np.float64)
        n = len(points)
        n_jobs = max(1, n_jobs)
        gradient = np.zeros_like(points)
        head = int(round(self.head_share * n)) if n_jobs > 1 else 0
        cuts = np.linspace(0, head, n_jobs).astype(np.int64)
        started = [threading.Event() for _ in range(n_jobs - 1)]

        def attract_head(part: int) -> float:
            started[part].set()
            began = time.perf_counter()
            _attraction_rows(P.indices, P.indptr, P.data, points, gradient,
                             cuts[part], cuts[part + 1])
            return time.perf_counter() - began

        heads = [self._helpers(n_jobs).submit(attract_head, part) for part in range(n_jobs - 1)]
        for event in started:  # let them into their compiled calls before the GIL is held
            event.wait()
        began = time.perf_counter()
        repulsion = np.zeros_like(points)
        _tsne.estimate_negative_gradient_fft_2d(points, repulsion, **fft_params, dof=dof)
        repelled = time.perf_counter()
        _attraction_rows(P.indices, P.indptr, P.data, points, gradient, head, n)
        tail_seconds = time.perf_counter() - repelled
        head_seconds = max([future.result() for future in heads], default=0.0)
        gradient += repulsion
        if heads:
            self._rebalance(n, n_jobs, head_seconds, tail_seconds, repelled - began)
        return 0.0, gradient

    def _rebalance(self, n: int, n_jobs: int, head_seconds: float, tail_seconds: float,
                   repulsion_seconds: float) -> None:
        """Move the split so that the next step's threads finish together."""
        # Seconds of attraction per row on one thread, from both sides' measurements.
        per_row = (head_seconds * (n_jobs - 1) + tail_seconds) / max(n, 1)
        if per_row <= 0:
            return
        # head rows on n_jobs - 1 threads take as long as the repulsion plus the tail rows:
        # head / (n_jobs - 1) = repulsion / per_row + n - head
        balanced = (repulsion_seconds / per_row + n) * (n_jobs - 1) / n_jobs
        share = min(max(balanced / n, 0.0), 1.0)
        self.head_share = 0.5 * self.head_share + 0.5 * share


@numba.njit(cache=True, nogil=True)
def _descent_step(embedding: np.ndarray, gradient: np.ndarray, update: np.ndarray,
                  gains: np.ndarray, learning_rate: float, momentum: float, min_gain: float,
                  max_step_norm: float) -> None:  # pragma: no cover
    """One step of openTSNE's gradient descent with momentum and gains, in place, fused.

    The same arithmetic, in the same order, as the numpy statements of
    ``openTSNE.tsne.gradient_descent.__call__`` (gains, update, step-norm clipping, move),
    in one pass over the rows instead of a dozen passes and boolean-indexed copies; the
    centring that follows stays numpy's mean (its summation order).
    """
    for i in range(embedding.shape[0]):
        norm2 = 0.0
        for c in range(embedding.shape[1]):
            if np.sign(update[i, c]) != np.sign(gradient[i, c]):
                gains[i, c] += 0.2
            else:
                gains[i, c] = gains[i, c] * 0.8 + min_gain
            update[i, c] = momentum * update[i, c] - learning_rate * gains[i, c] * gradient[i, c]
            norm2 += update[i, c] * update[i, c]
        norm = np.sqrt(norm2)
        if norm > max_step_norm:
            for c in range(embedding.shape[1]):
                update[i, c] /= norm
                update[i, c] *= max_step_norm
        for c in range(embedding.shape[1]):
            embedding[i, c] += update[i, c]


def _fused_descent_class() -> type:
    """openTSNE's ``gradient_descent`` with each step's update fused (:func:`_descent_step`).

    Built on first use so that openTSNE is imported only where a t-SNE is fitted.
    """
    from openTSNE.tsne import gradient_descent

    class FusedGradientDescent(gradient_descent):
        """openTSNE's optimiser; the plain case (no reference embedding, callbacks,
        gradient clipping or verbose output: a fit) runs its steps' numpy update as one
        compiled pass, 5 ms -> 0.3 ms a step on 60,000 points (docs/benchmarks.md, "The
        t-SNE gradient"). The same arithmetic: the same embedding as openTSNE's optimiser
        from the same gradients. Anything else is openTSNE's own loop."""

        def __call__(self, embedding: np.ndarray, P: Any, n_iter: int,
                     objective_function: Any, learning_rate: Any = "auto",
                     momentum: float = 0.8, exaggeration: float | None = None,
                     dof: float = 1, min_gain: float = 0.01,
                     max_grad_norm: float | None = None, max_step_norm: float | None = 5,
                     theta: float = 0.5, n_interpolation_points: int = 3,
                     min_num_intervals: int = 50, ints_in_interval: float = 1,
                     reference_embedding: Any = None, n_jobs: int = 1,
                     use_callbacks: bool = False, callbacks: Any = None,
                     callbacks_every_iters: int = 50,
                     verbose: bool = False) -> tuple[float, np.ndarray]:
            # openTSNE's signature and defaults
            params = {"learning_rate": learning_rate, "momentum": momentum,
                      "exaggeration": exaggeration, "dof": dof, "min_gain": min_gain,
                      "max_grad_norm": max_grad_norm, "max_step_norm": max_step_norm,
                      "theta": theta, "n_interpolation_points": n_interpolation_points,
                      "min_num_intervals": min_num_intervals,
                      "ints_in_interval": ints_in_interval,
                      "reference_embedding": reference_embedding, "n_jobs": n_jobs,
                      "use_callbacks": use_callbacks, "callbacks": callbacks,
                      "callbacks_every_iters": callbacks_every_iters, "verbose": verbose}
            plain = (reference_embedding is None and not use_callbacks and not verbose
                     and max_grad_norm is None and learning_rate != "auto")
            if not plain:
                return super().__call__(embedding, P, n_iter, objective_function, **params)
            fft_params = {"n_interpolation_points": n_interpolation_points,
                          "min_num_intervals": min_num_intervals,
                          "ints_in_interval": ints_in_interval}
            bh_params = {"theta": theta}
            if self.update is None:
                self.update = np.zeros_like(embedding).view(np.ndarray)
            if self.gains is None:
                self.gains = np.ones_like(embedding).view(np.ndarray)
            exaggeration = 1 if exaggeration is None else exaggeration
            if exaggeration != 1:
                P *= exaggeration
            points = embedding.view(np.ndarray)
            step_limit = np.inf if max_step_norm is None else float(max_step_norm)
            for _ in range(n_iter):
                _, gradient = objective_function(
                    embedding, P, dof=dof, bh_params=bh_params, fft_params=fft_params,
                    reference_embedding=None, n_jobs=n_jobs, should_eval_error=False)
                _descent_step(points, np.ascontiguousarray(gradient, dtype=np.float64),
                              self.update, self.gains, float(learning_rate),
                              float(momentum), float(min_gain), step_limit)
                points -= np.mean(points, axis=0)
            if exaggeration != 1:
                P /= exaggeration
            error, _ = objective_function(
                embedding, P, dof=dof, bh_params=bh_params, fft_params=fft_params,
                reference_embedding=None, n_jobs=n_jobs, should_eval_error=True)
            return error, embedding

    return FusedGradientDescent


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
        method = self.negative_gradient_method
        if method == "auto":  # openTSNE's rule
            method = "fft" if len(X) >= 10_000 else "bh"
        fft = method in ("fft", "FFT", "interpolation")
        gradient = OverlappedFFTGradient() if fft else None
        tsne = openTSNE.TSNE(
            n_components=self.n_components,
            perplexity=self.perplexity,
            early_exaggeration_iter=self.early_exaggeration_iter,
            n_iter=self.n_iter,
            learning_rate=self.learning_rate,
            neighbors=self.neighbors,
            negative_gradient_method=gradient or method,
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
        try:
            with parallel_config(backend="threading"):
                reference = tsne.prepare_initial(X, affinities=affinities)
            # TSNE.fit's two phases, with the fused optimiser
            reference.optimizer = _fused_descent_class()()
            reference.optimize(n_iter=tsne.early_exaggeration_iter,
                               exaggeration=tsne.early_exaggeration,
                               momentum=tsne.initial_momentum, inplace=True,
                               propagate_exception=True)
            reference.optimize(n_iter=tsne.n_iter, exaggeration=tsne.exaggeration,
                               momentum=tsne.final_momentum, inplace=True,
                               propagate_exception=True)
        finally:
            if gradient is not None:
                gradient.close()
        # transform's optimiser prepares its interpolation grid only for openTSNE's own FFT
        # function, and the fitted embedding must pickle: it keeps the method's name.
        reference.gradient_descent_params["negative_gradient_method"] = method
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


def compile_tsne_kernels() -> None:
    """Fit a tiny FFT t-SNE once so that its numba kernels (the attraction and the update)
    are compiled into the disk cache.

    ``make install`` calls it, as it does ``compile_umap_kernels``: a job's first t-SNE fit
    then loads them (~0.2 s) instead of compiling them (~0.7 s). The argument types are a
    real fit's (the cache keys on them).
    """
    points = np.random.default_rng(0).random((300, 10))
    TSNEEmbedding(early_exaggeration_iter=2, n_iter=2, negative_gradient_method="fft",
                  n_jobs=2, random_state=0).fit(points)
