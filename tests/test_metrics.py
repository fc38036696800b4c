"""Distributed cluster scores against scikit-learn's on the same data."""

from __future__ import annotations

from itertools import permutations

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.metrics.cluster import contingency_matrix

from fmnist_dask import metrics


@pytest.fixture(scope="module")
def real_clustered(real_scaled):
    """3,000 real images, their k-means (k=10) labels and their true classes."""
    X, y = real_scaled[0][::23][:3000], real_scaled[1][::23][:3000]
    labels = KMeans(n_clusters=10, random_state=0, n_init=1).fit_predict(X)
    return X, labels, y


def test_sum_of_squares_matches_numpy(real_clustered):
    X, labels, _ = real_clustered
    centers = np.stack([X[labels == c].mean(axis=0) for c in range(10)])
    expected = ((X.astype(np.float64) - centers[labels]) ** 2).sum()
    got = metrics.sum_of_squares(da.from_array(X, chunks=700), labels, centers)
    assert got == pytest.approx(expected, rel=1e-12)


def test_exact_silhouette_equals_sklearn_on_real_rows(real_clustered, dask_client):
    X, labels, _ = real_clustered
    dX = da.from_array(X, chunks=(1000, 784))
    dl = da.from_array(labels, chunks=1000)
    expected = silhouette_score(X.astype(np.float64), labels)
    got = metrics.silhouette_exact(dX, dl, block_size=700)
    assert got == pytest.approx(expected, abs=1e-9)
    assert got == pytest.approx(silhouette_score(X, labels), abs=1e-6)
    got32 = metrics.silhouette_exact(dX, dl, block_size=700, dtype=np.float32)
    assert got32 == pytest.approx(expected, abs=1e-5)


def test_silhouettes_of_two_stages_at_once_keep_their_own_tasks(real_clustered, dask_client):
    # Dask puts every task of a key-name group into the span (stage) that first had one:
    # two silhouettes running at once, from two stages, must not share a group, or the
    # dashboard, the progress line and the run's timeline credit one stage with both.
    from distributed import span

    X, labels, _ = real_clustered
    held, span_ids = [], []
    for name, rows in (("first", slice(0, 1000)), ("second", slice(1000, 2000))):
        with span(name) as span_id:  # different rows: no task in common
            held.append(dask_client.compute(metrics.silhouette_samples_exact(
                da.from_array(X[rows], chunks=(500, 784)), labels[rows], block_size=250)))
        span_ids.append(span_id)
    values = dask_client.gather(held)  # both still held: their tasks stay on the scheduler
    np.testing.assert_allclose(values[1], silhouette_samples(X[1000:2000], labels[1000:2000]),
                               atol=1e-6)

    def silhouette_tasks_per_span(dask_scheduler, ids):
        spans = dask_scheduler.extensions["spans"].spans
        return [sum(sum(group.states.values()) for group in spans[i].groups
                    if group.name.startswith("silhouette")) for i in ids]

    first, second = dask_client.run_on_scheduler(silhouette_tasks_per_span, ids=span_ids)
    assert first == second > 0  # the same computation on other rows: as many tasks each


def test_exact_silhouette_pair_tasks_have_a_task_prefix_of_their_own(real_clustered):
    # The scheduler estimates a task's duration from the finished tasks of its prefix
    # (key_split of its key) and moves queued tasks to an idle worker only when that
    # estimate says it pays. The pairs (a second each on 784 pixels) shared a prefix with
    # the picks and sums beside them and with the 10-column silhouettes' pairs (ms): they
    # looked free, and in the job one worker idled while the other had 80 of them queued.
    from distributed.utils import key_split

    X, labels, _ = real_clustered
    prefixes = {}
    for data in (X, X[:, :10]):
        graph = metrics.silhouette_samples_exact(
            da.from_array(data, chunks=(700, data.shape[1])), labels, block_size=700,
        ).__dask_graph__()
        for key in graph:
            kind = "pairs" if "silhouette_pairs" in str(key) else "other"
            prefixes.setdefault(key_split(key), set()).add((kind, data.shape[1]))
    pair_prefixes = {p: kinds for p, kinds in prefixes.items()
                     if any(kind == "pairs" for kind, _ in kinds)}
    assert len(pair_prefixes) == 2, pair_prefixes  # one per width of the rows
    assert all(len(kinds) == 1 for kinds in pair_prefixes.values()), pair_prefixes


def test_exact_silhouette_samples_match_with_singletons_and_gaps():
    # Uneven chunks, a block size that does not divide n, a cluster of one row (s = 0)
    # and an unused label value (2): all as scikit-learn (which relabels 0..k-1).
    rng = np.random.default_rng(1)
    X = rng.normal(size=(517, 6))
    labels = rng.integers(0, 4, size=517)
    labels[labels == 2] = 3
    labels[10] = 5
    dX = da.from_array(X, chunks=((100, 217, 200), (6,)))
    got = metrics.silhouette_samples_exact(dX, labels, block_size=128).compute()
    np.testing.assert_allclose(got, silhouette_samples(X, labels), atol=1e-12)
    assert got[10] == 0.0


def test_silhouette_rejects_single_label():
    with pytest.raises(ValueError, match="Number of labels"):
        metrics.silhouette_exact(da.ones((10, 2), chunks=5), np.zeros(10, dtype=int))


