"""DaskKMeans against scikit-learn's KMeans, hand-computed cases and itself."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import euclidean_distances

from fmnist_dask.models.kmeans import DaskKMeans


@pytest.fixture(autouse=True)
def _on_the_cluster(dask_client):
    """Every test runs on the shared 2-worker LocalCluster (single-threaded BLAS)."""
    return dask_client


def _true_inertia(X: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> float:
    diff = X.astype(np.float64) - centers[labels].astype(np.float64)
    return float((diff**2).sum())


@pytest.fixture(scope="module")
def raw_subset(real_scaled):
    """15,000 real images (784 pixels in [0, 1]), every 4th of train + test."""
    return real_scaled[0][::4][:15000]


@pytest.fixture(scope="module")
def pca10(real_scaled):
    """All 70,000 real images projected on 10 principal components (scikit-learn)."""
    return PCA(n_components=10, random_state=0).fit_transform(real_scaled[0])


@pytest.fixture(scope="module")
def pca10_dask(pca10, dask_client):
    """The projection as a dask array on the workers, 4 blocks."""
    return da.from_array(pca10, chunks=(17500, 10)).persist()


@pytest.fixture(scope="module")
def raw_subset_dask(raw_subset, dask_client):
    return da.from_array(raw_subset, chunks=(3750, 784)).persist()


@pytest.mark.parametrize("seed", [0, 1])
def test_inertia_within_1pct_of_sklearn_raw(raw_subset, raw_subset_dask, seed):
    X = raw_subset
    ours = DaskKMeans(n_clusters=10, random_state=seed).fit(raw_subset_dask)
    ref = KMeans(n_clusters=10, random_state=seed).fit(X)
    labels = ours.labels_.compute()
    # inertia_ is the true sum of squared distances of the returned labels and centres
    np.testing.assert_allclose(ours.inertia_, _true_inertia(X, labels, ours.cluster_centers_),
                               rtol=1e-9)
    assert ours.inertia_ <= 1.01 * ref.inertia_
    assert np.bincount(labels, minlength=10).min() > 0
    assert ours.cluster_centers_.shape == (10, 784)
    assert ours.cluster_centers_.dtype == np.float32
    assert 1 <= ours.n_iter_ <= ours.max_iter


@pytest.mark.parametrize("seed", [0, 1])
def test_inertia_within_1pct_of_sklearn_pca(pca10, pca10_dask, seed):
    ours = DaskKMeans(n_clusters=10, random_state=seed).fit(pca10_dask)
    ref = KMeans(n_clusters=10, random_state=seed).fit(pca10)
    assert ours.inertia_ <= 1.01 * ref.inertia_
    np.testing.assert_allclose(
        ours.inertia_, _true_inertia(pca10, ours.labels_.compute(), ours.cluster_centers_),
        rtol=1e-9,
    )


def test_same_iterates_as_sklearn_lloyd_from_the_same_start(real_scaled):
    # The bounded (Hamerly) iterations skip rows that cannot move: they must follow
    # exactly the path of plain Lloyd, i.e. scikit-learn's from the same start.
    X = real_scaled[0][60000:65000]
    init = X[:10].astype(np.float64)
    ours = DaskKMeans(n_clusters=10, init=init).fit(da.from_array(X, chunks=(1300, 784)))
    ref = KMeans(n_clusters=10, init=init, n_init=1, algorithm="lloyd").fit(X)
    assert ours.n_iter_ == ref.n_iter_
    np.testing.assert_array_equal(ours.labels_.compute(), ref.labels_)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)


def test_hand_computed_two_groups():
    X = np.array([[0, 0], [0, 2], [10, 0], [10, 2], [10, 4]], dtype=np.float64)
    km = DaskKMeans(n_clusters=2, random_state=0).fit(da.from_array(X, chunks=2))
    order = np.argsort(km.cluster_centers_[:, 0])
    np.testing.assert_allclose(km.cluster_centers_[order], [[0, 1], [10, 2]])
    # squared distances: 1 + 1 for the first group, 4 + 0 + 4 for the second
    assert km.inertia_ == pytest.approx(10.0)
    labels = km.labels_.compute()
    assert labels.dtype == np.int32
    assert len(set(labels[:2])) == 1 and len(set(labels[2:])) == 1 and labels[0] != labels[2]
    new = np.array([[1.0, 1.0], [9.0, 9.0]])
    pred = km.predict(da.from_array(new, chunks=1)).compute()
    assert pred[0] == labels[0] and pred[1] == labels[2]
    np.testing.assert_allclose(km.transform(da.from_array(new, chunks=1)).compute(),
                               euclidean_distances(new, km.cluster_centers_))
    assert km.score(da.from_array(X, chunks=5)) == pytest.approx(-10.0)


@pytest.mark.parametrize("max_local_bytes", [None, 0])  # in one task, across the workers
@pytest.mark.parametrize("d", [3, 40])  # without and with the distance bounds
def test_empty_cluster_relocated_like_sklearn(d, max_local_bytes):
    # The third start is far from every row: it gets no row in the first iteration and is
    # moved to the row farthest from its centre, as scikit-learn does.
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (300, d)), rng.normal(8, 1, (300, d))])
    init = np.stack([np.zeros(d), np.full(d, 8.0), np.full(d, 100.0)])
    ours = DaskKMeans(n_clusters=3, init=init, random_state=0,
                      max_local_bytes=max_local_bytes).fit(da.from_array(X, chunks=128))
    ref = KMeans(n_clusters=3, init=init, n_init=1, algorithm="lloyd").fit(X)
    assert ours.n_empty_relocations_ >= 1
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, atol=1e-10)
    np.testing.assert_array_equal(ours.labels_.compute(), ref.labels_)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    assert ours.n_iter_ == ref.n_iter_


def test_same_seed_same_chunks_identical(pca10):
    dX = da.from_array(pca10[:10000], chunks=(2500, 10))
    a = DaskKMeans(n_clusters=10, n_init=3, max_iter=30, random_state=7).fit(dX)
    b = DaskKMeans(n_clusters=10, n_init=3, max_iter=30, random_state=7).fit(dX)
    np.testing.assert_array_equal(a.labels_.compute(), b.labels_.compute())
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_


def test_one_or_two_workers_same_result(pca10, dask_client):
    from distributed import Client, LocalCluster

    X = pca10[:10000]
    dX = da.from_array(X, chunks=(2500, 10))
    two = DaskKMeans(n_clusters=10, n_init=3, max_iter=30, random_state=3).fit(dX)
    labels_two = two.labels_.compute()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as one_worker, \
            dask.config.set(scheduler=one_worker):
        one = DaskKMeans(n_clusters=10, n_init=3, max_iter=30, random_state=3).fit(dX)
        labels_one = one.labels_.compute()
    np.testing.assert_array_equal(labels_one, labels_two)
    np.testing.assert_array_equal(one.cluster_centers_, two.cluster_centers_)
    assert one.inertia_ == pytest.approx(two.inertia_, rel=1e-12)


def test_runs_and_random_init(pca10):
    X = pca10[:5000]
    dX = da.from_array(X, chunks=(1250, 10))
    five = DaskKMeans(n_clusters=10, n_init=5, random_state=0).fit(dX)
    assert len(five.inertia_per_run_) == 5
    assert five.inertia_ == five.inertia_per_run_.min()
    # every run's inertia is the exact sum of squares of its own converged centres
    assert five.inertia_ == pytest.approx(
        _true_inertia(X, five.labels_.compute(), five.cluster_centers_), rel=1e-9)
    auto = DaskKMeans(n_clusters=10, random_state=0).fit(dX)
    assert len(auto.inertia_per_run_) == 10  # "auto" for 10 features
    rnd = DaskKMeans(n_clusters=10, init="random", n_init=3, random_state=0).fit(dX)
    ref = KMeans(n_clusters=10, random_state=0).fit(X)
    assert rnd.inertia_ <= 1.05 * ref.inertia_


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="n_samples"):
        DaskKMeans(n_clusters=5).fit(da.ones((3, 2), chunks=2))
    with pytest.raises(ValueError, match="init"):
        DaskKMeans(n_clusters=2, init="bogus").fit(da.ones((6, 2), chunks=2))
    km = DaskKMeans(n_clusters=2, random_state=0).fit(da.from_array(np.eye(4), chunks=2))
    with pytest.raises(ValueError, match="features"):
        km.predict(da.ones((3, 5), chunks=3))


@pytest.mark.parametrize("data", ["pca10", "raw", "raw uint8 scaled lazily"])
def test_one_task_and_distributed_paths_identical(data, pca10, raw_subset, real_arrays,
                                                   monkeypatch):
    # Same data, chunks and seed: the fit inside one task (small data) and the fit across
    # the workers (large data) must agree bit for bit. 12 blocks with split_every=4 also
    # exercise a level of the ordered tree on the workers.
    from fmnist_dask.models import kmeans as kmeans_module

    if data == "pca10":
        dX = da.from_array(pca10[:24000], chunks=(2000, 10)).persist()
    elif data == "raw":
        dX = da.from_array(raw_subset[:6000], chunks=(500, 784)).persist()
    else:  # as the job: uint8 pixels on the workers, scaled per block inside the fit
        pixels = da.from_array(real_arrays["test"][0][:6000], chunks=(500, 784)).persist()
        dX = pixels.astype(np.float32) / np.float32(255)
    distributed_fits = []
    real_passes = kmeans_module._ClusterPasses

    def recording_passes(*args, **kwargs):
        distributed_fits.append(1)
        return real_passes(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "_ClusterPasses", recording_passes)
    params = dict(n_clusters=10, n_init=3, random_state=5, split_every=4)
    one = DaskKMeans(**params).fit(dX)  # default threshold: this X fits in one task
    assert not distributed_fits
    across = DaskKMeans(**params, max_local_bytes=0).fit(dX)
    assert distributed_fits == [1]
    np.testing.assert_array_equal(one.labels_.compute(), across.labels_.compute())
    np.testing.assert_array_equal(one.cluster_centers_, across.cluster_centers_)
    np.testing.assert_array_equal(one.inertia_per_run_, across.inertia_per_run_)
    assert one.inertia_ == across.inertia_
    assert one.n_iter_ == across.n_iter_
    assert one.n_candidates_ == across.n_candidates_
    assert one.n_empty_relocations_ == across.n_empty_relocations_
    # the number of threads of the one-task fit changes nothing either
    single = DaskKMeans(**params, n_jobs=1).fit(dX)
    np.testing.assert_array_equal(single.cluster_centers_, one.cluster_centers_)
    assert single.inertia_ == one.inertia_


@pytest.mark.parametrize("max_local_bytes", [None, 0])  # in one task, across the workers
def test_uint8_divided_in_the_kernels_equals_scaled_floats(max_local_bytes, real_arrays):
    # The job fits the uint8 pixels with divide_by=255: each kernel converts the rows it
    # reads. Same IEEE operations as scaling every block first, so the same fit bit for bit.
    pixels = da.from_array(real_arrays["test"][0][:6000], chunks=(500, 784)).persist()
    scaled = pixels.astype(np.float32) / np.float32(255)
    params = dict(n_clusters=10, n_init=3, random_state=2, max_local_bytes=max_local_bytes)
    lazy = DaskKMeans(**params, divide_by=255.0).fit(pixels)
    eager = DaskKMeans(**params).fit(scaled)
    np.testing.assert_array_equal(lazy.cluster_centers_, eager.cluster_centers_)
    np.testing.assert_array_equal(lazy.inertia_per_run_, eager.inertia_per_run_)
    assert lazy.n_iter_ == eager.n_iter_ and lazy.cluster_centers_.dtype == np.float32
    np.testing.assert_array_equal(lazy.labels_.compute(), eager.labels_.compute())
    np.testing.assert_array_equal(lazy.transform(pixels).compute(),
                                  eager.transform(scaled).compute())
    assert lazy.score(pixels) == eager.score(scaled)
    # and the inertia is scikit-learn's on the scaled pixels
    x = real_arrays["test"][0][:6000] / np.float32(255)
    assert lazy.inertia_ == pytest.approx(
        _true_inertia(x, lazy.labels_.compute(), lazy.cluster_centers_), rel=1e-9)


def test_rows_converted_by_the_kernels_are_counted_alike_on_both_paths(real_arrays,
                                                                         dask_client):
    # k-means converts only the rows it reads; the stage's pixel_passes count those bytes,
    # in the one-task fit (blocks on a thread pool) as across the workers.
    from distributed import span

    from fmnist_dask import passes

    pixels = da.from_array(real_arrays["test"][0][:6000], chunks=(500, 784)).persist()
    counted = {}
    for path, max_local_bytes in (("one task", None), ("across", 0)):
        with span(f"kmeans-{path}") as span_id:
            model = DaskKMeans(n_clusters=10, n_init=3, random_state=2, divide_by=255.0,
                               max_local_bytes=max_local_bytes).fit(pixels)
            model.labels_.compute()
        counted[path] = passes.span_counts(dask_client, span_id)
    assert counted["one task"] == counted["across"]
    full = passes.summary(counted["across"], pixels.nbytes)["passes"]
    # every row converted by: the moments, k-means|| (first distances + 5 rounds), the
    # candidate weights, the first Lloyd step, the inertia and the labels; later Lloyd
    # steps convert only rows whose bounds do not settle them
    assert 10 <= full < 10 + model.n_iter_
    assert counted["across"].get("read", 0) == 0


def test_streamed_fit_reads_its_files_per_worker_and_matches_the_one_task_fit(
        real_arrays, tmp_path, dask_client):
    # Pixels above max_local_bytes that are not in worker memory (files read lazily, as
    # the job's streamed pixels): each worker reads its own contiguous share of the files
    # in one task per pass. Same fit, bit for bit, as the one-task path on the same blocks;
    # 20 blocks with split_every=4 put a level of the ordered tree inside each group.
    from distributed import get_task_stream

    from fmnist_dask import pixelfiles

    images = real_arrays["test"][0][:10000]
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"part-{i:02d}.parquet")
        pixelfiles.write_part(pa.table({"pixels": pixelfiles.to_arrow(
            images[i * 500 : (i + 1) * 500])}), paths[-1])
    pixels = da.concatenate([
        da.from_delayed(dask.delayed(pixelfiles.read_pixels, pure=True)(str(p), 500),
                        shape=(500, 784), dtype=np.uint8) for p in paths])
    params = dict(n_clusters=10, n_init=3, random_state=4, split_every=4, divide_by=255.0)
    one = DaskKMeans(**params).fit(pixels)
    with get_task_stream(dask_client) as stream:
        streamed = DaskKMeans(**params, max_local_bytes=0).fit(pixels)
    np.testing.assert_array_equal(one.cluster_centers_, streamed.cluster_centers_)
    np.testing.assert_array_equal(one.inertia_per_run_, streamed.inertia_per_run_)
    assert (one.n_iter_, one.n_candidates_) == (streamed.n_iter_, streamed.n_candidates_)
    np.testing.assert_array_equal(one.labels_.compute(), streamed.labels_.compute())
    # a pass is one task per worker thread, not tasks per block; each group's Lloyd steps
    # run where its state is
    names = [r["key"][0] for r in stream.data if isinstance(r["key"], tuple)]
    assert not [n for n in names if "read_pixels" in n]  # no block read as a task of its own
    steps = [r for r in stream.data if str(r["key"][0]).startswith("kmeans-stream-step")]
    rounds = len(steps) // 2  # Lloyd steps until the last of the 3 runs converged
    assert len(steps) == 2 * rounds and rounds >= streamed.n_iter_
    workers = {g: {r["worker"] for r in steps if r["key"][1] == g} for g in (0, 1)}
    assert all(len(w) == 1 for w in workers.values()) and workers[0] != workers[1]
    # k-means|| and the other passes: a few dozen tasks; the labels: 2 per block
    assert len(stream.data) <= 4 * len(steps) + 60 + 2 * 20
