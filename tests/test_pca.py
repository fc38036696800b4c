"""DaskPCA against scikit-learn's PCA and hand-computed cases."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.decomposition import PCA

from fmnist_dask.models.pca import DaskPCA


@pytest.fixture(scope="module")
def real_subset(real_scaled, dask_client):
    """20,000 real images (float32 [0, 1]), every 3rd row, chunked unevenly, on the workers."""
    X = real_scaled[0][::3][:20000]
    return X, da.from_array(X, chunks=((7000, 6000, 7000), (784,))).persist()


def test_pca_matches_sklearn_on_real_data(real_subset):
    X, dX = real_subset
    ours = DaskPCA(n_components=10).fit(dX)
    # scikit-learn on the same rows in float64 (its covariance_eigh solver for this
    # shape; exact to float64 rounding), and as it runs on the float32 array.
    ref = PCA(n_components=10).fit(X.astype(np.float64))
    ref32 = PCA(n_components=10).fit(X)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref32.explained_variance_ratio_,
                               atol=1e-3)

    assert ours.n_components_ == 10 and ours.n_samples_ == len(X)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_,
                               atol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_,
                               rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.singular_values_, ref.singular_values_, rtol=1e-4)
    np.testing.assert_allclose(ours.noise_variance_, ref.noise_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.mean_, ref.mean_, atol=1e-5)
    # Same sign convention as sklearn: the components agree as vectors, not up to sign.
    np.testing.assert_allclose(ours.components_, ref.components_, atol=2e-4)

    Z = ours.transform(dX)
    assert isinstance(Z, da.Array) and Z.chunks[0] == dX.chunks[0]
    np.testing.assert_allclose(Z.compute(), ref.transform(X), atol=2e-3)
    back = ours.inverse_transform(Z).compute()
    np.testing.assert_allclose(back, ref.inverse_transform(ref.transform(X)), atol=2e-3)


def test_whiten_matches_sklearn_and_inverts(real_subset):
    X, dX = real_subset
    X, dX = X[:5000], dX[:5000]
    ours = DaskPCA(n_components=5, whiten=True).fit(dX)
    ref = PCA(n_components=5, whiten=True).fit(X.astype(np.float64))
    Z = ours.transform(dX).compute()
    np.testing.assert_allclose(Z, ref.transform(X), atol=2e-3)
    np.testing.assert_allclose(Z.std(axis=0, ddof=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(
        ours.inverse_transform(da.from_array(Z, chunks=1000)).compute(),
        ref.inverse_transform(Z), atol=2e-3,
    )


def test_hand_computed_line_and_plane():
    # Points on the line t * (0.6, 0.8) + (1, 2): one component carries all the variance.
    t = np.arange(-5, 6, dtype=np.float64)
    X = np.column_stack([1 + 0.6 * t, 2 + 0.8 * t])
    pca = DaskPCA(n_components=2).fit(da.from_array(X, chunks=4))
    np.testing.assert_allclose(pca.mean_, [1, 2], atol=1e-12)
    np.testing.assert_allclose(pca.components_[0], [0.6, 0.8], atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance_, [t.var(ddof=1), 0], atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance_ratio_, [1, 0], atol=1e-12)
    np.testing.assert_allclose(pca.transform(da.from_array(X, chunks=4)).compute()[:, 0], t,
                               atol=1e-12)
    assert pca.noise_variance_ == 0.0


def test_large_offset_float32_stays_accurate():
    # Small variance on a large offset: X^T X - n mean mean^T in float32 (scikit-learn's
    # covariance_eigh on float32 input) cancels catastrophically; shifted sums with
    # float64 accumulation keep the float64 answer to float32 rounding of the products.
    rng = np.random.default_rng(0)
    X = (1e4 + rng.normal(size=(6000, 20)) * np.linspace(0.1, 2, 20)).astype(np.float32)
    exact = np.linalg.eigvalsh(np.cov(X.astype(np.float64).T))[::-1]
    ours = DaskPCA(n_components=20).fit(da.from_array(X, chunks=1500))
    np.testing.assert_allclose(ours.explained_variance_, exact, rtol=1e-5)
    naive = PCA(n_components=20, svd_solver="covariance_eigh").fit(X).explained_variance_
    assert np.abs(naive / exact - 1).max() > 1e-2  # the pitfall is real


def test_chunking_does_not_change_result(real_subset):
    X, _ = real_subset
    a = DaskPCA(n_components=4).fit(da.from_array(X[:6000], chunks=6000))
    b = DaskPCA(n_components=4).fit(da.from_array(X[:6000], chunks=(1000, 784)))
    # equal up to float32 rounding of the per-block products
    np.testing.assert_allclose(a.explained_variance_, b.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-5)


def test_rejects_bad_n_components():
    with pytest.raises(ValueError, match="n_components"):
        DaskPCA(n_components=5).fit(da.ones((10, 3), chunks=5))
