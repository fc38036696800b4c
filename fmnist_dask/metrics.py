"""Cluster scores computed across the Dask workers.

Internal scores (no labels): the sum of squared distances to the centres (scikit-learn's
inertia) and the silhouette, exact or sampled. External scores (held-out labels, used
only here, after fitting): clustering accuracy by Hungarian matching, NMI and ARI, all
derived from one contingency table counted block by block.

Only per-block partial results travel to the client: sums, counts, (rows x k) distance
sums for a sample, never the data or an n x n matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numba
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm
from sklearn.utils import check_random_state

from fmnist_dask._blocks import (
    SUB_ROWS,
    as_aligned_vector,
    as_row_chunked,
    block_partials,
    exact_sq_dists,
    rows_like,
    scratch,
    task_key,
    tree_sum,
    whole_array,
)
from fmnist_dask.sampling import take_rows

# --- inertia ---------------------------------------------------------------------------


def _k_sum_of_squares(xb: np.ndarray, lb: np.ndarray, centers: np.ndarray, **_: Any) -> float:
    total = 0.0
    for s in range(0, len(xb), SUB_ROWS):
        total += float(exact_sq_dists(xb[s : s + SUB_ROWS], centers, lb[s : s + SUB_ROWS]).sum())
    return total


def sum_of_squares(X: Any, labels: Any, centers: np.ndarray, split_every: int = 8) -> float:
    """Sum of squared Euclidean distances of the rows to their assigned centres.

    This is scikit-learn's ``inertia_`` (not dask-ml 2025.1's, which sums unsquared
    distances), computed exactly in float64 (differences, not the BLAS expansion).

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
        Row-chunked data.
    labels : dask.array.Array or ndarray of shape (n_samples,)
        Cluster index of each row, in ``range(len(centers))``.
    centers : ndarray of shape (n_clusters, n_features)
        The centres.
    split_every : int, default=8
        Fan-in of the tree reduction.

    Returns
    -------
    float
        The inertia, in squared units of X.
    """
    X = as_row_chunked(X)
    labels = as_aligned_vector(labels, X)
    c = np.asarray(centers, dtype=np.float64)
    parts = block_partials(_k_sum_of_squares, X, labels, consts=(c,), out_shape=())
    return float(tree_sum(parts, split_every).compute())


# --- silhouette ------------------------------------------------------------------------

#: Rows x columns of one distance tile inside a silhouette task (float32: 2 MiB).
_TILE_ROWS = 512
_TILE_COLS = 1024


def _augmented(x: np.ndarray, dtype: Any, left: bool) -> np.ndarray:
    """Rows [x, |x|^2, 1] (``left``) or [-2x, 1, |x|^2]: their products are squared distances.

    One matrix product then gives a whole tile of |a|^2 + |b|^2 - 2 a.b, instead of a product
    followed by three passes over the tile to scale it and add the norms (which cost more
    than the product itself when rows have few features, as after the PCA).
    """
    x = np.asarray(x)
    norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    out = np.empty((len(x), x.shape[1] + 2), dtype)
    # written in place: float64 copies and a stack of them took an eighth of a 5,000-row
    # pair of pixel blocks; the same values (-2x is exact in any float precision)
    body = out[:, :-2]
    body[...] = x
    if not left:
        body *= -2
    out[:, -2], out[:, -1] = (norms, 1.0) if left else (1.0, norms)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _add_tile(tile: np.ndarray, bounds: np.ndarray, labels_i: np.ndarray, both: bool,
              r_i: np.ndarray, acc_j: np.ndarray, zero: Any) -> None:  # pragma: no cover
    """Distances from a tile of squared distances, added up per cluster, in one pass.

    ``tile`` (rows of block i x columns of block j) is overwritten with its distances
    (negatives from rounding count as 0). Block j's rows are sorted by cluster: cluster c
    holds columns ``bounds[c]:bounds[c + 1]``. Adds to ``r_i[a, c]`` (float64) row a's
    distances to cluster c and, when ``both``, to ``acc_j[labels_i[a], b]`` (float32) each
    distance of column b to row a's cluster (``acc_j`` and the sums within a row in the
    tile's precision, as a product with a one-hot matrix would add them; ``zero`` is 0 in
    it). Sums run in any order (``reassoc``, so that they vectorise): the same inputs give
    the same sums.
    """
    for a in range(tile.shape[0]):
        row = tile[a]
        for b in range(row.shape[0]):
            v = row[b]
            row[b] = np.sqrt(v if v > zero else zero)
        if both:
            out = acc_j[labels_i[a]]
            for b in range(row.shape[0]):
                out[b] += row[b]
        for c in range(len(bounds) - 1):
            total = zero
            for b in range(bounds[c], bounds[c + 1]):
                total += row[b]
            r_i[a, c] += total


def _cluster_distance_sums(
    xi: np.ndarray, xj: np.ndarray, lj: np.ndarray, li: np.ndarray | None,
    k: int, dtype: Any, both: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-cluster sums of Euclidean distances between two blocks of rows.

    Returns ``(r_i, r_j)`` where ``r_i[a, c]`` is the sum over rows b of block j with
    label c of ||x_a - x_b|| (shape n_i x k) and, when ``both``, ``r_j`` the same for the
    rows of block j against block i (the distance tile is symmetric: computed once).
    """
    # Both blocks sorted by cluster: a cluster's columns are then one run of each tile,
    # added up by _add_tile in the pass that takes the square roots, instead of products
    # with one-hot matrices (4k flops a distance: more than the distance itself after the
    # PCA, where this is 1.6x faster; docs/benchmarks.md, "Exact silhouette").
    order_j = np.argsort(lj, kind="stable")
    right = _augmented(xj[order_j], dtype, left=False)
    labels_j = lj[order_j]
    if both:
        order_i = np.argsort(li, kind="stable")
        xi, labels_i = xi[order_i], li[order_i].astype(np.int64)
    else:
        labels_i = np.zeros(len(xi), np.int64)
    left = _augmented(xi, dtype, left=True)
    r_i = np.zeros((len(left), k))
    r_j = np.zeros((len(right), k)) if both else None
    for b in range(0, len(right), _TILE_COLS):
        rb = right[b : b + _TILE_COLS]
        bounds = np.searchsorted(labels_j[b : b + _TILE_COLS], np.arange(k + 1))
        for a in range(0, len(left), _TILE_ROWS):
            la = left[a : a + _TILE_ROWS]
            # tile of distances, in a reused buffer (fresh ones cost page faults)
            t = scratch("sil_dist", (len(la), len(rb)), dtype)
            np.matmul(la, rb.T, out=t)
            acc = scratch("sil_acc", (k if both else 1, len(rb)), dtype)
            acc[...] = 0
            _add_tile(t, bounds, labels_i[a : a + _TILE_ROWS], both, r_i[a : a + _TILE_ROWS],
                      acc, t.dtype.type(0))
            if both:
                r_j[b : b + _TILE_COLS] += acc.T
    if both:
        r_i[order_i] = r_i.copy()
        r_j[order_j] = r_j.copy()
    return r_i, r_j


