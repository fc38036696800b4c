"""Sampling, Gaussian mixture, k-NN label extension and t-SNE on a real LocalCluster."""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
import pytest
from dask.utils import key_split
from scipy import stats
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from fmnist_dask._blocks import per_block, rows_like
from fmnist_dask.models.extend import KNeighborsExtension
from fmnist_dask.models.gmm import (
    fit_gmm,
    gmm_summary,
    predict_blocks,
    score_blocks,
    score_samples_blocks,
)
from fmnist_dask.models.tsne import (
    OverlappedFFTGradient,
    TSNEEmbedding,
    _fused_descent_class,
    _slim_reference,
    subsample_trustworthiness,
)
from fmnist_dask.sampling import (
    choose_sample_indices,
    default_sample_size,
    take_rows,
    uniform_row_sample,
)


@pytest.fixture(scope="module")
def projected(real_scaled) -> tuple[np.ndarray, np.ndarray]:
    """8,000 real images on 10 principal components, and their labels (evaluation only)."""
    images, labels = real_scaled
    return PCA(10, random_state=0).fit_transform(images[:8000]), labels[:8000]


# --- sampling ---------------------------------------------------------------------------------


def test_default_sample_size_keeps_small_data_whole():
    assert default_sample_size(60_000) == 60_000
    assert default_sample_size(70_000) == 70_000
    assert default_sample_size(70_001) == 70_000
    assert default_sample_size(5_000_000) == 70_000
    assert default_sample_size(500, cap=100) == 100


def test_indices_are_reproducible_unique_sorted_and_exact_size():
    first = choose_sample_indices(1_000_000, 70_000, random_state=42)
    second = choose_sample_indices(1_000_000, 70_000, random_state=42)
    other = choose_sample_indices(1_000_000, 70_000, random_state=43)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    assert first.shape == (70_000,) and first.dtype == np.int64
    assert np.all(np.diff(first) > 0)
    assert first[0] >= 0 and first[-1] < 1_000_000
    np.testing.assert_array_equal(choose_sample_indices(500, None, 0), np.arange(500))


def test_indices_are_uniform():
    # 4,000 draws of 50 rows out of 200: every row should be picked about 1,000 times.
    counts = np.zeros(200)
    rng = np.random.default_rng(0)
    for _ in range(4000):
        counts[choose_sample_indices(200, 50, rng)] += 1
    assert counts.sum() == 4000 * 50
    # Chi-square goodness of fit of the per-row counts against the uniform expectation.
    assert stats.chisquare(counts).pvalue > 0.001
    # Positions within a sample are uniform too (no bias to the head or tail of the data).
    sample = choose_sample_indices(1_000_000, 20_000, random_state=1)
    assert stats.kstest(sample / 1_000_000, "uniform").pvalue > 0.001


def test_sample_is_taken_on_the_workers_and_matches_numpy(dask_client, projected):
    X, labels = projected
    dX = da.from_array(X, chunks=(1000, 10))
    indices, sample = uniform_row_sample(dX, size=1234, random_state=5)
    assert sample.shape == (1234, 10)
    np.testing.assert_array_equal(dask_client.compute(sample).result(), X[indices])
    # The same indices take the aligned rows of another array with other chunks.
    dlabels = da.from_array(labels, chunks=3000)
    np.testing.assert_array_equal(take_rows(dlabels, indices).compute(), labels[indices])
    again, _ = uniform_row_sample(dX, size=1234, random_state=5)
    np.testing.assert_array_equal(indices, again)


def test_rows_are_taken_inside_each_block_of_a_derived_array():
    # dask's X[indices] shuffles; on lazily scaled pixels that held every block at once
    # (the 16x evaluate peak). take_rows must be one task per block, fused with its producer.
    x = np.arange(600, dtype=np.float32).reshape(200, 3)
    derived = da.from_array(x, chunks=(30, 3)) * 2
    every_block = np.array([0, 29, 30, 60, 95, 120, 150, 199])  # a row or two in each block
    taken = take_rows(derived, every_block)
    np.testing.assert_array_equal(taken.compute(), x[every_block] * 2)
    (optimized,) = dask.optimize(taken)
    names = [key_split(k) for k in optimized.__dask_graph__()]
    assert not any("shuffle" in name for name in names), names
    assert "mul" not in names  # the scaling ran inside the selecting task
    # one selecting task per block; beside them only the source blocks and the indices
    assert names.count("select_rows") == 7 and set(names) == {"select_rows", "array", "value"}

    # Only the blocks holding selected rows are computed: of pixels streamed from files,
    # a few rows would otherwise read every file.
    few = np.array([0, 29, 30, 95, 199])
    taken = take_rows(derived, few)
    np.testing.assert_array_equal(taken.compute(), x[few] * 2)
    assert taken.chunks[0] == (2, 1, 1, 1)
    (optimized,) = dask.optimize(taken)
    produced = [k for k in optimized.__dask_graph__() if "mul" in key_split(k)]
    assert len(produced) == 4  # of the 7 blocks
    assert take_rows(derived, np.array([], dtype=np.int64)).compute().shape == (0, 3)