def test_sampled_silhouette_scores_each_row_exactly(real_clustered):
    X, labels, _ = real_clustered
    dX = da.from_array(X, chunks=(1000, 784))
    est = metrics.silhouette_sampled(dX, labels, sample_size=400, random_state=0,
                                     reference_size=len(X))
    # the rows drawn, recomputed with scikit-learn against the full data
    rows = np.sort(np.random.RandomState(0).choice(len(X), size=400, replace=False))
    per_row = silhouette_samples(X.astype(np.float64), labels)
    assert est.value == pytest.approx(per_row[rows].mean(), abs=1e-9)
    assert est.method == "sampled" and est.sample_size == 400 and est.n_rows == len(X)
    assert est.ci_low < est.value < est.ci_high
    exact = per_row.mean()
    assert est.ci_low <= exact <= est.ci_high
    # finite-population correction: the interval shrinks to nothing with the whole data
    full = metrics.silhouette_sampled(dX, labels, sample_size=len(X), random_state=0,
                                      reference_size=len(X))
    assert full.method == "exact" and full.ci_low == full.ci_high
    assert full.value == pytest.approx(exact, abs=1e-9)


def test_sampled_silhouette_against_a_reference_sample_equals_sklearn(real_clustered):
    X, labels, _ = real_clustered
    dX = da.from_array(X, chunks=(700, 784))
    est = metrics.silhouette_sampled(dX, labels, sample_size=300, reference_size=1500,
                                     random_state=3, dtype=np.float64)
    # the same draws, scored by scikit-learn on the reference rows alone
    rs = np.random.RandomState(3)
    ref = np.sort(rs.choice(len(X), size=1500, replace=False))
    scored = np.sort(rs.choice(1500, size=300, replace=False))
    per_row = silhouette_samples(X[ref].astype(np.float64), labels[ref])
    assert est.value == pytest.approx(per_row[scored].mean(), abs=1e-9)
    assert (est.method, est.sample_size, est.reference_size, est.n_rows) == (
        "sampled", 300, 1500, len(X))
    # the jackknife interval: around the value, and covering the full data's silhouette
    assert est.ci_low < est.value < est.ci_high
    exact = silhouette_samples(X.astype(np.float64), labels).mean()
    assert est.ci_low <= exact <= est.ci_high
    assert est.ci_high - est.ci_low < 0.1
    # float32 products (the job's default) move the value by rounding only
    est32 = metrics.silhouette_sampled(dX, labels, sample_size=300, reference_size=1500,
                                       random_state=3, dtype=np.float32)
    assert est32.value == pytest.approx(est.value, abs=1e-5)


def test_silhouette_mode_choice(real_clustered):
    X, labels, _ = real_clustered
    dX = da.from_array(X[:1200], chunks=600)
    lab = labels[:1200]
    auto_exact = metrics.silhouette(dX, lab, exact_max_rows=5000)
    assert auto_exact.method == "exact" and auto_exact.sample_size == 1200
    assert auto_exact.value == pytest.approx(silhouette_score(X[:1200].astype(float), lab),
                                             abs=1e-9)
    auto_sampled = metrics.silhouette(dX, lab, exact_max_rows=1000, sample_size=300,
                                      random_state=1)
    assert auto_sampled.method == "sampled" and auto_sampled.sample_size == 300
    assert auto_sampled.as_dict()["ci_low"] < auto_sampled.value
    with pytest.raises(ValueError, match="mode"):
        metrics.silhouette(dX, lab, mode="fast")


def test_contingency_and_external_scores_equal_sklearn(real_clustered):
    _, labels, y = real_clustered
    table = metrics.contingency(da.from_array(y, chunks=700), da.from_array(labels, chunks=700),
                                10, 10)
    np.testing.assert_array_equal(table, contingency_matrix(y, labels))
    scores = metrics.external_scores(table)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y, labels), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(y, labels), abs=1e-12)
    assert 0.1 < scores["acc"] <= 1.0
    # numpy labels work too, and give the same table
    np.testing.assert_array_equal(metrics.contingency(y, labels, 10, 10), table)


def test_accuracy_is_the_best_matching():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, (y + 1) % 4, rng.integers(0, 4, 200))
    table = metrics.contingency(y, pred, 4, 4)
    best = max(sum(table[i, p[i]] for i in range(4)) for p in permutations(range(4)))
    assert metrics.external_scores(table)["acc"] == pytest.approx(best / 200)
    # hand-computed: clusters are the classes renamed -> perfect scores
    perfect = metrics.external_scores(np.array([[0, 5, 0], [3, 0, 0], [0, 0, 2]]))
    assert perfect == {"acc": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}


@pytest.mark.parametrize(
    "y, pred",
    [
        ([0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]),  # one cluster
        ([0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 3]),  # more clusters than classes
        ([1, 1, 1, 1], [0, 0, 0, 0]),  # both constant
    ],
)
def test_external_scores_degenerate_cases(y, pred):
    y, pred = np.array(y), np.array(pred)
    table = metrics.contingency(y, pred, y.max() + 1, pred.max() + 1)
    scores = metrics.external_scores(table)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(y, pred), abs=1e-12)


def test_contingency_rejects_out_of_range():
    with pytest.raises(ValueError, match="range"):
        metrics.contingency(np.array([0, 3]), np.array([0, 1]), 3, 2)


def test_clusters_are_named_by_their_largest_class_and_its_share():
    from fmnist_dask.stages.evaluate import content_cluster_names

    # Cluster 0: 30 bags and 20 sandals; 1: all trousers; 2: 40 shirts, 10 bags; 3: empty.
    table = np.zeros((10, 4), dtype=np.int64)
    table[8, 0], table[5, 0] = 30, 20  # Bag, Sandal
    table[1, 1] = 25  # Trouser
    table[6, 2], table[8, 2] = 40, 10  # Shirt, Bag
    assert content_cluster_names(table) == ["0: Bag 60%", "1: Trouser 100%", "2: Shirt 80%",
                                            "3"]