def _pair_task(
    xi: np.ndarray, li: np.ndarray, xj: np.ndarray, lj: np.ndarray, k: int, dtype: Any,
    same: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    if not same:
        return _cluster_distance_sums(xi, xj, lj, li, k, dtype, both=True)
    # A block against itself: each pair of its parts once, both ways (the distances are
    # symmetric), 15 of the 25 part pairs of a 5,000-row block.
    sums = np.zeros((len(xi), k))
    for p in range(0, len(xi), _TILE_COLS):
        for q in range(p, len(xi), _TILE_COLS):
            part_p, part_q = slice(p, p + _TILE_COLS), slice(q, q + _TILE_COLS)
            r_p, r_q = _cluster_distance_sums(xi[part_p], xi[part_q], li[part_q], li[part_p],
                                              k, dtype, both=q != p)
            sums[part_p] += r_p
            if q != p:
                sums[part_q] += r_q
    return sums, None


def _first(pair: tuple) -> np.ndarray:
    return pair[0]


def _second(pair: tuple) -> np.ndarray:
    return pair[1]


def _add_all(*parts: np.ndarray) -> np.ndarray:
    return np.sum(parts, axis=0)


def _tree_add(parts: list, split_every: int, key: tuple) -> Any:
    """Sum a list of delayed arrays with a tree of fan-in ``split_every``; keys (*key, ...)."""
    add = dask.delayed(_add_all, pure=True)
    level = 0
    while len(parts) > 1:
        parts = [add(*parts[i : i + split_every], dask_key_name=(*key, level, i))
                 for i in range(0, len(parts), split_every)]
        level += 1
    return parts[0]


def _silhouette_from_sums(
    sums: np.ndarray, labels: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Per-row silhouette from per-cluster distance sums, as scikit-learn defines it.

    a = mean distance to the other members of the row's cluster, b = smallest mean
    distance to another non-empty cluster, s = (b - a) / max(a, b); s = 0 for rows
    alone in their cluster.
    """
    n_rows = len(labels)
    own_size = counts[labels]
    a = sums[np.arange(n_rows), labels] / np.maximum(own_size - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = sums / counts[None, :]
    means[:, counts == 0] = np.inf
    means[np.arange(n_rows), labels] = np.inf
    b = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (b - a) / np.maximum(a, b)
    s[own_size <= 1] = 0.0
    return np.nan_to_num(s)


def _check_labels(labels: da.Array | np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Cluster sizes (bincount) and k; checks scikit-learn's 2 <= n_labels <= n - 1."""
    lab = labels if isinstance(labels, da.Array) else whole_array(labels)
    lo, hi = dask.compute(lab.min(), lab.max())
    if lo < 0:
        raise ValueError("labels must be non-negative integers")
    k = int(hi) + 1
    counts = np.asarray(da.bincount(lab, minlength=k).compute(), dtype=np.float64)
    n_labels = int((counts > 0).sum())
    if not 2 <= n_labels <= n - 1:
        raise ValueError(
            f"Number of labels is {n_labels}. Valid values are 2 to n_samples - 1 (inclusive)"
        )
    return counts, k


def silhouette_samples_exact(
    X: Any, labels: Any, *, block_size: int = 5000, dtype: Any = np.float64,
    split_every: int = 8,
) -> da.Array:
    """Exact silhouette of every row, computed across the workers.

    The n x n distance matrix is never stored: row blocks are paired (each unordered
    pair once, the tile being symmetric), each pair task returns per-cluster distance
    sums for the rows of both blocks (n_block x k), and a tree adds them per block.
    O(n^2 d) work, O(n k) results.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
    labels : dask.array.Array or ndarray of shape (n_samples,)
        Non-negative integer cluster labels.
    block_size : int, default=5000
        Rows per block of the pairing (X is rechunked to it); about
        (n / block_size)^2 / 2 tasks.
    dtype : {numpy.float64, numpy.float32}, default=float64
        Precision of the distance products. float64 matches scikit-learn (which upcasts)
        to ~1e-12; float32 takes about half the time and agrees to ~1e-7
        (docs/benchmarks.md, "Exact silhouette").
    split_every : int, default=8

    Returns
    -------
    dask.array.Array of shape (n_samples,), float64
        Lazy; chunked by ``block_size``.
    """
    X = as_row_chunked(X)
    n = X.shape[0]
    labels = as_aligned_vector(labels, X)
    counts, k = _check_labels(labels, n)
    X = X.rechunk({0: block_size})
    labels = labels.rechunk((X.chunks[0],))
    xs = list(X.to_delayed().ravel())
    ls = list(labels.to_delayed().ravel())
    nb = len(xs)
    # Keys named after this computation (see task_key), and one name per kind of task: the
    # scheduler expects a task to take as long as earlier ones whose key starts with the
    # same word. Pair tasks (a second on the pixels) named like the sums and picks beside
    # them (microseconds) looked nearly free, so it never moved them off the worker that
    # held their blocks while the other worker idled (docs/benchmarks.md, session 14).
    parts = (X.name, labels.name, k, np.dtype(dtype).str, split_every)
    pairs = task_key(f"silhouette_pairs_{np.dtype(dtype).name}_d{X.shape[1]}", *parts)
    rows, sums, name = (task_key(f"silhouette_{kind}", *parts)
                        for kind in ("rows", "sums", "blocks"))
    task = dask.delayed(_pair_task, pure=True, nout=None)
    contrib: list[list] = [[] for _ in range(nb)]
    for i in range(nb):
        for j in range(i, nb):
            pair = task(xs[i], ls[i], xs[j], ls[j], k, dtype, i == j,
                        dask_key_name=(pairs, i, j))
            contrib[i].append(dask.delayed(_first, pure=True)(
                pair, dask_key_name=(rows, i, j)))
            if j != i:
                contrib[j].append(dask.delayed(_second, pure=True)(
                    pair, dask_key_name=(rows, j, i)))
    finish = dask.delayed(_silhouette_from_sums, pure=True)
    blocks = [
        da.from_delayed(
            finish(_tree_add(contrib[i], split_every, (sums, i)), ls[i], counts,
                   dask_key_name=(name, i)),
            shape=(X.chunks[0][i],), dtype=np.float64, name=f"{name}-{i}",
        )
        for i in range(nb)
    ]
    return da.concatenate(blocks)


def silhouette_exact(
    X: Any, labels: Any, *, block_size: int = 5000, dtype: Any = np.float64,
) -> float:
    """Exact mean silhouette, equal to ``sklearn.metrics.silhouette_score(X, labels)``.

    See :func:`silhouette_samples_exact` for the algorithm and parameters.

    Returns
    -------
    float
        Mean silhouette in [-1, 1].
    """
    s = silhouette_samples_exact(X, labels, block_size=block_size, dtype=dtype)
    return float(s.mean().compute())


def _k_sample_sums(
    xb: np.ndarray, lb: np.ndarray, sample: np.ndarray, k: int, dtype: Any, **_: Any
) -> np.ndarray:
    r, _ = _cluster_distance_sums(sample, xb, lb, None, k, dtype, both=False)
    return r


def _k_reference_sums(
    xb: np.ndarray, cb: np.ndarray, left: np.ndarray, n_columns: int, dtype: Any, **_: Any
) -> np.ndarray:
    """Distance sums from the scored rows to a block of reference rows, per column id.

    ``left`` holds the scored rows augmented (:func:`_augmented`, ``left=True``); ``cb``
    gives each reference row its column (jackknife group * k + cluster). The block is
    sorted by column so that each column is a run of the tile's columns, added with one
    ``reduceat``: a one-hot product would cost 2 * n_columns flops per distance, more
    than the distance itself when the rows have few features (PCA-10, 100 columns).
    Returns shape (n_scored, n_columns).
    """
    order = np.argsort(cb, kind="stable")
    cols = cb[order]
    right = _augmented(xb[order], dtype, left=False)
    out = np.zeros((len(left), n_columns))
    for a in range(0, len(left), _TILE_ROWS):
        la = left[a : a + _TILE_ROWS]
        for b in range(0, len(right), _TILE_COLS):
            rb = right[b : b + _TILE_COLS]
            t = scratch("sil_dist", (len(la), len(rb)), dtype)
            np.matmul(la, rb.T, out=t)
            np.maximum(t, 0.0, out=t)
            np.sqrt(t, out=t)
            c = cols[b : b + len(rb)]  # sorted: each column id is one run
            runs = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
            out[a : a + len(la), c[runs]] += np.add.reduceat(t, runs, axis=1)
    return out


@dataclass(frozen=True)
class SilhouetteEstimate:
    """A silhouette value and how it was obtained.

    Attributes
    ----------
    value : float
        Mean silhouette (exact, or the sample mean).
    ci_low, ci_high : float
        Confidence interval of the mean (equal to ``value`` when exact).
    sample_size : int
        Rows whose silhouette was computed (n_rows when exact).
    n_rows : int
        Rows in the data.
    method : {"exact", "sampled"}
    confidence : float
        Level of the interval.
    reference_size : int
        Rows the scored rows' mean distances were taken over (n_rows: every row).
    """

    value: float
    ci_low: float
    ci_high: float
    sample_size: int
    n_rows: int
    method: str
    confidence: float
    reference_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict, for metrics tables and manifests."""
        return asdict(self)


#: Groups of the reference rows for the jackknife interval of the sampled silhouette.
JACKKNIFE_GROUPS = 10
#: Reference rows per block of the sampled silhouette's distance products.
_REFERENCE_BLOCK = 4096


def silhouette_sampled(
    X: Any, labels: Any, sample_size: int, random_state: Any = None,
    confidence: float = 0.95, *, reference_size: int = 50_000, dtype: Any = np.float64,
    split_every: int = 8,
) -> SilhouetteEstimate:
    """Silhouette estimated from a uniform sample of rows, with a confidence interval.

    ``reference_size`` rows are drawn uniformly without replacement and ``sample_size`` of
    them are scored: each scored row's a and b are its mean distances to the reference
    rows of each cluster. The value is therefore scikit-learn's
    ``silhouette_samples(X[reference], labels[reference])`` averaged over the scored rows,
    and its cost, O(sample_size * reference_size * d), does not grow with the data (at 1.12
    million raw-pixel rows, scoring 10,000 rows against every row took three quarters of
    the job's score time). The interval is a grouped jackknife (:data:`JACKKNIFE_GROUPS`
    groups of reference rows, each left out in turn with the scored rows among them), so
    it covers both which rows were scored and which were the reference.

    With ``reference_size >= n_samples`` every row is the reference: each scored value is
    then the row's exact silhouette, the only error is which rows were drawn, and the
    interval is the normal one with the finite-population correction,
    ``mean +- z * sd / sqrt(m) * sqrt(1 - m / n)``. Cost O(m n d).

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
    labels : dask.array.Array or ndarray of shape (n_samples,)
    sample_size : int
        Rows scored (capped at the reference size).
    random_state : int, RandomState or None
    confidence : float, default=0.95
    reference_size : int, default=50_000
        Rows the mean distances are taken over (capped at n_samples).
    dtype : numpy dtype, default=float64
        Precision of the dot products (see :func:`silhouette_samples_exact`).
    split_every : int, default=8

    Returns
    -------
    SilhouetteEstimate
    """
    X = as_row_chunked(X)
    n = X.shape[0]
    labels = as_aligned_vector(labels, X)
    counts, k = _check_labels(labels, n)
    n_ref = int(min(reference_size, n))
    m = int(min(sample_size, n_ref))
    if m < 2:
        raise ValueError("sample_size must be at least 2")
    rs = check_random_state(random_state)
    if n_ref == n:
        return _silhouette_against_all(X, labels, counts, k, m, rs, confidence, dtype,
                                       split_every)
    ref_rows = np.sort(rs.choice(n, size=n_ref, replace=False))
    scored = np.sort(rs.choice(n_ref, size=m, replace=False))
    groups = rs.permutation(n_ref) % JACKKNIFE_GROUPS
    # The reference rows stay on the workers; only the scored rows travel (as a constant).
    ref_x = take_rows(X, ref_rows).rechunk({0: _REFERENCE_BLOCK}).persist()
    ref_labels = np.asarray(take_rows(labels, ref_rows).compute(), dtype=np.int64)
    sample = np.asarray(take_rows(ref_x, scored).compute())
    # one column per (group, cluster): one pass gives every jackknife replicate's sums
    columns = groups * k + ref_labels
    parts = block_partials(
        _k_reference_sums, ref_x, rows_like(columns, ref_x),
        consts=(_augmented(sample, dtype, left=True), JACKKNIFE_GROUPS * k, dtype),
        out_shape=(m, JACKKNIFE_GROUPS * k),
    )
    group_sums = tree_sum(parts, split_every).compute().reshape(m, JACKKNIFE_GROUPS, k)
    group_counts = np.bincount(columns, minlength=JACKKNIFE_GROUPS * k).reshape(
        JACKKNIFE_GROUPS, k).astype(np.float64)
    sums, ref_counts = group_sums.sum(axis=1), group_counts.sum(axis=0)
    own = ref_labels[scored]
    mean = float(_silhouette_from_sums(sums, own, ref_counts).mean())
    replicates = []
    for g in range(JACKKNIFE_GROUPS):
        keep = groups[scored] != g
        replicates.append(_silhouette_from_sums(
            sums[keep] - group_sums[keep, g], own[keep], ref_counts - group_counts[g]).mean())
    reps = np.asarray(replicates)
    var = (JACKKNIFE_GROUPS - 1) / JACKKNIFE_GROUPS * float(((reps - reps.mean()) ** 2).sum())
    half = norm.ppf(0.5 + confidence / 2) * math.sqrt(var)
    return SilhouetteEstimate(mean, mean - half, mean + half, m, n, "sampled", confidence,
                              n_ref)


def _silhouette_against_all(
    X: da.Array, labels: da.Array, counts: np.ndarray, k: int, m: int,
    rs: np.random.RandomState, confidence: float, dtype: Any, split_every: int,
) -> SilhouetteEstimate:
    """The exact silhouette of ``m`` random rows (every row is the reference)."""
    n = X.shape[0]
    rows = np.sort(rs.choice(n, size=m, replace=False))
    sample, sample_labels = dask.compute(take_rows(X, rows), take_rows(labels, rows))
    parts = block_partials(
        _k_sample_sums, X, labels, consts=(np.asarray(sample), k, dtype), out_shape=(m, k),
    )
    sums = tree_sum(parts, split_every).compute()
    s = _silhouette_from_sums(sums, np.asarray(sample_labels, dtype=np.int64), counts)
    mean = float(s.mean())
    if m == n:
        return SilhouetteEstimate(mean, mean, mean, m, n, "exact", confidence, n)
    half = norm.ppf(0.5 + confidence / 2) * s.std(ddof=1) / math.sqrt(m) * math.sqrt(1 - m / n)
    return SilhouetteEstimate(mean, float(mean - half), float(mean + half), m, n, "sampled",
                              confidence, n)


def silhouette(
    X: Any, labels: Any, mode: Literal["auto", "exact", "sampled"] = "auto", *,
    exact_max_rows: int = 100_000, sample_size: int = 10_000, reference_size: int = 50_000,
    random_state: Any = None, confidence: float = 0.95, dtype: Any = np.float64,
) -> SilhouetteEstimate:
    """Silhouette, exact or sampled.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
    labels : dask.array.Array or ndarray of shape (n_samples,)
    mode : {"auto", "exact", "sampled"}, default="auto"
        ``"auto"`` is exact when ``n_samples <= exact_max_rows``, sampled otherwise.
    exact_max_rows : int, default=100_000
        Threshold of ``"auto"``. The exact cost grows as n^2: see docs/benchmarks.md for
        the measured times at 70,000 rows.
    sample_size : int, default=10_000
        Rows scored by the sampled estimate.
    reference_size : int, default=50_000
        Rows the sampled estimate takes the mean distances over
        (see :func:`silhouette_sampled`).
    random_state : int, RandomState or None
        Seed of the sample.
    confidence : float, default=0.95
    dtype : numpy dtype, default=float64
        Precision of the dot products.

    Returns
    -------
    SilhouetteEstimate
    """
    if mode not in ("auto", "exact", "sampled"):
        raise ValueError(f"mode must be 'auto', 'exact' or 'sampled', got {mode!r}")
    n = X.shape[0]
    if mode == "exact" or (mode == "auto" and n <= exact_max_rows):
        value = silhouette_exact(X, labels, dtype=dtype)
        return SilhouetteEstimate(value, value, value, n, n, "exact", confidence, n)
    return silhouette_sampled(X, labels, sample_size, random_state, confidence,
                              reference_size=reference_size, dtype=dtype)


# --- external scores -------------------------------------------------------------------


def _k_contingency(
    _xb: np.ndarray, yt: np.ndarray, yp: np.ndarray, n_true: int, n_pred: int, **_: Any
) -> np.ndarray:
    flat = yt.astype(np.int64) * n_pred + yp.astype(np.int64)
    return np.bincount(flat, minlength=n_true * n_pred).reshape(n_true, n_pred)


def contingency(y_true: Any, y_pred: Any, n_true: int, n_pred: int) -> np.ndarray:
    """Contingency table counted block by block.

    Parameters
    ----------
    y_true : dask.array.Array or ndarray of shape (n_samples,)
        Class labels in ``range(n_true)``.
    y_pred : dask.array.Array or ndarray of shape (n_samples,)
        Cluster labels in ``range(n_pred)``.
    n_true, n_pred : int
        Numbers of classes and of clusters (rows and columns of the table).

    Returns
    -------
    ndarray of shape (n_true, n_pred), int64
        ``table[c, k]`` = number of rows of class c in cluster k (the orientation of
        ``sklearn.metrics.cluster.contingency_matrix(y_true, y_pred)``).
    """
    ref = y_pred if isinstance(y_pred, da.Array) else y_true
    if not isinstance(ref, da.Array):
        ref = whole_array(ref)
    yt = as_aligned_vector(y_true, ref[:, None], "y_true")
    yp = as_aligned_vector(y_pred, ref[:, None], "y_pred")
    lo, hi_t, hi_p = dask.compute(da.minimum(yt.min(), yp.min()), yt.max(), yp.max())
    if lo < 0 or hi_t >= n_true or hi_p >= n_pred:
        raise ValueError(f"labels must lie in range(n_true={n_true}) and range(n_pred={n_pred})")
    # The kernels run per row block of a (n, 0) placeholder aligned with the labels.
    dummy = da.zeros((yt.shape[0], 0), chunks=(yt.chunks[0], 0), dtype=np.int8)
    parts = block_partials(
        _k_contingency, dummy, yt, yp, consts=(n_true, n_pred), out_shape=(n_true, n_pred),
        dtype=np.int64,
    )
    return parts.sum(axis=0, split_every=8).compute().astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of a labelling given its class counts, as scikit-learn's."""
    pi = counts[counts > 0].astype(np.float64)
    if pi.size == 0:
        return 1.0
    total = pi.sum()
    return float(-np.sum((pi / total) * (np.log(pi) - math.log(total))))


def _mutual_info(c: np.ndarray) -> float:
    """Mutual information (nats) of a contingency table, as scikit-learn's formula."""
    pi, pj = c.sum(axis=1), c.sum(axis=0)
    if pi.size == 1 or pj.size == 1:
        return 0.0
    nzx, nzy = np.nonzero(c)
    nz = c[nzx, nzy].astype(np.float64)
    total = float(c.sum())
    log_outer = -np.log((pi[nzx] * pj[nzy]).astype(np.float64)) + 2 * math.log(total)
    mi = nz / total * (np.log(nz) - math.log(total)) + nz / total * log_outer
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def external_scores(table: np.ndarray) -> dict[str, float]:
    """Clustering accuracy, NMI and ARI from a contingency table.

    Parameters
    ----------
    table : ndarray of shape (n_true, n_pred)
        Counts as returned by :func:`contingency`.

    Returns
    -------
    dict
        ``acc``: fraction of rows on the best one-to-one matching of clusters to classes
        (Hungarian algorithm; unmatched clusters count as errors); ``nmi``: normalized
        mutual information with the arithmetic mean of the entropies (scikit-learn's
        default); ``ari``: adjusted Rand index. Both equal scikit-learn's functions on
        the labels behind the table.
    """
    c = np.asarray(table, dtype=np.int64)
    n = int(c.sum())
    rows, cols = linear_sum_assignment(c, maximize=True)
    acc = float(c[rows, cols].sum()) / n

    # NMI as sklearn.metrics.normalized_mutual_info_score (arithmetic mean), on the
    # classes and clusters that occur (empty rows/columns of the table are dropped).
    a, b = c.sum(axis=1), c.sum(axis=0)
    present = c[a > 0][:, b > 0]
    if present.shape[0] == present.shape[1] == 1 or present.size == 0:
        nmi = 1.0
    else:
        mi = _mutual_info(present)
        nmi = 0.0 if mi == 0 else mi / ((_entropy(a) + _entropy(b)) / 2)

    # ARI exactly as sklearn.metrics.adjusted_rand_score (pair confusion, Python ints).
    sum_squares = int((c.astype(object) ** 2).sum())
    sum_a2 = int((a.astype(object) ** 2).sum())
    sum_b2 = int((b.astype(object) ** 2).sum())
    tp = sum_squares - n
    fp = sum_b2 - sum_squares
    fn = sum_a2 - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        ari = 1.0
    else:
        ari = 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
    return {"acc": acc, "nmi": float(nmi), "ari": float(ari)}