def test_whole_data_when_size_reaches_the_rows(projected):
    X, _ = projected
    dX = da.from_array(X, chunks=(1000, 10))
    indices, sample = uniform_row_sample(dX, size=None, random_state=0)
    np.testing.assert_array_equal(indices, np.arange(X.shape[0]))
    assert sample is dX


def test_sampling_rejects_unknown_chunks_and_bad_indices():
    x = da.from_array(np.arange(10.0), chunks=5)
    unknown = x[x > 2]
    with pytest.raises(ValueError, match="unknown"):
        uniform_row_sample(unknown, 3, 0)
    with pytest.raises(ValueError, match="sorted"):
        take_rows(x, np.array([3, 1]))
    with pytest.raises(IndexError):
        take_rows(x, np.array([1, 10]))


def _busy(block: np.ndarray, seconds: float) -> np.ndarray:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return np.full(len(block), time.time())


def _times_model(block: np.ndarray, model: float) -> np.ndarray:
    return block[:, 0] * model


def test_shipped_models_and_rows_go_ahead_of_lower_priority_tasks(dask_client):
    # A model, row indices or rows sent to the workers for per-block work are tasks that
    # the scheduler sends in priority order. As bare values in the graph (dask.delayed(x),
    # da.from_array) they were data to produce, which the scheduler holds back while the
    # workers have tasks queued, whatever the priorities: a fit's predictions waited for
    # every silhouette task sent before them.
    x = da.random.RandomState(0).random_sample((64_000, 4), chunks=(1_000, 4)).persist()
    xs = x.compute()
    with dask.annotate(priority=-1):  # ~1 s of work for each of the two workers
        flood = x.map_blocks(_busy, 0.03, drop_axis=1, dtype=float).persist()
    indices = np.arange(5, 64_000, 7)
    whole = np.arange(64_000.0)
    with dask.annotate(priority=0):
        predicted, taken, aligned = dask.compute(
            per_block(_times_model, x, np.float64(2.0), n_features=4, dtype=float),
            take_rows(x, indices), rows_like(whole, x))
    done = time.time()
    np.testing.assert_array_equal(predicted, xs[:, 0] * 2.0)
    np.testing.assert_array_equal(taken, xs[indices])
    np.testing.assert_array_equal(aligned, whole)
    assert done < flood.max().compute()  # finished while the flood still ran


# --- Gaussian mixture -------------------------------------------------------------------------


def test_gmm_matches_scikit_learn_on_the_same_sample_and_seed(dask_client, projected):
    X, _ = projected
    X = X[:5000]
    dX = da.from_array(X, chunks=(1500, 10))
    indices, sample = uniform_row_sample(dX, size=2000, random_state=11)
    sample = sample.compute()
    gmm = fit_gmm(sample, n_components=10, covariance_type="full", random_state=0)
    with threadpool_limits(1, "blas"):  # as fit_gmm: threaded BLAS only slows these products
        reference = GaussianMixture(10, covariance_type="full", random_state=0)
        reference.fit(X[indices])

    summary = gmm_summary(gmm, sample)
    assert summary["avg_log_likelihood"] == pytest.approx(reference.score(X[indices]), rel=1e-12)
    assert summary["bic"] == pytest.approx(reference.bic(X[indices]), rel=1e-12)
    assert summary["converged"]

    labels = dask_client.compute(predict_blocks(gmm, dX)).result()
    np.testing.assert_array_equal(labels, reference.predict(X))
    log_density = dask_client.compute(score_samples_blocks(gmm, dX)).result()
    np.testing.assert_allclose(log_density, reference.score_samples(X), rtol=1e-10)
    mean_ll = dask_client.compute(score_blocks(gmm, dX)).result()
    # float32 data: scikit-learn's own mean is summed in float32, so average in float64 here.
    expected = reference.score_samples(X).astype(np.float64).mean()
    assert float(mean_ll) == pytest.approx(expected, rel=1e-10)
    assert float(mean_ll) == pytest.approx(reference.score(X), rel=1e-6)


