"""FastSpectralClustering against scikit-learn's spectral clustering and planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.datasets import make_blobs, make_moons
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from fmnist_dask.models.spectral import FastSpectralClustering, knn_affinity, spectral_embedding


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Six well-separated Gaussian clusters in 10-D, 1,800 points."""
    return make_blobs(
        n_samples=1800, n_features=10, centers=6, cluster_std=1.0, center_box=(-15, 15),
        random_state=3,
    )


@pytest.fixture(scope="module")
def real_pca_subset(real_scaled) -> np.ndarray:
    """3,000 real images projected on 10 principal components (fitted on those rows)."""
    images = real_scaled[0][:3000]
    return PCA(10, random_state=0).fit_transform(images)


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")
def test_affinity_equals_scikit_learn_nearest_neighbors_affinity(blobs):
    X, _ = blobs
    reference = SpectralClustering(
        n_clusters=6, affinity="nearest_neighbors", n_neighbors=10, random_state=0
    ).fit(X).affinity_matrix_
    ours = knn_affinity(X, n_neighbors=10)
    assert ours.shape == reference.shape
    assert abs(ours - reference).max() == 0
    assert set(np.unique(ours.data)) <= {0.5, 1.0}


def _dense_eigenpairs(affinity, k):
    lap, dd = laplacian(sp.csr_matrix(affinity), normed=True, return_diag=True)
    values, vectors = eigh(lap.toarray())
    return values[:k], vectors[:, :k], dd


def _min_cosine_of_subspaces(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine of the principal angles between two column spaces (1 = same space)."""
    a = np.linalg.qr(a)[0]
    b = np.linalg.qr(b)[0]
    return float(np.linalg.svd(a.T @ b, compute_uv=False).min())


def test_lobpcg_amg_finds_the_smallest_eigenpairs_of_the_normalized_laplacian(real_pca_subset):
    affinity = knn_affinity(real_pca_subset[:800], n_neighbors=10)
    embedding, values = spectral_embedding(affinity, 10, random_state=0)
    dense_values, dense_vectors, dd = _dense_eigenpairs(affinity, 10)
    np.testing.assert_allclose(values, dense_values, atol=1e-6)
    assert _min_cosine_of_subspaces(embedding * dd[:, None], dense_vectors) > 0.999


def test_disconnected_graph_gives_the_null_space(blobs):
    X, _ = blobs
    affinity = knn_affinity(X[:600], n_neighbors=10)
    with pytest.warns(UserWarning, match="not fully connected"):
        embedding, values = spectral_embedding(affinity, 6, random_state=0)
    dense_values, dense_vectors, dd = _dense_eigenpairs(affinity, 6)
    np.testing.assert_allclose(values, dense_values, atol=1e-6)
    assert _min_cosine_of_subspaces(embedding * dd[:, None], dense_vectors) > 0.999


def test_arpack_and_lobpcg_amg_agree(real_pca_subset):
    affinity = knn_affinity(real_pca_subset, n_neighbors=10)
    amg, amg_values = spectral_embedding(affinity, 10, eigen_solver="lobpcg-amg", random_state=0)
    arpack, arpack_values = spectral_embedding(affinity, 10, eigen_solver="arpack", random_state=0)
    np.testing.assert_allclose(amg_values, arpack_values, atol=1e-6)
    assert _min_cosine_of_subspaces(amg, arpack) > 0.999


@pytest.mark.filterwarnings("ignore:the affinity graph is not fully connected")
def test_recovers_planted_blobs(blobs):
    X, planted = blobs
    model = FastSpectralClustering(n_clusters=6, random_state=0).fit(X)
    assert adjusted_rand_score(planted, model.labels_) > 0.95
    assert model.labels_.shape == (X.shape[0],)
    assert model.embedding_.shape == (X.shape[0], 6)
    assert sp.issparse(model.affinity_matrix_)


@pytest.mark.filterwarnings("ignore:the affinity graph is not fully connected")
def test_recovers_two_moons_where_kmeans_cannot():
    X, planted = make_moons(n_samples=1000, noise=0.05, random_state=0)
    spectral = FastSpectralClustering(n_clusters=2, random_state=0).fit_predict(X)
    kmeans = KMeans(2, n_init=10, random_state=0).fit_predict(X)
    assert adjusted_rand_score(planted, spectral) > 0.95
    assert adjusted_rand_score(planted, kmeans) < 0.6


def test_same_seed_same_labels(real_pca_subset):
    X = real_pca_subset[:1500]
    first = FastSpectralClustering(n_clusters=10, random_state=7).fit_predict(X)
    second = FastSpectralClustering(n_clusters=10, random_state=7).fit_predict(X)
    np.testing.assert_array_equal(first, second)


def test_matches_scikit_learn_spectral_clustering_on_real_data(real_pca_subset):
    X = real_pca_subset
    reference = SpectralClustering(
        n_clusters=10, affinity="nearest_neighbors", random_state=0
    ).fit_predict(X)
    ours = FastSpectralClustering(n_clusters=10, random_state=0).fit_predict(X)
    # Same graph and the same eigenvectors up to solver tolerance: near-identical partitions.
    assert adjusted_rand_score(reference, ours) > 0.9


def test_rejects_bad_parameters(blobs):
    X, _ = blobs
    with pytest.raises(ValueError, match="eigen_solver"):
        FastSpectralClustering(eigen_solver="magic").fit(X)
    with pytest.raises(ValueError, match="n_clusters"):
        FastSpectralClustering(n_clusters=0).fit(X)
