"""Fast spectral clustering with a nearest-neighbours affinity, for an in-memory sample.

Same model as ``sklearn.cluster.SpectralClustering(affinity="nearest_neighbors")``: the
symmetric k-NN connectivity graph ``0.5 * (C + C.T)`` (each point counted among its own
neighbours), the symmetric normalized Laplacian ``L = I - D^-1/2 A D^-1/2``, its
``n_clusters`` smallest eigenvectors scaled by ``D^-1/2`` as the embedding, then k-means on the
embedding. What differs is the eigensolver: scikit-learn's default ARPACK in shift-invert mode
factorizes ``L`` (a sparse LU with large fill-in on a k-NN graph), which dominates its run
time; here LOBPCG is preconditioned with a smoothed-aggregation algebraic multigrid
(``pyamg``), whose cost grows about linearly with the number of points. See
``docs/benchmarks.md`` ("Sample-based models") for the measurements behind this choice.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.sparse.csgraph import laplacian as csgraph_laplacian
from scipy.sparse.linalg import eigsh, lobpcg
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors
from sklearn.utils import check_array, check_random_state
from threadpoolctl import threadpool_limits

EIGEN_SOLVERS = ("lobpcg-amg", "arpack")


def knn_affinity(
    X: np.ndarray, n_neighbors: int = 10, n_jobs: int | None = None
) -> sp.csr_matrix:
    """Symmetric k-nearest-neighbour connectivity graph, as scikit-learn's spectral clustering.

    Parameters
    ----------
    X : numpy.ndarray of shape (n_samples, n_features)
        Points (Euclidean distances).
    n_neighbors : int, default=10
        Neighbours per point, the point itself included (``include_self=True``).
    n_jobs : int or None
        Threads of the neighbour search.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_samples, n_samples), float64
        ``0.5 * (C + C.T)`` where ``C[i, j] = 1`` when ``j`` is among the ``n_neighbors``
        nearest points of ``i``; entries are 1 (mutual neighbours) or 0.5.
    """
    n_neighbors = min(int(n_neighbors), X.shape[0])
    # A kd-tree is exact and fast in low dimension (10 PCA components); "auto" lets
    # scikit-learn fall back to brute force for wide data.
    nn = NearestNeighbors(n_neighbors=n_neighbors, n_jobs=n_jobs).fit(X)
    connectivity = nn.kneighbors_graph(X, mode="connectivity")
    return (0.5 * (connectivity + connectivity.T)).tocsr()


def _sign_flip(vectors: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude entry of each column positive (deterministic signs)."""
    rows = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[rows, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def spectral_embedding(
    affinity: sp.spmatrix,
    n_components: int = 10,
    *,
    eigen_solver: str = "lobpcg-amg",
    tol: float = 1e-5,
    max_iter: int = 300,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest eigenvectors of the normalized Laplacian of a graph, scaled by ``D^-1/2``.

    Parameters
    ----------
    affinity : scipy sparse matrix of shape (n_samples, n_samples)
        Symmetric non-negative weights.
    n_components : int, default=10
        Eigenvectors kept (the first, constant on a connected graph, included as in
        scikit-learn's ``SpectralClustering``).
    eigen_solver : {"lobpcg-amg", "arpack"}, default="lobpcg-amg"
        ``"lobpcg-amg"``: LOBPCG preconditioned by pyamg smoothed aggregation (fast);
        ``"arpack"``: scikit-learn's shift-invert ARPACK (exact, slow; for comparison).
    tol : float, default=1e-5
        Residual tolerance of LOBPCG (the embedding only feeds k-means; tighter tolerances
        gave the same labels in our measurements).
    max_iter : int, default=300
        Largest number of LOBPCG iterations.
    random_state : int, RandomState or None
        Seed of the starting vectors.

    Returns
    -------
    embedding : numpy.ndarray of shape (n_samples, n_components), float64
        Rows are the points' spectral coordinates.
    eigenvalues : numpy.ndarray of shape (n_components,)
        Matching eigenvalues of the normalized Laplacian, ascending, in ``[0, 2]``.
    """
    if eigen_solver not in EIGEN_SOLVERS:
        raise ValueError(f"eigen_solver must be one of {EIGEN_SOLVERS}, got {eigen_solver!r}")
    rng = check_random_state(random_state)
    affinity = sp.csr_matrix(affinity, dtype=np.float64)
    n = affinity.shape[0]
    if n_components < 1 or n_components >= n:
        raise ValueError(f"need 1 <= n_components < n_samples, got {n_components} and {n}")
    if connected_components(affinity, directed=False)[0] > 1:
        warnings.warn(
            "the affinity graph is not fully connected; the embedding may not work as expected",
            UserWarning,
            stacklevel=2,
        )
    laplacian, dd = csgraph_laplacian(affinity, normed=True, return_diag=True)
    laplacian = sp.csr_matrix(laplacian)

    if n < 5 * n_components + 1:
        # Too small for an iterative block solver: dense is exact and instant.
        values, vectors = eigh(laplacian.toarray())
        values, vectors = values[:n_components], vectors[:, :n_components]
    elif eigen_solver == "arpack":
        # scikit-learn's path: largest eigenvalues of -L around sigma=1 (shift-invert).
        v0 = rng.uniform(-1, 1, n)
        values, vectors = eigsh(-laplacian, k=n_components, sigma=1.0, which="LM", v0=v0)
        values, order = -values, np.argsort(-values)
        values, vectors = values[order], vectors[:, order]
    else:
        values, vectors = _lobpcg_amg(laplacian, dd, n_components, tol, max_iter, rng)

    embedding = _sign_flip(vectors / dd[:, None])
    return embedding, values


def _lobpcg_amg(
    laplacian: sp.csr_matrix,
    dd: np.ndarray,
    n_components: int,
    tol: float,
    max_iter: int,
    rng: np.random.RandomState,
) -> tuple[np.ndarray, np.ndarray]:
    """LOBPCG with a smoothed-aggregation AMG preconditioner; smallest eigenpairs."""
    import pyamg  # imported here: only this solver needs it

    n = laplacian.shape[0]
    # L is singular (constant-like null vector); a tiny shift makes the AMG hierarchy
    # well defined without moving the eigenvectors (same trick as scikit-learn's "amg").
    shifted = (laplacian + 1e-5 * sp.identity(n, format="csr")).tocsr()
    preconditioner = pyamg.smoothed_aggregation_solver(shifted).aspreconditioner()
    # One extra vector speeds convergence of the last wanted pair; the first start vector
    # is D^1/2 1, the exact null vector of a connected graph.
    start = rng.standard_normal((n, n_components + 1))
    start[:, 0] = dd
    # One BLAS thread: the V-cycle makes many small BLAS calls that multithreaded OpenBLAS
    # slows down (docs/benchmarks.md, "Figures behind choices in the code").
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Non-convergence is reported by the residual check below instead.
        warnings.simplefilter("ignore", UserWarning)
        values, vectors = lobpcg(
            laplacian, start, M=preconditioner, tol=tol, largest=False, maxiter=max_iter
        )
    order = np.argsort(values)[:n_components]
    values, vectors = values[order], vectors[:, order]
    residual = np.linalg.norm(laplacian @ vectors - vectors * values, axis=0)
    if np.any(residual > max(100 * tol, 1e-3)):
        warnings.warn(
            f"LOBPCG did not converge (largest residual {residual.max():.2e}); "
            "raise max_iter or tol",
            UserWarning,
            stacklevel=3,
        )
    return values, vectors


class FastSpectralClustering(ClusterMixin, BaseEstimator):
    """Spectral clustering on a k-NN graph with an AMG-preconditioned LOBPCG eigensolver.

    Parameters
    ----------
    n_clusters : int, default=10
        Clusters, and dimension of the spectral embedding.
    n_neighbors : int, default=10
        Neighbours per point in the connectivity graph (the point itself included).
    eigen_solver : {"lobpcg-amg", "arpack"}, default="lobpcg-amg"
        Eigensolver of the normalized Laplacian; see :func:`spectral_embedding`.
    eigen_tol : float, default=1e-5
        LOBPCG residual tolerance.
    n_init : int, default=10
        k-means restarts on the embedding (as scikit-learn).
    random_state : int, RandomState or None
        Seed of the eigensolver start and of k-means.
    n_jobs : int or None
        Threads of the neighbour search.

    Attributes
    ----------
    labels_ : numpy.ndarray of shape (n_samples,), int32
        Cluster of each fitted point, in ``[0, n_clusters)``.
    affinity_matrix_ : scipy.sparse.csr_matrix of shape (n_samples, n_samples)
        Symmetric k-NN connectivity graph.
    embedding_ : numpy.ndarray of shape (n_samples, n_clusters)
        Spectral coordinates that k-means clustered.
    eigenvalues_ : numpy.ndarray of shape (n_clusters,)
        Smallest eigenvalues of the normalized Laplacian, ascending.
    n_features_in_ : int
        Features seen in ``fit``.
    """

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        n_neighbors: int = 10,
        eigen_solver: str = "lobpcg-amg",
        eigen_tol: float = 1e-5,
        n_init: int = 10,
        random_state: int | np.random.RandomState | None = None,
        n_jobs: int | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.n_neighbors = n_neighbors
        self.eigen_solver = eigen_solver
        self.eigen_tol = eigen_tol
        self.n_init = n_init
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray, y: None = None) -> FastSpectralClustering:
        """Cluster the points of ``X``.

        Parameters
        ----------
        X : numpy.ndarray of shape (n_samples, n_features)
            Points, e.g. the PCA-projected sample.
        y : None
            Ignored.

        Returns
        -------
        self : FastSpectralClustering
            Fitted estimator.
        """
        X = check_array(X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        if self.n_clusters < 1 or self.n_clusters >= X.shape[0]:
            raise ValueError(f"need 1 <= n_clusters < n_samples, got {self.n_clusters}")
        rng = check_random_state(self.random_state)
        self.n_features_in_ = X.shape[1]
        self.affinity_matrix_ = knn_affinity(X, self.n_neighbors, self.n_jobs)
        self.embedding_, self.eigenvalues_ = spectral_embedding(
            self.affinity_matrix_,
            self.n_clusters,
            eigen_solver=self.eigen_solver,
            tol=self.eigen_tol,
            random_state=rng,
        )
        kmeans = KMeans(self.n_clusters, n_init=self.n_init, random_state=rng)
        self.labels_ = kmeans.fit_predict(self.embedding_).astype(np.int32)
        return self

    def fit_predict(self, X: np.ndarray, y: None = None) -> np.ndarray:
        """Fit and return ``labels_``, shape (n_samples,)."""
        return self.fit(X).labels_
