"""k-means across Dask workers: k-means|| initialisation, then Lloyd iterations.

Every pass over the data runs one numpy kernel per row block on the workers; only the
centres go out and only per-block partial sums and counts (k x (d + 1) numbers) come back,
added by a tree reduction. The full array never reaches the client.

Three paths, chosen by size (``max_local_bytes``) and by where X is: X that fits on a
worker is fitted inside one task there, the same kernels looping over its blocks with no
scheduler round trip per pass (at Fashion-MNIST sizes a round trip costs more than a PCA-10
Lloyd iteration's arithmetic); larger X is fitted with one round trip per pass and is never
gathered, per block when it is persisted (its blocks are in worker memory), else by one
task per worker thread per pass that reads its contiguous share of the blocks one at a time
(pixels streamed from files: a pass is a few tasks, not a few per block). All paths add the
per-block partials in the same fixed order, so they give identical fits.

Why not ``dask_ml.cluster.KMeans``: with dask-ml 2025.1.0 its ``inertia_`` is a sum of
unsquared distances, ``init='k-means++'`` raises a TypeError, and it was several times
slower than scikit-learn at Fashion-MNIST sizes (see ``docs/benchmarks.md``).

Determinism: the random draws of the initialisation use one generator per (round, block)
seeded from ``random_state``, and every reduction is a fixed tree over the blocks, so the
same seed and the same chunking give identical centres and labels however many workers
run them, and on either path. Different chunkings draw different k-means|| candidates
(as a different seed would). The one-task path runs each block's products with one BLAS
thread, as Dask workers do (their nanny sets it); the identity with the distributed path
assumes that setting there too.

The caller should persist ``X`` (``X = X.persist()``) when it fits in the workers' memory:
on the distributed path ``fit`` makes about ``2 * init_rounds + n_iter_ + 3`` passes over
it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import dask
import dask.array as da
import numba
import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from fmnist_dask import passes
from fmnist_dask._blocks import (
    SUB_ROWS,
    BlockGraphs,
    aligned_block,
    block_partials,
    block_rows,
    exact_sq_dists,
    is_persisted,
    n_cpus,
    on_worker,
    ordered_sum,
    ordered_tree,
    row_blockwise,
    scratch,
    shared_consts,
    sum_rows_in_order,
    task_key,
    validate_rows,
    worker_slots,
)
from fmnist_dask.sampling import take_rows


def _sqnorms(x: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Squared norms of the rows, accumulated in ``dtype`` (default: x's own)."""
    return np.einsum("ij,ij->i", x, x, dtype=dtype)


def _product_width(n_centers: int, n_features: int) -> int:
    """Columns of the distance product for ``n_centers`` centres: padded with zero centres
    to a multiple of 16 when that is at most 6 more.

    OpenBLAS's float32 kernels here work in columns of 16: 2,048 x 784 rows against 30
    centres took 12.2 ms, against 32 centres 9.7 ms, 10 centres 7.6 ms and 16 centres
    6.8 ms (20: 8.5 ms, 24: 8.8 ms; docs/benchmarks.md, "Big data, session 12"). Each
    product is computed the same way in either width (checked bit for bit on the data),
    so the padding changes no result. Only for many features: with few (PCA-10) the
    product is a small part of the work and the padding would only add to it.
    """
    if n_features < 64 or n_centers % 16 < 10:
        return n_centers
    return n_centers + 16 - n_centers % 16