def test_gmm_covariance_type_is_configurable(projected):
    X, _ = projected
    diag = fit_gmm(X[:2000], n_components=4, covariance_type="diag", random_state=0)
    assert diag.covariances_.shape == (4, 10)


# --- k-NN extension ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob_data() -> tuple[np.ndarray, np.ndarray]:
    """5,000 points in 5 separated 10-D blobs, with their planted labels."""
    return make_blobs(n_samples=5000, n_features=10, centers=5, cluster_std=1.5, random_state=2)


def test_extension_keeps_sample_labels_exactly_even_for_duplicates(dask_client, blob_data):
    X, _ = blob_data
    X = X.copy()
    X[10] = X[11] = X[12]  # identical points ...
    dX = da.from_array(X, chunks=(700, 10))
    indices, sample = uniform_row_sample(dX, size=1500, random_state=3)
    indices = np.union1d(indices, [10, 11, 12])
    sample = X[indices]
    # ... and arbitrary sample labels (not a function of position), ten classes
    sample_labels = np.random.default_rng(0).integers(0, 10, size=indices.size) * 7
    sample_labels[np.searchsorted(indices, [10, 11, 12])] = [7, 14, 21]  # ... labelled apart

    ext = KNeighborsExtension(n_neighbors=10).fit(sample, sample_labels, sample_indices=indices)
    labels = dask_client.compute(ext.predict(dX)).result()
    assert labels.shape == (X.shape[0],)
    np.testing.assert_array_equal(labels[indices], sample_labels)
    assert set(np.unique(labels)) <= set(np.unique(sample_labels))


def test_extension_sample_indices_may_come_in_any_order(blob_data):
    X, planted = blob_data
    indices = np.array([40, 3, 17, 4000, 2500])
    ext = KNeighborsExtension(n_neighbors=3).fit(X[indices], planted[indices] + 100, indices)
    labels = ext.predict(da.from_array(X, chunks=(1000, 10))).compute()
    np.testing.assert_array_equal(labels[indices], planted[indices] + 100)


def test_extension_labels_out_of_sample_rows_like_a_knn_classifier(dask_client, blob_data):
    X, planted = blob_data
    dX = da.from_array(X, chunks=(800, 10))
    indices, sample = uniform_row_sample(dX, size=1000, random_state=4)
    sample = sample.compute()
    # Sample labels as a clustering would give them: the planted blobs under other names.
    sample_labels = (planted[indices] + 3) % 5
    ext = KNeighborsExtension(n_neighbors=5).fit(sample, sample_labels, sample_indices=indices)
    labels = dask_client.compute(ext.predict(dX)).result()
    outside = np.setdiff1d(np.arange(X.shape[0]), indices)
    assert np.mean(labels[outside] == (planted[outside] + 3) % 5) > 0.99
    reference = KNeighborsClassifier(n_neighbors=5).fit(sample, sample_labels).predict(X[outside])
    assert np.mean(labels[outside] == reference) > 0.99


def test_relabelled_extension_equals_a_fresh_fit_with_the_new_labels(blob_data):
    X, planted = blob_data
    indices = np.array([40, 3, 17, 4000, 2500, 9, 1200, 77])  # unsorted on purpose
    ext = KNeighborsExtension(n_neighbors=3).fit(X[indices], planted[indices], indices)
    new_labels = np.array([5, 6, 5, 7, 6, 5, 7, 6])
    moved = ext.relabelled(new_labels)
    fresh = KNeighborsExtension(n_neighbors=3).fit(X[indices], new_labels, indices)
    dX = da.from_array(X, chunks=(1000, 10))
    got = moved.predict(dX).compute()
    np.testing.assert_array_equal(got, fresh.predict(dX).compute())
    np.testing.assert_array_equal(got[indices], new_labels)
    np.testing.assert_array_equal(ext.predict(dX).compute()[indices], planted[indices])