def _products(xs: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """-2 x.c for every row and centre (rows x centres), in a scratch buffer.

    The result is overwritten by the next call in the same thread.
    """
    n, d = centers.shape
    width = _product_width(n, d)
    dtype = np.result_type(xs, centers)
    out = scratch("scores", (len(xs), width), dtype)
    # x.(-2c) is -2(x.c) bit for bit (scaling by a power of two is exact): one pass less;
    # the padding rows stay zero
    right = np.zeros((width, d), dtype)
    np.multiply(centers, -2, out=right[:n])
    return np.matmul(xs, right.T, out=out)[:, :n]


def _scores(xs: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray) -> np.ndarray:
    """||c||^2 - 2 x.c for every row and centre (rows x centres), in a scratch buffer.

    Equal to the squared distance minus ||x||^2, which does not change the ranking.
    The result is overwritten by the next call in the same thread. (The Lloyd kernels add
    ``c_sqnorm`` inside their compiled loops instead: a pass less over the product.)
    """
    out = _products(xs, centers)
    out += c_sqnorm
    return out


def _nearest(xs: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray) -> np.ndarray:
    """Index of the nearest centre per row."""
    return _scores(xs, centers, c_sqnorm).argmin(axis=1)


def _min_sqdist(xs: np.ndarray, centers: np.ndarray, xnorm: np.ndarray) -> np.ndarray:
    """Squared distance to the nearest centre, float64, via the BLAS expansion
    (``xnorm``: the rows' squared norms)."""
    d2 = _scores(xs, centers, _sqnorms(centers)).min(axis=1).astype(np.float64)
    d2 += xnorm
    return np.maximum(d2, 0.0, out=d2)


# --- the rows a kernel reads ------------------------------------------------------------


class _Rows:
    """A block's rows as the kernels see them: ``X / divide_by`` in float, on access.

    Kernels index it like an array (slices, row indices, masks; ``take`` into a scratch
    buffer) and get float rows: a view when X is float and ``divide_by`` is 1, else the
    rows converted as they are read. Integer pixels are thus never turned into a whole
    float copy per pass: late Lloyd iterations read a few percent of the rows, and
    converting a 10,000 x 784 block costs as much as reading it (docs/benchmarks.md).
    The conversion is ``float32(x) / float32(divide_by)``, the same IEEE operations as
    scaling the whole block first, so results do not depend on where it happens.
    """

    __slots__ = ("raw", "divide_by", "dtype", "_norms")

    def __init__(self, raw: np.ndarray, divide_by: float = 1.0) -> None:
        self.raw = aligned_block(raw)
        self.divide_by = divide_by
        self.dtype = float_dtype(raw.dtype)
        self._norms: dict[tuple[int, int], np.ndarray] = {}

    def sqnorms(self, start: int, xs: np.ndarray) -> np.ndarray:
        """Squared norms (float64) of ``xs``, the converted rows ``start:start+len(xs)``.

        Kept for later passes: the one-task fit holds its blocks' ``_Rows`` for the whole
        fit, and recomputing the norms in every k-means|| round took a tenth of it.
        """
        key = (start, len(xs))
        norms = self._norms.get(key)
        if norms is None:
            norms = self._norms[key] = _sqnorms(xs, np.float64)
        return norms

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    def __len__(self) -> int:
        return len(self.raw)

    def _convert(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if x.dtype == self.dtype and self.divide_by == 1.0:
            return x
        passes.note("scaled", x.nbytes)
        y = np.empty(x.shape, self.dtype) if out is None else out
        if self.divide_by == 1.0:
            np.copyto(y, x, casting="unsafe")
        elif x.dtype == np.uint8 and x.flags.c_contiguous:
            _divide_uint8(x.reshape(-1), self.dtype.type(self.divide_by), y.reshape(-1))
        else:  # one pass: numpy casts each value to the float dtype, then divides
            np.divide(x, self.dtype.type(self.divide_by), out=y, dtype=self.dtype)
        return y

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._convert(self.raw[key])

    def take(self, rows: np.ndarray, buffer: str) -> np.ndarray:
        """The rows at valid indices ``rows``, in this thread's scratch ``buffer``."""
        out = scratch(buffer, (len(rows), self.raw.shape[1]), self.dtype)
        # mode="clip": with out= and the default "raise" numpy copies through a buffer
        # (3x slower); the indices are valid by construction
        if self.raw.dtype == self.dtype and self.divide_by == 1.0:
            return np.take(self.raw, rows, axis=0, mode="clip", out=out)
        if self.raw.dtype == np.uint8 and self.divide_by != 1.0:
            passes.note("scaled", len(rows) * self.raw.shape[1])
            return _take_divide_uint8(self.raw, rows, self.dtype.type(self.divide_by), out)
        return self._convert(np.take(self.raw, rows, axis=0, mode="clip"), out)


# uint8 pixels to float rows in compiled loops: numpy's divide with a cast goes through a
# buffer (0.25 ns per value here against 0.18 ns), and a gather then a divide is two
# passes (0.35 ns against 0.21 ns; 10,000 x 784 block, ad-hoc timing, docs/benchmarks.md).
# The same IEEE operations as numpy: float(x) / float(divide_by), correctly rounded.


@numba.njit(cache=True, nogil=True)
def _divide_uint8(x: np.ndarray, divisor: Any, out: np.ndarray) -> None:  # pragma: no cover
    for i in range(x.size):
        out[i] = out.dtype.type(x[i]) / divisor


@numba.njit(cache=True, nogil=True)
def _take_divide_uint8(
    raw: np.ndarray, rows: np.ndarray, divisor: Any, out: np.ndarray
) -> np.ndarray:  # pragma: no cover (compiled)
    for r in range(rows.size):
        src = raw[rows[r]]
        for j in range(src.size):
            out[r, j] = out.dtype.type(src[j]) / divisor
    return out


def float_dtype(dtype: Any) -> np.dtype:
    """The float dtype the kernels compute in: X's own, float32 for integer data."""
    dtype = np.dtype(dtype)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def _on_rows(kernel: Callable, divide_by: float, xb: np.ndarray, *args: Any, **kwargs: Any
             ) -> Any:
    """Call ``kernel`` on the block's rows as :class:`_Rows` (bind with functools.partial)."""
    return kernel(_Rows(xb, divide_by), *args, **kwargs)


# --- kernels (run on the workers, one call per row block) -------------------------------


def _k_min_sqdist(xb: _Rows, centers: np.ndarray) -> np.ndarray:
    out = np.empty(len(xb))
    for s in range(0, len(xb), SUB_ROWS):
        xs = xb[s : s + SUB_ROWS]
        out[s : s + SUB_ROWS] = _min_sqdist(xs, centers, xb.sqnorms(s, xs))
    return out


def _k_update_min_sqdist(xb: _Rows, prev: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return np.minimum(prev, _k_min_sqdist(xb, centers))


def _vector_total(vb: np.ndarray) -> np.ndarray:
    """The block's sum of a per-row vector, shape (1,): one partial of its total."""
    return np.array([vb.sum()])


def _k_shifted_moments(xb: np.ndarray, shift: np.ndarray, **_: Any) -> np.ndarray:
    """Sum and sum of squares of (x - shift) per feature: feature variances for ``tol``."""
    out = np.zeros((2, xb.shape[1]))
    shift = shift.astype(xb.dtype)
    for s in range(0, len(xb), SUB_ROWS):
        xs = xb[s : s + SUB_ROWS]
        z = np.subtract(xs, shift, out=scratch("moments", xs.shape, xb.dtype))
        out[0] += z.sum(axis=0, dtype=np.float64)
        out[1] += np.multiply(z, z, out=z).sum(axis=0, dtype=np.float64)
    return out


def _k_sample(
    xb: np.ndarray, d2: np.ndarray, scale: float, seed: int, round_: int,
    *, block_index: int, **_: Any,
) -> np.ndarray:
    """k-means|| draw: keep each row with probability min(1, scale * d2)."""
    rng = np.random.default_rng([seed, round_, block_index])
    keep = rng.random(len(xb)) < scale * d2
    return xb[keep]


def _k_candidate_counts(
    xb: np.ndarray, candidates: np.ndarray, c_sqnorm: np.ndarray, **_: Any
) -> np.ndarray:
    counts = np.zeros(len(candidates))
    for s in range(0, len(xb), SUB_ROWS):
        near = _nearest(xb[s : s + SUB_ROWS], candidates, c_sqnorm)
        counts += np.bincount(near, minlength=len(candidates))
    return counts


# numpy's argmin and partition over a short last axis (k = 10 centres of a run) pay a
# per-row overhead larger than their arithmetic: they took a third of a PCA-10 fit
# (docs/benchmarks.md, "Big data, session 9"). These loops visit each product once and
# add the centres' squared norms as they go (as a separate numpy pass, that addition cost
# as much as the argmin: 4.5 s of a 17 s PCA-10 fit). Same results as numpy: the first
# index of the minimum, and the float32 score ``float32(product + c_sqnorm)`` that numpy's
# ``scores += c_sqnorm`` stores (the sum in float64 when ``c_sqnorm`` is float64).


@numba.njit(cache=True, nogil=True)
def _group_argmin(
    products: np.ndarray, c_sqnorm: np.ndarray, k: int
) -> np.ndarray:  # pragma: no cover (compiled)
    """Index of the smallest score within each group of ``k`` columns (the first on
    ties); the score of column j is ``products[:, j] + c_sqnorm[j]`` stored as float32."""
    n, width = products.shape
    runs = width // k
    out = np.empty((n, runs), dtype=np.int64)
    for i in range(n):
        for r in range(runs):
            c0 = r * k
            best = products.dtype.type(products[i, c0] + c_sqnorm[c0])
            at = 0
            for j in range(1, k):
                v = products.dtype.type(products[i, c0 + j] + c_sqnorm[c0 + j])
                if v < best:
                    best = v
                    at = j
            out[i, r] = at
    return out


@numba.njit(cache=True, nogil=True)
def _group_nearest_two(
    products: np.ndarray, c_sqnorm: np.ndarray, xnorm: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """Per row and group of ``k`` columns: the index of the smallest squared distance
    ``max(float64(score) + xnorm, 0)`` (the first on ties; the score as in
    :func:`_group_argmin`), that distance and the second smallest (inf for k = 1)."""
    n, width = products.shape
    runs = width // k
    label = np.empty((n, runs), dtype=np.int64)
    first = np.empty((n, runs))
    second = np.empty((n, runs))
    for i in range(n):
        xn = xnorm[i]
        for r in range(runs):
            b1 = np.inf
            b2 = np.inf
            at = 0
            for j in range(k):
                score = products.dtype.type(products[i, r * k + j] + c_sqnorm[r * k + j])
                v = max(np.float64(score) + xn, 0.0)
                if v < b1:
                    b2 = b1
                    b1 = v
                    at = j
                elif v < b2:
                    b2 = v
            label[i, r] = at
            first[i, r] = b1
            second[i, r] = b2
    return label, first, second


def _nearest_multi(
    xs: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray, runs: int
) -> np.ndarray:
    """Nearest centre of every row in each of ``runs`` stacked centre sets.

    ``centers`` is (runs * k, d): one BLAS product serves all runs. Returns the nearest
    index within its run, shape (rows, runs).
    """
    return _group_argmin(_products(xs, centers), c_sqnorm, len(centers) // runs)


# Per-row state of the Lloyd iterations, one float64 row per data row:
# [||x||^2 | label (runs) | upper bound (runs) | lower bound (runs)], or only
# [0 | label (runs)] in float32 without bounds (labels are exact there; half the memory:
# 308 MB for 7 M rows and 10 runs).
# Bounds are on Euclidean distances (Hamerly 2010): upper >= distance to the own centre,
# lower <= distance to every other centre. A row whose upper bound is below both its
# lower bound and half the distance from its centre to the nearest other centre cannot
# change cluster, so its distances are not computed. Worth it when the distance product
# dominates (many features); with few features the bookkeeping costs as much as the
# product, so every distance is computed.

def _state_dtype(bounded: bool) -> np.dtype:
    return np.dtype(np.float64 if bounded else np.float32)


#: Relative slack on the bounds, covering float32 rounding of the distance products.
_BOUND_SLACK = 1e-5
#: Use the bounds from this many features on.
_BOUNDS_MIN_FEATURES = 32


def _k_bounded_assign(
    xb: np.ndarray, state: np.ndarray | None, centers: np.ndarray, c_sqnorm: np.ndarray,
    shift: np.ndarray, max_shift: np.ndarray, half_gap: np.ndarray, active: np.ndarray,
    runs: int, bounded: bool,
) -> np.ndarray:
    """One assignment step of the active runs; returns the new state (see above).

    ``centers`` (a * k, d) are the centres of the ``a`` active runs (indices ``active``),
    ``shift`` (a * k,) how far each moved since the state was computed, ``max_shift``
    (a,) the largest move per run, ``half_gap`` (a * k,) half the distance from each
    centre to the nearest other centre of its run. Converged runs keep their columns.
    ``state=None`` computes every distance of every run (first iteration, or after a
    relocation); ``active`` must then list all runs.
    """
    n, n_act = len(xb), len(active)
    k = len(centers) // n_act
    lab_cols = 1 + active
    if state is None:
        out = np.empty((n, 1 + (3 if bounded else 1) * runs), dtype=_state_dtype(bounded))
        out[:, 0] = 0.0  # with bounds: the rows' squared norms, set below
    else:
        out = state.copy()  # the previous state is still read by the moves kernel
    if not bounded:
        for s in range(0, n, SUB_ROWS):
            near = _nearest_multi(xb[s : s + SUB_ROWS], centers, c_sqnorm, n_act)
            out[s : s + SUB_ROWS, lab_cols] = near
        return out
    up_cols, lo_cols = lab_cols + runs, lab_cols + 2 * runs
    if state is None:
        todo = np.arange(n)
    else:
        labels = out[:, lab_cols].astype(np.int64) + np.arange(n_act) * k
        upper = out[:, up_cols] + shift[labels]
        lower = out[:, lo_cols] - max_shift
        out[:, up_cols] = upper
        out[:, lo_cols] = lower
        todo = np.flatnonzero((upper > np.maximum(lower, half_gap[labels])).any(axis=1))
    xnorm = out[:, 0]
    for s in range(0, len(todo), SUB_ROWS):
        idx = todo[s : s + SUB_ROWS]
        if state is None:  # every row, in order
            xs = xb[s : s + SUB_ROWS]
            xnorm[s : s + SUB_ROWS] = xb.sqnorms(s, xs)
        else:
            xs = xb.take(idx, "rows")
        # float32 product, squared distances in float64 from here
        label, first, second = _group_nearest_two(
            _products(xs, centers), c_sqnorm, np.ascontiguousarray(xnorm[idx]), k)
        rows = idx[:, None]
        out[rows, lab_cols] = label
        out[rows, up_cols] = np.sqrt(first) * (1 + _BOUND_SLACK)
        out[rows, lo_cols] = np.sqrt(second) * (1 - _BOUND_SLACK)
    return out


@numba.njit(cache=True, nogil=True)
def _changed_rows(
    old: np.ndarray, new: np.ndarray, runs: int
) -> np.ndarray:  # pragma: no cover (compiled)
    """Rows whose label (state columns 1..runs) differs between two states, ascending.

    One pass over the label columns; as numpy expressions (casts, comparison, any,
    flatnonzero) this bookkeeping was a tenth of a PCA-10 fit.
    """
    out = np.empty(new.shape[0], dtype=np.int64)
    m = 0
    for i in range(new.shape[0]):
        for r in range(1, 1 + runs):
            if old[i, r] != new[i, r]:
                out[m] = i
                m += 1
                break
    return out[:m]


def _k_moves(
    xb: np.ndarray, old: np.ndarray | None, new: np.ndarray, k: int, runs: int
) -> np.ndarray:
    """Change of the per-cluster sums and counts caused by the rows that changed cluster.

    ``old``/``new`` are bounded-assignment states (``old=None``: nothing counted yet).
    Returns a (1, runs * k, d + 1) float64 array [sum deltas (d) | count deltas]. Only
    moved rows are touched: after the first iterations few rows move.
    """
    d = xb.shape[1]
    out = np.zeros((runs * k, d + 1))
    offsets = np.arange(runs) * k
    rows = np.arange(len(new)) if old is None else _changed_rows(old, new, runs)
    new_l = new[rows, 1 : 1 + runs].astype(np.int64)
    old_l = np.full_like(new_l, -1) if old is None else old[rows, 1 : 1 + runs].astype(np.int64)
    moved = old_l != new_l
    for s in range(0, len(rows), SUB_ROWS):
        idx = rows[s : s + SUB_ROWS]
        mv, nl, ol = moved[s : s + SUB_ROWS], new_l[s : s + SUB_ROWS], old_l[s : s + SUB_ROWS]
        w = scratch("weights", (len(idx), runs * k), xb.dtype)
        w[:] = 0
        # one +1 (new cluster) and at most one -1 (old cluster, a different column) per
        # moved row and run; runs own disjoint columns, so plain assignment is exact
        r_in, c_in = np.nonzero(mv)
        w[r_in, nl[r_in, c_in] + offsets[c_in]] = 1
        r_out, c_out = np.nonzero(mv & (ol >= 0))
        w[r_out, ol[r_out, c_out] + offsets[c_out]] = -1
        xs = xb.take(idx, "rows")
        # float32 BLAS over <= SUB_ROWS rows (weights +-1), float64 across sub-blocks.
        out[:, :d] += w.T @ xs
        out[:, d] += w.sum(axis=0, dtype=np.float64)
    return out[None]


def _k_step(
    xb: np.ndarray, *args: Any
) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step of a block: the new state and the moves it causes, in one task.

    ``args`` are the previous state's block (absent on the first step), then ``consts``
    (the arguments of :func:`_k_bounded_assign` after the state) and ``k``.

    One task per block means one reader of the block, so that a lazily computed X
    (pixels scaled from persisted uint8) is fused into this task (see :func:`_lloyd_step`)
    and its float32 block lives only while the task runs. With assignment and moves as two
    unfused tasks, every scaled block of a pass was held in worker memory (docs/benchmarks.md,
    "Scale").
    """
    *old, consts, k = args  # no state on the first step
    state = old[0] if old else None
    new = _k_bounded_assign(xb, state, *consts)
    return new, _k_moves(xb, state, new, k, consts[6])


def _k_run_inertia(
    xb: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray, runs: int, **_: Any
) -> np.ndarray:
    """Exact (float64 differences) sum of squared distances of each run, shape (runs,)."""
    k = len(centers) // runs
    out = np.zeros(runs)
    c64 = centers.astype(np.float64)
    for s in range(0, len(xb), SUB_ROWS):
        xs = xb[s : s + SUB_ROWS]
        near = _nearest_multi(xs, centers, c_sqnorm, runs)
        for r in range(runs):
            out[r] += exact_sq_dists(xs, c64, r * k + near[:, r]).sum()
    return out


def _k_farthest(
    xb: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray, m: int,
    *, row_offset: int, **_: Any,
) -> np.ndarray:
    """The block's m rows farthest from their nearest centre: [d2, row id, label, x...]."""
    labels = np.concatenate(
        [_nearest(xb[s : s + SUB_ROWS], centers, c_sqnorm) for s in range(0, len(xb), SUB_ROWS)]
    )
    x = xb[:]
    diff = x.astype(np.float64) - centers[labels]
    d2 = np.einsum("ij,ij->i", diff, diff)
    rows = np.arange(len(xb)) + row_offset
    order = np.lexsort((rows, -d2))[:m]  # farthest first, ties by row id: deterministic
    return np.column_stack([d2[order], rows[order], labels[order], x[order]])


def _divided(xb: np.ndarray, divide_by: float) -> np.ndarray:
    return _Rows(xb, divide_by)[:]


def _k_predict(xb: np.ndarray, centers: np.ndarray, c_sqnorm: np.ndarray) -> np.ndarray:
    if len(xb) == 0:
        return np.empty(0, dtype=np.int32)
    return np.concatenate(
        [_nearest(xb[s : s + SUB_ROWS], centers, c_sqnorm) for s in range(0, len(xb), SUB_ROWS)]
    ).astype(np.int32)


def _k_transform(xb: _Rows, centers: np.ndarray) -> np.ndarray:
    return euclidean_distances(xb[:], centers)


def _half_gaps(centers: np.ndarray) -> np.ndarray:
    """Half the distance from each centre to its nearest other centre, float64."""
    c = centers.astype(np.float64)
    if len(c) == 1:
        return np.full(1, np.inf)
    d2 = _sqnorms(c)[:, None] - 2 * c @ c.T + _sqnorms(c)[None, :]
    np.fill_diagonal(d2, np.inf)
    return 0.5 * np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def _state_of(step: tuple) -> np.ndarray:
    return step[0]


def _moves_of(step: tuple) -> np.ndarray:
    return step[1].reshape(1, -1)


def _lloyd_step(
    X: da.Array, state: da.Array | None, consts: tuple, width: int, k: int, divide_by: float,
) -> tuple[da.Array, da.Array]:
    """The lazy new state (n, width) and per-block moves (n_blocks, runs * k * (d + 1)) of
    one Lloyd step, computed by one :func:`_k_step` task per block of X.

    The step's blocks are (state, moves) pairs; two light tasks per block take them apart.
    X has the step as its only reader, so a lazily computed X (scaled pixels) is fused into
    the step task and never held between tasks.
    """
    runs, bounded = consts[6], consts[7]
    d = X.shape[1]
    dtype = _state_dtype(bounded)
    # Same index for X and the state (one column block each, different widths, so no
    # alignment): no contracted index, which lets dask fuse a lazy X into the step.
    old = () if state is None else (state, "ij")
    step = da.blockwise(
        partial(_on_rows, _k_step, divide_by), "ij", X, "ij", *old, consts, None, k, None,
        adjust_chunks={"j": width}, align_arrays=False, dtype=dtype,
        meta=np.empty((0, 0), dtype=dtype),
    )
    new = step.map_blocks(_state_of, dtype=dtype, meta=np.empty((0, 0), dtype=dtype))
    # moves flattened to one row per block (same number of dimensions as the step)
    parts = step.map_blocks(
        _moves_of, chunks=((1,) * X.numblocks[0], (runs * k * (d + 1),)), dtype=np.float64,
        meta=np.empty((0, 0)),
    )
    return new, parts


# --- passes over X: across the workers, or inside one task ----------------------------
#
# The fit is written once against the small interface below. ``_ClusterPasses`` runs each
# pass as a dask graph of a few tasks per block (one scheduler round trip per pass, X
# persisted); ``_StreamedPasses`` as one task per worker thread over its share of the
# blocks, read one at a time (X lazy and large); ``_LocalPasses`` runs the same kernels on
# the same blocks inside one task (no round trips, data that fits on a worker). All add the
# per-block partials with :func:`ordered_tree`/:func:`ordered_sum` (the same groups, the
# same order), so the paths give bit-for-bit the same fit.


def _call_vector(
    xb: np.ndarray, *blocks: Any, kernel: Callable, consts: tuple
) -> np.ndarray:
    *aligned, _ = blocks  # the block's position (see _blocks.row_blockwise) is not needed
    return kernel(xb, *aligned, *consts)


class _ClusterPasses:
    """Passes over a dask array as graphs run across the workers (the distributed path).

    Per-row vectors and states stay on the workers as persisted dask arrays; only
    per-block partials (reduced by :func:`ordered_tree`) and small selections come back.
    """

    def __init__(self, X: da.Array, split_every: int, divide_by: float) -> None:
        self.X, self.split_every, self.divide_by = X, split_every, divide_by
        self.n, self.d = X.shape
        self.dtype = float_dtype(X.dtype)

    def _rows(self, kernel: Callable) -> Callable:
        return partial(_on_rows, kernel, self.divide_by)

    def _finish(self, partials: da.Array) -> np.ndarray:
        return sum_rows_in_order(np.asarray(partials.compute()))[0]

    def total(
        self, kernel: Callable, *aligned: da.Array, consts: tuple = (),
        out_shape: tuple[int, ...] = (),
    ) -> np.ndarray:
        """Sum over the blocks of ``kernel``'s partials (see :func:`block_partials`)."""
        parts = block_partials(self._rows(kernel), self.X, *aligned, consts=consts,
                               out_shape=out_shape)
        return self._finish(ordered_tree(parts, self.split_every))

    def rows(
        self, kernel: Callable, *aligned: da.Array, consts: tuple = (), width: int,
        dtype: Any = np.float64,
    ) -> np.ndarray:
        """The blocks' selected rows, concatenated in block order (see :func:`block_rows`)."""
        return np.asarray(
            block_rows(self._rows(kernel), self.X, *aligned, consts=consts, width=width,
                       dtype=dtype)
            .compute()
        )

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows of X at the sorted positions ``rows``."""
        taken = take_rows(self.X, rows)
        return np.asarray(taken.map_blocks(_divided, self.divide_by, dtype=self.dtype).compute())

    def vector(
        self, kernel: Callable, *aligned: da.Array, consts: tuple = ()
    ) -> tuple[da.Array, float]:
        """A per-row float64 vector computed and kept on the workers, and its total."""
        v = row_blockwise(_call_vector, self.X, *aligned, dtype=np.float64,
                          kernel=self._rows(kernel), consts=shared_consts(consts))
        parts = v.map_blocks(_vector_total, chunks=((1,) * v.numblocks[0],), dtype=np.float64)
        # one submission: the vector stays on the workers, only its partial totals return
        v, parts = dask.persist(v, ordered_tree(parts, self.split_every))
        return v, float(self._finish(parts))

    def lloyd_step(
        self, state: da.Array | None, consts: tuple, width: int, k: int
    ) -> tuple[da.Array, np.ndarray]:
        """One Lloyd step: the new state (kept on the workers) and the summed moves."""
        new, parts = _lloyd_step(self.X, state, consts, width, k, self.divide_by)
        # One submission: the new state stays on the workers, only the moves come back.
        new, parts = dask.persist(new, ordered_tree(parts, self.split_every))
        return new, self._finish(parts)


class _LocalPasses:
    """The passes of :class:`_ClusterPasses` over blocks held in one process.

    The same kernels on the same blocks with the same block positions, partials added by
    :func:`ordered_sum`: the results are those of the distributed path, bit for bit.
    ``map`` runs a function over the block indices (a thread pool's: numpy and BLAS
    release the GIL, so blocks are processed in parallel without changing any sum).
    """

    def __init__(self, blocks: list[np.ndarray], split_every: int, map_: Callable,
                 divide_by: float) -> None:
        # aligned once here; the distributed path aligns in every kernel call instead
        self.blocks = [_Rows(b, divide_by) for b in blocks]
        self.split_every, self._map = split_every, map_
        sizes = [len(b) for b in blocks]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.n, self.d = self.offsets[-1], blocks[0].shape[1]
        self.dtype = self.blocks[0].dtype

    def _each(self, fn: Callable[[int], Any]) -> list:
        return list(self._map(fn, range(len(self.blocks))))

    def _call(self, kernel: Callable, i: int, aligned: Iterable, consts: tuple) -> np.ndarray:
        return np.asarray(kernel(
            self.blocks[i], *[a[i] for a in aligned], *consts,
            block_index=i, row_offset=self.offsets[i],
        ))

    def total(
        self, kernel: Callable, *aligned: list[np.ndarray], consts: tuple = (),
        out_shape: tuple[int, ...] = (),
    ) -> np.ndarray:
        parts = self._each(lambda i: self._call(kernel, i, aligned, consts).reshape(1, *out_shape))
        return ordered_sum(parts, self.split_every)

    def rows(
        self, kernel: Callable, *aligned: list[np.ndarray], consts: tuple = (), width: int,
        dtype: Any = np.float64,
    ) -> np.ndarray:
        parts = self._each(lambda i: self._call(kernel, i, aligned, consts))
        return np.concatenate(parts).reshape(-1, width)

    def take(self, rows: np.ndarray) -> np.ndarray:
        block = np.searchsorted(self.offsets, rows, side="right") - 1
        return np.stack([self.blocks[b][r - self.offsets[b]]
                         for b, r in zip(block.tolist(), rows.tolist(), strict=True)]).copy()

    def vector(
        self, kernel: Callable, *aligned: list[np.ndarray], consts: tuple = ()
    ) -> tuple[list[np.ndarray], float]:
        v = self._each(lambda i: kernel(self.blocks[i], *[a[i] for a in aligned], *consts))
        return v, float(ordered_sum([_vector_total(b) for b in v], self.split_every))

    def lloyd_step(
        self, state: list[np.ndarray] | None, consts: tuple, width: int, k: int
    ) -> tuple[list[np.ndarray], np.ndarray]:
        new = state if state is not None else [None] * len(self.blocks)

        def step(i: int) -> np.ndarray:
            old = () if state is None else (state[i],)
            block_state, moves = _k_step(self.blocks[i], *old, consts, k)
            # the list is this path's own: each block's old state goes as soon as it is
            # replaced, so the fit holds one state of X, not two (616 MB at 7 M rows x 10 runs)
            new[i] = block_state
            return moves.reshape(1, -1)

        moves = self._each(step)
        return new, ordered_sum(moves, self.split_every)


class _Group:
    """The contiguous blocks ``start:stop`` of X that one task of a streamed pass reads.

    ``start`` is a multiple of ``unit``: the group adds its blocks' partials ``unit`` at a
    time, which is the first level of :func:`ordered_tree` (``unit == split_every``) or
    none (``unit == 1``, at most ``split_every`` blocks in all).
    """

    def __init__(self, blocks: BlockGraphs, start: int, offsets: list[int], unit: int,
                 divide_by: float) -> None:
        self.blocks, self.start, self.offsets = blocks, start, offsets
        self.unit, self.divide_by = unit, divide_by

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, j: int) -> _Rows:
        """The group's ``j``-th block as the kernels see it, read now."""
        return _Rows(self.blocks[self.start + j], self.divide_by)

    def call(self, kernel: Callable, j: int, aligned: list, consts: tuple) -> np.ndarray:
        """``kernel`` on the ``j``-th block, as :meth:`_LocalPasses._call` calls it."""
        return np.asarray(kernel(self.read(j), *[a[j] for a in aligned], *consts,
                                 block_index=self.start + j, row_offset=self.offsets[j]))

    def level(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """The blocks' partials (each (1, ...)), added ``unit`` consecutive blocks at a time."""
        if self.unit == 1:
            return parts
        return [sum_rows_in_order(np.concatenate(parts[i : i + self.unit]))
                for i in range(0, len(parts), self.unit)]


def _g_total(group: _Group, kernel: Callable, aligned: list, consts: tuple,
             out_shape: tuple[int, ...]) -> list[np.ndarray]:
    return group.level([group.call(kernel, j, aligned, consts).reshape(1, *out_shape)
                        for j in range(len(group))])


def _g_rows(group: _Group, kernel: Callable, aligned: list, consts: tuple) -> list[np.ndarray]:
    return [group.call(kernel, j, aligned, consts) for j in range(len(group))]


def _g_take(group: _Group, rows: np.ndarray) -> np.ndarray:
    """The converted rows at the sorted global positions ``rows`` (all in this group)."""
    block = np.searchsorted(group.offsets, rows, side="right") - 1
    out = []
    for j in np.unique(block).tolist():
        out.append(group.read(j)[rows[block == j] - group.offsets[j]])
    return np.concatenate(out)


def _g_vector(group: _Group, kernel: Callable, aligned: list, consts: tuple
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    v = [kernel(group.read(j), *[a[j] for a in aligned], *consts) for j in range(len(group))]
    return v, group.level([_vector_total(b) for b in v])


def _g_step(group: _Group, state: list | None, consts: tuple, k: int
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    steps = [_k_step(group.read(j), *(() if state is None else (state[j],)), consts, k)
             for j in range(len(group))]
    return [s[0] for s in steps], group.level([_moves_of(s) for s in steps])


class _StreamedPasses:
    """The passes of :class:`_ClusterPasses` with one task per worker thread per pass,
    each reading its share of X's blocks one after another (X lazy and larger than a
    worker should hold: pixels streamed from ``cleaned/``).

    The blocks are cut into contiguous groups, one per worker thread, pinned to it; a
    per-row vector or Lloyd state stays on its group's worker as the result of the group's
    task and is the next pass's input there. A pass is thus a few tasks, not a few per
    block (205,580 tasks for the raw k-means at 7 million rows, docs/benchmarks.md). Each
    group adds its blocks' partials up to the first level of :func:`ordered_tree` (groups
    start at multiples of ``split_every`` blocks) and the client finishes with
    :func:`ordered_sum`: the same additions in the same order as the other two paths.
    """

    def __init__(self, X: da.Array, split_every: int, divide_by: float) -> None:
        self.n, self.d = X.shape
        self.dtype = float_dtype(X.dtype)
        self.split_every = split_every
        sizes = X.chunks[0]
        offsets = [0, *np.cumsum(sizes).tolist()]
        unit = split_every if len(sizes) > split_every else 1
        slots = worker_slots()
        # contiguous runs of whole units, about the same number of rows per slot
        unit_rows = np.add.reduceat(np.asarray(sizes), np.arange(0, len(sizes), unit))
        ends = np.searchsorted(np.cumsum(unit_rows), np.linspace(0, self.n, len(slots) + 1)[1:],
                               side="left") + 1
        bounds = sorted({0, len(sizes), *[min(int(e) * unit, len(sizes)) for e in ends]})
        blocks = BlockGraphs(X)
        self.groups = [
            (slot, _Group(blocks.subset(a, b), a, offsets[a:b], unit, divide_by))
            for slot, a, b in zip(slots, bounds[:-1], bounds[1:], strict=False) if b > a
        ]
        self.offsets = offsets

    def _run(self, fn: Callable, args: list[tuple | None]) -> list[Any]:
        """``fn(group, *args[g])`` for every group with args, each on its own worker
        (persisted there: lazy results, None for a group without args)."""
        name = task_key(f"kmeans-stream-{fn.__name__.removeprefix('_g_')}")
        tasks = {}
        for g, ((slot, group), a) in enumerate(zip(self.groups, args, strict=True)):
            if a is None:
                continue
            # loose: if the worker is lost the task runs elsewhere (its inputs recomputed)
            where = {"workers": [slot], "allow_other_workers": True} if slot else {}
            with dask.annotate(**where):
                tasks[g] = dask.delayed(fn, pure=False)(group, *a, dask_key_name=(name, g))
        done = dict(zip(tasks, dask.persist(*tasks.values()), strict=True))
        return [done.get(g) for g in range(len(self.groups))]

    @staticmethod
    def _parts(done: list[Any], i: int, what: str) -> list[Any]:
        """Item ``i`` of each group's persisted result, lazily (a light task each)."""
        name = task_key(f"kmeans-stream-{what}")
        return [dask.delayed(operator.getitem, pure=False)(d, i, dask_key_name=(name, g))
                for g, d in enumerate(done)]

    def _finish(self, levels: Iterable[list[np.ndarray]]) -> np.ndarray:
        return ordered_sum([p for group in levels for p in group], self.split_every)

    def total(
        self, kernel: Callable, *aligned: list, consts: tuple = (),
        out_shape: tuple[int, ...] = (),
    ) -> np.ndarray:
        args = [(kernel, [a[g] for a in aligned], consts, out_shape)
                for g in range(len(self.groups))]
        return self._finish(dask.compute(*self._run(_g_total, args)))

    def rows(
        self, kernel: Callable, *aligned: list, consts: tuple = (), width: int,
        dtype: Any = np.float64,
    ) -> np.ndarray:
        args = [(kernel, [a[g] for a in aligned], consts) for g in range(len(self.groups))]
        parts = [p for group in dask.compute(*self._run(_g_rows, args)) for p in group]
        return np.concatenate(parts).reshape(-1, width)

    def take(self, rows: np.ndarray) -> np.ndarray:
        wanted = [rows[(rows >= self.offsets[g.start]) & (rows < self.offsets[g.start + len(g)])]
                  for _, g in self.groups]
        done = self._run(_g_take, [(w,) if len(w) else None for w in wanted])
        return np.concatenate(dask.compute(*[d for d in done if d is not None]))

    def vector(self, kernel: Callable, *aligned: list, consts: tuple = ()
               ) -> tuple[list, float]:
        args = [(kernel, [a[g] for a in aligned], consts) for g in range(len(self.groups))]
        done = self._run(_g_vector, args)
        totals = dask.compute(*self._parts(done, 1, "totals"))
        # the vector stays on the workers, one lazy piece per group
        return self._parts(done, 0, "vector-kept"), float(self._finish(totals))

    def lloyd_step(self, state: list | None, consts: tuple, width: int, k: int
                   ) -> tuple[list, np.ndarray]:
        old = state or [None] * len(self.groups)
        done = self._run(_g_step, [(s, consts, k) for s in old])
        moves = dask.compute(*self._parts(done, 1, "moves"))
        return self._parts(done, 0, "state"), self._finish(moves)


def _fit_in_one_task(
    cls: type, params: dict, n_init: int, rs: np.random.RandomState, blocks: list[np.ndarray]
) -> dict:
    """The whole fit on X's blocks inside one task; returns the fitted attributes.

    BLAS is held to one thread per call, as on a Dask worker (whose nanny sets it), so
    every block product is computed as on the distributed path; the cores are used by
    processing blocks in parallel instead.
    """
    est = cls(**params)  # a fresh copy: the caller's may hold a previous fit's graphs
    est._n_init = n_init
    n_jobs = params["n_jobs"] or n_cpus()
    threads = max(1, min(n_jobs, len(blocks)))
    with threadpool_limits(limits=1, user_api="blas"):
        if threads == 1:
            return est._fit_passes(_LocalPasses(blocks, est.split_every, map, est.divide_by), rs)
        with ThreadPoolExecutor(threads) as pool:
            def map_(fn: Callable, items: Iterable) -> Iterable:
                return pool.map(passes.carried(fn), items)  # count conversions for the stage

            return est._fit_passes(_LocalPasses(blocks, est.split_every, map_, est.divide_by), rs)


# --- the estimator --------------------------------------------------------------------

_SEED_MAX = np.iinfo(np.int32).max
#: Default ``max_local_bytes``: X up to this size (as stored) is fitted in one task.
MAX_LOCAL_BYTES = 2**30


class DaskKMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """k-means clustering of a row-chunked dask array, fitted across the Dask workers.

    Parameters
    ----------
    n_clusters : int, default=10
        Number of clusters k.
    init : {"k-means||", "random"} or ndarray of shape (n_clusters, n_features)
        ``"k-means||"`` is the scalable k-means++ of Bahmani et al. (2012): ``init_rounds``
        passes each keep every row with probability ``oversampling_factor * k * d2 / phi``
        (d2: squared distance to the candidates so far, phi: their sum); the candidates
        are weighted by the number of rows nearest to them and reduced to k centres on the
        client by scikit-learn's weighted k-means (k-means++ seeding), once per run.
        ``"random"`` picks k distinct rows uniformly per run. An array is the one start.
    n_init : int or "auto", default="auto"
        Number of k-means runs, each from its own start, carried out together: every
        pass over the data serves all runs (one BLAS product against the stacked
        centres), so extra runs cost far less than repeated fits. The run with the
        lowest inertia is kept. ``"auto"`` is 10 for at most 64 features (the product is
        cheap there, and on Fashion-MNIST PCA-10 single runs land in local minima up to
        4% apart) and 3 above (raw pixels: runs land up to 2% apart, best of 3 within
        0.5% of the best seen). 1 for an array ``init``.
    oversampling_factor : float, default=2.0
        Expected k-means|| candidates per round, as a multiple of ``n_clusters``.
    init_rounds : int, default=5
        Sampling rounds of k-means||.
    max_iter : int, default=300
        Maximum Lloyd iterations.
    tol : float, default=1e-4
        A run stops when the sum over its centres of the squared centre shift is at most
        ``tol * mean(feature variances)`` (scikit-learn's rule). Unchanged labels give a
        zero shift, so this also covers scikit-learn's strict convergence.
    random_state : int, RandomState or None, default=None
        Seed of every random draw.
    split_every : int, default=8
        Fan-in of the tree reductions.
    max_local_bytes : int or None, default=1 GiB
        X of at most this many bytes as stored (``X.nbytes``: uint8 pixels one byte per
        value, since the kernels convert rows as they read them) is fitted inside one
        task on one worker, with every core of that machine: its blocks are gathered there and
        initialisation, all Lloyd iterations of all runs and the inertia run without a
        scheduler round trip. Larger X is fitted across the workers, one round trip per
        pass, without ever gathering it: block by block when X is persisted, else (X
        computed or read from files) by one task per worker thread per pass, each over a
        contiguous share of the blocks, read one at a time, with its per-row state kept
        on that worker. All paths run the same kernels on the same blocks and add the
        partials in the same order, so they give identical results (labels, centres,
        inertia, iterations). 0 always fits across the workers, None always in one task.
    n_jobs : int or None, default=None
        Threads of a fit inside one task (row blocks processed in parallel, one BLAS
        thread each); None uses every CPU of the worker's machine. Results do not depend
        on it; parallelism is at most the number of row blocks.
    divide_by : float, default=1.0
        X is fitted, predicted and scored as ``X / divide_by`` (in float32 for integer X,
        else X's dtype), each row converted when a kernel reads it: uint8 pixels with
        ``divide_by=255`` are clustered as pixels in [0, 1] without a float copy of the
        data per pass. Centres, inertia and distances are in those divided units.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        Centres of the kept run, in the dtype of X.
    labels_ : dask.array.Array of shape (n_samples,), int32
        Index of the nearest centre per row, lazy and chunked like X.
    inertia_ : float
        Sum of squared Euclidean distances of the rows to their centres (scikit-learn's
        inertia, in squared units of X), computed exactly in float64.
    n_iter_ : int
        Lloyd iterations of the kept run.
    inertia_per_run_ : ndarray of shape (n_runs,)
        Exact inertia of every run.
    n_features_in_ : int
        Number of features d.
    n_candidates_ : int
        Number of k-means|| candidates (0 for other inits).
    n_empty_relocations_ : int
        Times a cluster became empty and was moved to the farthest row (all runs).
    """

    def __init__(
        self,
        n_clusters: int = 10,
        *,
        init: str | np.ndarray = "k-means||",
        n_init: int | str = "auto",
        oversampling_factor: float = 2.0,
        init_rounds: int = 5,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int | np.random.RandomState | None = None,
        split_every: int = 8,
        max_local_bytes: int | None = MAX_LOCAL_BYTES,
        n_jobs: int | None = None,
        divide_by: float = 1.0,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.split_every = split_every
        self.max_local_bytes = max_local_bytes
        self.n_jobs = n_jobs
        self.divide_by = divide_by

    # -- public API -------------------------------------------------------------------

    def fit(self, X: Any, y: None = None) -> DaskKMeans:
        """Compute the k-means clustering of X.

        Parameters
        ----------
        X : dask.array.Array of shape (n_samples, n_features)
            Float data chunked by rows with known chunk sizes (numpy is accepted and
            wrapped in one block; integer data is cast to float32). Persist it first
            when it fits in the workers' memory: on the distributed path fit reads it
            about ``2 * init_rounds + n_iter + 4`` times (once, into one task, when it is
            at most ``max_local_bytes``).
        y : None
            Ignored.

        Returns
        -------
        self : DaskKMeans
        """
        X = self._validate(X, reset=True)
        n = X.shape[0]
        if n < self.n_clusters:
            raise ValueError(f"n_samples={n} should be >= n_clusters={self.n_clusters}")
        if isinstance(self.init, str) and self.init not in ("k-means||", "random"):
            raise ValueError(f"unknown init {self.init!r}: use 'k-means||', 'random' or an array")
        rs = check_random_state(self.random_state)
        self._n_init = self._resolve_n_init(X.shape[1])
        if self.max_local_bytes is None or X.nbytes <= self.max_local_bytes:
            # One task depending on every block: the scheduler runs it on the worker
            # holding most of X, and the other blocks are sent there once.
            fitted = on_worker(_fit_in_one_task, type(self), self.get_params(), self._n_init,
                               rs, X.to_delayed().ravel().tolist())
        else:
            # persisted blocks are read where they are, per block; lazy ones (streamed
            # from files) by one task per worker thread over its share of them
            passes_over = _ClusterPasses if is_persisted(X) else _StreamedPasses
            fitted = self._fit_passes(passes_over(X, self.split_every, self.divide_by), rs)
        for name, value in fitted.items():
            setattr(self, name, value)
        self.labels_ = self.predict(X)
        return self

    def predict(self, X: Any) -> da.Array:
        """Index of the nearest centre for each row.

        Parameters
        ----------
        X : dask.array.Array of shape (n_samples, n_features)

        Returns
        -------
        labels : dask.array.Array of shape (n_samples,), int32
            Lazy, chunked like X.
        """
        check_is_fitted(self, "cluster_centers_")
        X = self._validate(X)
        c = self.cluster_centers_.astype(float_dtype(X.dtype))
        return X.map_blocks(partial(_on_rows, _k_predict, self.divide_by), c, _sqnorms(c),
                            drop_axis=1, dtype=np.int32)

    def fit_predict(self, X: Any, y: None = None) -> da.Array:
        """Fit and return ``labels_`` (lazy dask array, int32)."""
        return self.fit(X).labels_

    def transform(self, X: Any) -> da.Array:
        """Euclidean distance from every row to every centre.

        Parameters
        ----------
        X : dask.array.Array of shape (n_samples, n_features)

        Returns
        -------
        distances : dask.array.Array of shape (n_samples, n_clusters)
            Lazy, in the units of X.
        """
        check_is_fitted(self, "cluster_centers_")
        X = self._validate(X)
        k = self.n_clusters
        dtype = float_dtype(X.dtype)
        return X.map_blocks(
            partial(_on_rows, _k_transform, self.divide_by), self.cluster_centers_.astype(dtype),
            chunks=(X.chunks[0], (k,)), dtype=dtype,
        )

    def score(self, X: Any, y: None = None) -> float:
        """Opposite of the inertia of X under the fitted centres (scikit-learn's sign)."""
        from fmnist_dask.metrics import sum_of_squares

        X = self._validate(X)
        divided = X.map_blocks(_divided, self.divide_by, dtype=float_dtype(X.dtype))
        return -sum_of_squares(divided, self.predict(X), self.cluster_centers_)

    # -- internals --------------------------------------------------------------------

    def _validate(self, X: Any, reset: bool = False) -> da.Array:
        # integer X stays as it is: the kernels convert the rows they read (_Rows)
        return validate_rows(self, X, reset, cast=False)

    def _resolve_n_init(self, n_features: int) -> int:
        if not isinstance(self.init, str):
            return 1
        if isinstance(self.n_init, str):
            if self.n_init != "auto":
                raise ValueError(f"n_init must be an int >= 1 or 'auto', got {self.n_init!r}")
            return 10 if n_features <= 64 else 3
        if int(self.n_init) < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")
        return int(self.n_init)

    def _fit_passes(self, p: Any, rs: np.random.RandomState) -> dict:
        """The fit, over the passes ``p`` (:class:`_ClusterPasses` or :class:`_LocalPasses`).

        Returns the fitted attributes (set on the estimator by :meth:`fit`).
        """
        starts, variances = self._init_centers(p, rs)
        tol = self.tol * float(np.mean(variances))
        runs, iters = self._lloyd(p, starts.astype(p.dtype), tol)
        r = len(runs)
        stacked = np.concatenate(runs)
        inertia = p.total(_k_run_inertia, consts=(stacked, _sqnorms(stacked), r),
                          out_shape=(r,))
        best = int(np.argmin(inertia))  # ties: the first run
        return {
            "cluster_centers_": runs[best], "inertia_per_run_": inertia,
            "inertia_": float(inertia[best]), "n_iter_": iters[best],
            "n_candidates_": self.n_candidates_,
            "n_empty_relocations_": self.n_empty_relocations_,
        }

    def _init_centers(
        self, p: Any, rs: np.random.RandomState
    ) -> tuple[np.ndarray, np.ndarray]:
        """Starting centres, shape (runs, k, d), and the feature variances of X."""
        n, d = p.n, p.d
        k = self.n_clusters
        first = p.take(np.sort(rs.choice(n, size=1)))
        self.n_candidates_ = 0
        # A pass of its own: sharing one with k-means||'s first distances gave X two readers,
        # and a lazily computed X (scaled pixels) was then held whole in worker memory.
        m = p.total(_k_shifted_moments, consts=(first[0].astype(np.float64),), out_shape=(2, d))
        if isinstance(self.init, str) and self.init == "k-means||":
            starts = self._kmeans_parallel(p, first, rs)
        elif isinstance(self.init, str):
            starts = np.stack([
                p.take(np.sort(rs.choice(n, size=k, replace=False)))
                for _ in range(self._n_init)
            ])
        else:
            start = np.asarray(self.init, dtype=np.float64)
            if start.shape != (k, d):
                raise ValueError(f"init array must have shape ({k}, {d}), got {start.shape}")
            starts = start[None]
        mean_shift = m[0] / n
        variances = m[1] / n - mean_shift**2
        return starts, variances

    def _kmeans_parallel(
        self, p: Any, first: np.ndarray, rs: np.random.RandomState,
    ) -> np.ndarray:
        """k-means|| (Bahmani et al. 2012): oversample candidates, weight, reduce to k."""
        k = self.n_clusters
        ell = self.oversampling_factor * k
        seed = int(rs.randint(_SEED_MAX))
        cand = first.astype(p.dtype)
        # d2 (one float per row) stays with the blocks between rounds; only phi comes back
        d2, phi = p.vector(_k_min_sqdist, consts=(cand,))
        chosen = [cand]
        for r in range(self.init_rounds):
            if phi <= 0:  # every row coincides with a candidate
                break
            new = p.rows(_k_sample, d2, consts=(ell / phi, seed, r), width=p.d, dtype=p.dtype)
            if len(new) == 0:
                continue
            chosen.append(new)
            d2, phi = p.vector(_k_update_min_sqdist, d2, consts=(new,))
        del d2
        candidates = np.concatenate(chosen)
        if len(np.unique(candidates, axis=0)) < k:
            # Only with fewer than k distinct rows near the data: top up with random rows
            # (duplicates get weight 0 and end as empty clusters, relocated in Lloyd).
            extra = p.take(np.sort(rs.choice(p.n, size=k, replace=False)))
            candidates = np.concatenate([candidates, extra])
        self.n_candidates_ = len(candidates)
        weights = p.total(_k_candidate_counts, consts=(candidates, _sqnorms(candidates)),
                          out_shape=(len(candidates),))
        starts = []
        for _ in range(self._n_init):
            km = KMeans(n_clusters=k, init="k-means++", n_init=1,
                        random_state=int(rs.randint(_SEED_MAX)))
            km.fit(candidates.astype(np.float64), sample_weight=weights)
            starts.append(km.cluster_centers_)
        return np.stack(starts)

    def _lloyd(
        self, p: Any, starts: np.ndarray, tol: float
    ) -> tuple[list[np.ndarray], list[int]]:
        """Lloyd iterations of all runs together, skipping rows that cannot move.

        Exact Lloyd (same iterates as recomputing every distance) accelerated by
        Hamerly's bounds: per row and run, the workers keep the label and two distance
        bounds; each iteration recomputes distances only for rows whose bounds do not
        rule out a change. The per-cluster sums and counts live on the client and are
        updated with the moves of the rows that changed cluster. A converged run keeps
        its centres and labels frozen and costs nothing until all runs have converged.
        """
        n_runs, k, d = starts.shape
        centers = [c.astype(p.dtype) for c in starts]
        sums = np.zeros((n_runs, k, d))
        counts = np.zeros((n_runs, k))
        iters = [0] * n_runs
        active = set(range(n_runs))
        shift = np.zeros(n_runs * k)
        state: Any = None  # None: compute every distance and recount
        bounded = d >= _BOUNDS_MIN_FEATURES
        width = 1 + (3 if bounded else 1) * n_runs
        self.n_empty_relocations_ = 0
        for it in range(1, self.max_iter + 1):
            # a full recount (state None) recomputes every run; otherwise only the
            # runs still moving are computed, the others keep their labels and bounds
            act = np.arange(n_runs) if state is None else np.array(sorted(active))
            stacked = np.concatenate([centers[r] for r in act])
            run_shift = np.concatenate([shift[r * k : (r + 1) * k] for r in act])
            half_gap = np.concatenate([_half_gaps(centers[r]) for r in act])
            consts = (stacked, _sqnorms(stacked).astype(np.float64), run_shift,
                      run_shift.reshape(len(act), k).max(axis=1), half_gap, act, n_runs,
                      bounded)
            if state is None:
                sums[:], counts[:] = 0.0, 0.0
            state, moves = p.lloyd_step(state, consts, width, k)
            moves = moves.reshape(n_runs, k, d + 1)
            sums += moves[:, :, :d]
            counts += moves[:, :, d]
            shift = np.zeros(n_runs * k)
            for r in sorted(active):
                run_sums, run_counts = sums[r], counts[r]
                empty = np.flatnonzero(run_counts == 0)
                if len(empty):
                    run_sums, run_counts = self._relocate(
                        p, centers[r], empty, run_sums, run_counts
                    )
                    state = None  # relocated rows moved on the client only: recount all
                updated = (run_sums / run_counts[:, None]).astype(p.dtype)
                moved = np.sqrt(((updated.astype(np.float64) - centers[r]) ** 2).sum(axis=1))
                shift[r * k : (r + 1) * k] = moved
                centers[r] = updated
                iters[r] = it
                if float((moved**2).sum()) <= tol:
                    active.discard(r)
            if not active:
                break
        return centers, iters

    def _relocate(
        self, p: Any, centers: np.ndarray, empty: np.ndarray,
        sums: np.ndarray, counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Move each empty cluster to one of the rows farthest from their centre.

        As scikit-learn does: the row leaves its old cluster's sums and becomes the empty
        cluster's only member; farthest first, ties broken by row id.
        """
        m = len(empty)
        far = p.rows(_k_farthest, consts=(centers, _sqnorms(centers), m), width=3 + p.d)
        far = far[np.lexsort((far[:, 1], -far[:, 0]))][:m]
        sums, counts = sums.copy(), counts.copy()
        for j, row in zip(empty, far, strict=False):
            old, x = int(row[2]), row[3:]
            sums[old] -= x
            counts[old] -= 1
            sums[j] = x
            counts[j] = 1
        self.n_empty_relocations_ += m
        return sums, counts