def test_extension_vote_hand_cases():
    sample = np.array([[0.0], [1.0], [1.1], [5.0], [5.0]])
    labels = np.array([0, 1, 1, 2, 3])
    ext = KNeighborsExtension(n_neighbors=3).fit(sample, labels)
    # 0.9: neighbours 1.0 (1), 1.1 (1), 0.0 (0) -> majority 1.
    # 0.3: neighbours 0.0 (0), 1.0 (1), 1.1 (1) -> majority 1 beats the nearest.
    # 0.0: identical to a sample point -> its label although the vote says 1.
    got = ext.predict(np.array([[0.9], [0.3], [0.0]]))
    np.testing.assert_array_equal(got, [1, 1, 0])
    # A 1-1 tie between labels goes to the nearer neighbour.
    tie = KNeighborsExtension(n_neighbors=2).fit(np.array([[0.0], [1.0]]), np.array([4, 9]))
    np.testing.assert_array_equal(tie.predict(np.array([[0.2], [0.8]])), [4, 9])


# --- t-SNE ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tsne_fit(projected) -> tuple[np.ndarray, TSNEEmbedding]:
    X, _ = projected
    small = X[:1000]
    # Shorter optimisation than the default 250 + 750 steps keeps the test quick.
    model = TSNEEmbedding(early_exaggeration_iter=150, n_iter=300, n_jobs=1, random_state=0)
    return small, model.fit(small)


def test_tsne_keeps_neighbours(tsne_fit):
    small, model = tsne_fit
    assert model.embedding_.shape == (small.shape[0], 2)
    assert np.isfinite(model.kl_divergence_)
    assert trustworthiness(small, model.embedding_, n_neighbors=5) > 0.9
    # A random layout is far from trustworthy: the measure can fail.
    noise = np.random.default_rng(0).normal(size=model.embedding_.shape)
    assert trustworthiness(small, noise, n_neighbors=5) < 0.6


def test_tsne_is_seeded(projected):
    X, _ = projected
    params = {"early_exaggeration_iter": 50, "n_iter": 50, "random_state": 3}
    first = TSNEEmbedding(**params).fit(X[:400]).embedding_
    second = TSNEEmbedding(**params).fit(X[:400]).embedding_
    np.testing.assert_allclose(first, second)


def test_tsne_transform_blocks_places_new_rows_next_to_their_twins(
    dask_client, tsne_fit, projected
):
    small, model = tsne_fit
    X, _ = projected
    # Full data: the fitted rows (positions 0..999) plus 100 slightly moved copies of some.
    twins = np.arange(0, 1000, 10)
    moved = small[twins] + np.random.default_rng(0).normal(scale=1e-3, size=(twins.size, 10))
    full = np.vstack([small, moved])
    coords = dask_client.compute(
        model.transform_blocks(da.from_array(full, chunks=(400, 10)), np.arange(1000))
    ).result()
    assert coords.shape == (full.shape[0], 2)
    np.testing.assert_array_equal(coords[:1000], model.embedding_)
    # Each new row lands much closer to its twin than the typical distance between points.
    gap = np.linalg.norm(coords[1000:] - model.embedding_[twins], axis=1)
    spread = np.linalg.norm(model.embedding_ - model.embedding_.mean(axis=0), axis=1).mean()
    assert np.median(gap) < 0.05 * spread


def test_subsample_trustworthiness_is_scikit_learn_on_the_subsample(tsne_fit):
    small, model = tsne_fit
    whole = subsample_trustworthiness(small, model.embedding_, n_points=5000)
    assert whole == pytest.approx(trustworthiness(small, model.embedding_, n_neighbors=5))
    part = subsample_trustworthiness(small, model.embedding_, n_points=700, random_state=1)
    keep = np.sort(np.random.RandomState(1).choice(small.shape[0], 700, replace=False))
    assert part == pytest.approx(trustworthiness(small[keep], model.embedding_[keep]))


def test_tsne_is_opentsne_with_the_same_settings(projected):
    import openTSNE

    X, _ = projected
    params = {"early_exaggeration_iter": 50, "n_iter": 50, "random_state": 1}
    ours = TSNEEmbedding(**params).fit(X[:400]).embedding_
    reference = np.asarray(openTSNE.TSNE(neighbors="exact", **params).fit(X[:400].astype(float)))
    reference = reference - (reference.max(axis=0) + reference.min(axis=0)) / 2
    np.testing.assert_allclose(ours, reference, atol=1e-8)


@pytest.fixture(scope="module")
def fft_problem(projected) -> tuple[np.ndarray, object, np.ndarray]:
    """3,000 real rows, their openTSNE affinities and an embedding after 30 steps."""
    import openTSNE

    X = np.ascontiguousarray(projected[0][:3000], dtype=np.float64)
    embedding = openTSNE.TSNE(neighbors="exact", early_exaggeration_iter=30, n_iter=0,
                              negative_gradient_method="fft", random_state=0).fit(X)
    return X, embedding.affinities.P, np.ascontiguousarray(embedding, dtype=np.float64)


@pytest.mark.parametrize("n_jobs", [1, 2, 3])
def test_overlapped_fft_gradient_is_opentsnes_whatever_the_split(fft_problem, n_jobs):
    from openTSNE.tsne import kl_divergence_fft

    _, P, embedding = fft_problem
    fft = {"n_interpolation_points": 3, "min_num_intervals": 50, "ints_in_interval": 4.0}
    _, reference = kl_divergence_fft(embedding.copy(), P, 1, fft, n_jobs=1)
    with OverlappedFFTGradient() as objective:
        results = []
        for share in (0.0, 0.3, 0.9, 1.0):
            objective.head_share = share
            results.append(objective(embedding.copy(), P, 1, fft, n_jobs=n_jobs)[1])
        # The split moves towards balance after each step, within [0, 1].
        assert 0.0 <= objective.head_share <= 1.0
    scale = np.abs(reference).max()
    for gradient in results:
        # Rows split between the threads in any way give the same gradient, bit for bit...
        np.testing.assert_array_equal(gradient, results[0])
    # ...which is openTSNE's to rounding (the attraction is summed per row before the
    # repulsion is added, openTSNE adds each term to the repulsion).
    np.testing.assert_allclose(results[0], reference, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("exaggeration", [12.0, None])
def test_fused_gradient_descent_moves_points_as_opentsnes_optimiser(fft_problem, exaggeration):
    from openTSNE.tsne import gradient_descent, kl_divergence_fft

    _, P, start = fft_problem
    params = {"n_iter": 25, "objective_function": kl_divergence_fft, "learning_rate": 250.0,
              "momentum": 0.5, "exaggeration": exaggeration, "max_step_norm": 0.5,
              "ints_in_interval": 4.0, "n_jobs": 1}
    theirs_error, theirs = gradient_descent()(start.copy(), P, **params)
    fused = _fused_descent_class()()
    ours_error, ours = fused(start.copy(), P, **params)
    # Step-norm clipping bites (0.5 units), and still the same points to the last bit.
    np.testing.assert_array_equal(ours, theirs)
    assert ours_error == theirs_error
    # P is given back as it came (the exaggeration is undone).
    np.testing.assert_array_equal(P.data, fft_problem[1].data)
    assert fused.gains is not None and not np.all(fused.gains == 1)


def test_tsne_fft_fit_is_opentsne_with_the_same_settings(fft_problem):
    import pickle

    import openTSNE

    X, _, _ = fft_problem
    params = {"early_exaggeration_iter": 20, "n_iter": 20, "random_state": 1,
              "negative_gradient_method": "fft", "n_jobs": 2}
    ours = TSNEEmbedding(**params).fit(X)
    reference = np.asarray(openTSNE.TSNE(neighbors="exact", **params).fit(X))
    reference = reference - (reference.max(axis=0) + reference.min(axis=0)) / 2
    # 40 steps from the same start: the rounding of the gradient's sums has not grown yet
    # (t-SNE is chaotic: after 200 steps the maps differ visibly, equally good).
    np.testing.assert_allclose(ours.embedding_, reference, rtol=0, atol=1e-8)
    # The fitted model keeps openTSNE's own FFT method (transform prepares its grid only for
    # that one) and no thread pool: it pickles and places new rows.
    assert ours.reference_.gradient_descent_params["negative_gradient_method"] == "fft"
    again = pickle.loads(pickle.dumps(ours))
    np.testing.assert_array_equal(again.transform(X[:20]), ours.transform(X[:20]))


def test_tsne_fitted_estimator_is_small_and_transforms_like_the_full_reference(projected):
    import pickle

    import openTSNE

    X, _ = projected
    full = openTSNE.TSNE(
        neighbors="exact", early_exaggeration_iter=50, n_iter=50, random_state=0
    ).fit(X[:1000].astype(np.float64))
    slim = _slim_reference(full)
    new = X[1000:1100].astype(np.float64)
    np.testing.assert_array_equal(np.asarray(slim.transform(new)), np.asarray(full.transform(new)))
    # Without the affinity matrix and neighbour lists the pickle is a fraction of the full one.
    assert len(pickle.dumps(slim)) < 0.5 * len(pickle.dumps(full))
