"""Per-row-block kernels and tree reductions on dask arrays.

The estimators and metrics only ever move small things between the workers and the
client: one fixed-shape partial result per row block (sums, counts, a scatter matrix),
added together by a tree reduction. These helpers hold that pattern in one place.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.core import flatten
from dask.layers import ArrayValuesDep
from dask.utils import funcname

#: Rows processed at a time inside a block: keeps the (rows x k) or (rows x rows)
#: temporaries small enough for the CPU cache and float32 BLAS sums short.
SUB_ROWS = 4096


def _value(value: Any) -> Any:
    return value


def ship(value: Any, key: str | None = None) -> Any:
    """``value`` (a fitted model, an index array) as one graph task that returns it.

    Not ``dask.delayed(value)``: a bare value in the graph is data to produce
    (``DataNode.data_producer``), and the distributed scheduler holds such tasks back
    (``is_rootish``) while every worker has tasks assigned, whatever their priority: a
    prediction at priority 0 waited for the hundreds of silhouette tasks (priority -1)
    sent before it, 11-15 s in the job (docs/benchmarks.md, "Session 15"). A task that
    returns the value goes out at once, in priority order. ``key``: give one for a large
    value, which dask would otherwise hash on every call.
    """
    return dask.delayed(_value, pure=True)(value, dask_key_name=key)  # None: a hashed key


def whole_array(x: np.ndarray) -> da.Array:
    """A numpy array as a one-block dask array, shipped as a task (see :func:`ship`;
    ``da.from_array`` would make its block data to produce)."""
    x = np.asarray(x)
    return da.from_delayed(ship(x), shape=x.shape, dtype=x.dtype, meta=x[:0])


def _rows_of(like_block: np.ndarray, whole: np.ndarray,
             block_info: dict | None = None) -> np.ndarray:
    start, stop = block_info[0]["array-location"][0]
    return whole[start:stop]


def rows_like(whole: np.ndarray, like: da.Array) -> da.Array:
    """The rows of ``whole`` cut as the row blocks of ``like`` (same number of rows).

    Each block is a slice of ``whole`` (shipped once per worker, see :func:`ship`) taken
    beside ``like``'s block: a task that depends on it, so the scheduler sends it in
    priority order (``da.from_array`` blocks are data to produce, held back while the
    workers are busy) and to where the aligned block is.
    """
    whole = np.asarray(whole)
    if whole.shape[0] != like.shape[0]:
        raise ValueError(f"expected {like.shape[0]} rows, got {whole.shape[0]}")
    if whole.ndim > 2 or like.ndim > 2:
        raise ValueError("rows_like takes 1-D or 2-D arrays")
    if like.ndim == 2 and like.numblocks[1] != 1:
        like = like.rechunk({1: -1})
    # map_blocks keeps like's axes: drop its columns or add whole's
    extra = ({"drop_axis": [1]} if like.ndim > whole.ndim
             else {"new_axis": [1]} if whole.ndim > like.ndim else {})
    return da.map_blocks(_rows_of, like, whole=ship(whole), dtype=whole.dtype,
                         chunks=(like.chunks[0], *((n,) for n in whole.shape[1:])),
                         meta=whole[:0], **extra)


def as_row_chunked(x: Any, dtype: Any | None = None) -> da.Array:
    """Return ``x`` as a 2-D dask array chunked by rows only (one column block).

    Parameters
    ----------
    x : dask.array.Array or numpy.ndarray, shape (n_samples, n_features)
        The data. A numpy array becomes a single-block dask array.
    dtype : numpy dtype, optional
        Cast to this dtype (lazily).

    Returns
    -------
    dask.array.Array, shape (n_samples, n_features)
    """
    if not isinstance(x, da.Array):
        x = whole_array(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    if any(np.isnan(c) for c in x.chunks[0]):
        raise ValueError("row chunk sizes must be known: call x.compute_chunk_sizes() first")
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    return x


def per_block(
    kernel: Callable[..., np.ndarray],
    X: Any,
    model: Any,
    *,
    n_features: int,
    dtype: Any,
    n_columns: int | None = None,
    key: str | None = None,
    **kwargs: Any,
) -> da.Array:
    """A fitted model applied to every row block of ``X`` on the workers (the pattern of
    dask-ml's ``ParallelPostFit``): ``kernel(block, model=model, **kwargs)`` per block.

    Parameters
    ----------
    kernel : callable
        Module-level function ``(block, model=..., **kwargs) -> ndarray`` with one output
        row per input row; if it takes ``block_info`` it gets the block's row offset there.
    X : dask.array.Array of shape (n_rows, n_features)
        Known row chunks; column blocks are joined (a row is used whole).
    model : object
        The fitted model (or what the kernel needs of it): one graph key, so it is sent
        once per worker, not once per block.
    n_features : int
        Columns ``X`` must have.
    dtype : numpy dtype
        Of the output.
    n_columns : int, optional
        Output columns; None for one value per row.
    key : str, optional
        Graph key of ``model``. Give one for a large model, which dask would otherwise
        hash on every call.
    **kwargs
        Small constants passed to every kernel call.

    Returns
    -------
    dask.array.Array of shape (n_rows,) or (n_rows, n_columns)
        Lazy, chunked like the rows of ``X``.
    """
    X = as_row_chunked(X)
    if X.shape[1] != n_features:
        raise ValueError(f"X must have {n_features} columns, got shape {X.shape}")
    shipped = ship(model, key)
    if n_columns is None:
        return da.map_blocks(kernel, X, model=shipped, **kwargs, drop_axis=1, dtype=dtype,
                             meta=np.empty((0,), dtype=dtype))
    return da.map_blocks(kernel, X, model=shipped, **kwargs, dtype=dtype,
                         chunks=(X.chunks[0], (n_columns,)), meta=np.empty((0, 0), dtype=dtype))


def rows_in_sample(sample_indices: np.ndarray, n_rows: int,
                   block_info: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of a block are rows of a sample, found by their position.

    Parameters
    ----------
    sample_indices : numpy.ndarray of shape (n_sample,)
        Sorted, unique row positions of the sample in the whole array.
    n_rows : int
        Rows in the block.
    block_info : dict or None
        dask's ``block_info`` of the block (None: the block starts at row 0).

    Returns
    -------
    in_sample : numpy.ndarray of shape (n_rows,), bool
    where : numpy.ndarray of shape (n_rows,), int64
        For rows in the sample, their index in ``sample_indices``.
    """
    start = block_info[0]["array-location"][0][0] if block_info else 0
    positions = start + np.arange(n_rows, dtype=np.int64)
    where = np.minimum(np.searchsorted(sample_indices, positions), sample_indices.size - 1)
    return sample_indices[where] == positions, where


def validate_rows(estimator: Any, X: Any, reset: bool, cast: bool = True) -> da.Array:
    """X as a row-chunked dask array; records or checks ``n_features_in_``.

    Integer data (pixels) is cast to float32 unless ``cast`` is false (for estimators
    whose kernels convert it themselves). ``reset=True`` (in ``fit``) records the number
    of features on ``estimator``; otherwise X must have that many.
    """
    X = as_row_chunked(X)
    if cast and not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    if reset:
        estimator.n_features_in_ = X.shape[1]
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, expected {estimator.n_features_in_}")
    return X


def as_aligned_vector(v: Any, like: da.Array, name: str = "labels") -> da.Array:
    """Return the 1-D ``v`` as a dask array with the same row chunks as ``like``."""
    if isinstance(v, da.Array):
        if v.ndim != 1 or v.shape[0] != like.shape[0]:
            raise ValueError(f"{name} must have shape ({like.shape[0]},), got {v.shape}")
        if v.chunks[0] != like.chunks[0]:
            v = v.rechunk((like.chunks[0],))
        return v
    arr = np.asarray(v)
    if arr.ndim != 1 or arr.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must have shape ({like.shape[0]},), got {arr.shape}")
    return rows_like(arr, like)


def aligned_block(x: np.ndarray) -> np.ndarray:
    """``x``, or an aligned copy when its data is not aligned for its dtype.

    Blocks deserialised on a worker (e.g. ``da.from_array`` of a numpy array, sent inside
    the graph) can start at odd addresses, and numpy then takes slow paths (row gathers
    above all; docs/benchmarks.md has the k-means figures). Aligned blocks are returned
    as they are.
    """
    return x if x.flags.aligned else x.copy()


def row_blockwise(
    func: Callable[..., np.ndarray], x: da.Array, *aligned: da.Array,
    out_rows: int | None = None, out_shape: tuple[int, ...] = (), dtype: Any,
    **kwargs: Any,
) -> da.Array:
    """``func(x_block, *aligned_blocks, position, **kwargs)`` on every row block of ``x``,
    one task per block.

    Parameters
    ----------
    func : callable
        Gets ``x``'s block (its columns joined), the blocks of ``aligned`` (1-D), the
        block's ``position`` ``(block index, index of its first row)`` and ``kwargs``;
        returns ``(rows, *out_shape)``.
    x : dask.array.Array, shape (n_samples, n_features)
    *aligned : dask.array.Array, shape (n_samples,)
        Per-row vectors, rechunked like ``x``'s rows if they are not.
    out_rows : int or None
        Rows of each block's result: None for as many as the block has, an int for that
        many, ``numpy.nan`` for a number not known in advance.
    out_shape : tuple of int
        The trailing shape of each block's result.
    dtype : numpy dtype

    Not ``map_blocks`` with the vectors as ``v[:, None]`` columns (to line them up with
    ``x``'s rows): each ``v[:, None]`` is a task per block of its own, which must run, on a
    free worker thread, before the block's task can (docs/benchmarks.md, "Session 18").
    """
    aligned = tuple(a if a.chunks[0] == x.chunks[0] else a.rechunk((x.chunks[0],))
                    for a in aligned)
    trailing = "klmn"[: len(out_shape)]
    adjust = {} if out_rows is None else {"i": (out_rows,) * x.numblocks[0]}
    starts = np.cumsum((0, *x.chunks[0][:-1]))
    # each task's position is put in it as it is made: no task, no constant of all blocks
    positions = ArrayValuesDep(x.chunks[:1], {(i,): (i, int(start))
                                               for i, start in enumerate(starts)})
    return da.blockwise(
        func, "i" + trailing, x, "ij", *(p for a in aligned for p in (a, "i")),
        positions, "i", new_axes=dict(zip(trailing, out_shape, strict=True)),
        adjust_chunks=adjust, concatenate=True, align_arrays=False, dtype=dtype,
        meta=np.empty((0,) * (1 + len(out_shape)), dtype=dtype), **kwargs,
    )


def _call_kernel(
    xb: np.ndarray, *blocks: Any, kernel: Callable, consts: tuple,
    kernel_kwargs: dict | None = None,
) -> np.ndarray:
    # row_blockwise's call: the aligned vectors' blocks, then the block's position
    *aligned, (index, offset) = blocks
    out = kernel(aligned_block(xb), *aligned, *consts, **(kernel_kwargs or {}),
                 block_index=index, row_offset=offset)
    return np.asarray(out)


#: Constants above this size travel as one graph key instead of inside every task.
SHARED_CONST_BYTES = 1 << 20


def shared_consts(consts: tuple) -> tuple:
    """``consts`` with every large numpy array turned into a single graph key.

    A constant inside a task is shipped and held once per task: a worker handed its 56
    tasks of a pass can hold 56 copies (e.g. the sampled silhouette's 10,000 x 784 sample,
    31 MB). As a key it travels once per worker and is shared by the tasks there. (This
    did not lower the evaluate stage's 5.9 GiB peak at 1.12 million rows: that was the
    shuffle of ``X[indices]``, see :func:`fmnist_dask.sampling.take_rows`.)
    """
    return tuple(
        ship(c)
        if isinstance(c, np.ndarray) and c.nbytes > SHARED_CONST_BYTES else c
        for c in consts
    )


def block_partials(
    kernel: Callable[..., np.ndarray],
    x: da.Array,
    *aligned: da.Array,
    consts: tuple = (),
    out_shape: tuple[int, ...] = (),
    dtype: Any = np.float64,
    kernel_kwargs: dict | None = None,
) -> da.Array:
    """Run ``kernel`` on every row block of ``x``; one partial result per block.

    Parameters
    ----------
    kernel : callable
        ``kernel(x_block, *aligned_blocks, *consts, block_index=int, row_offset=int)``
        returning an array of shape ``out_shape``. ``block_index`` is the block's position
        and ``row_offset`` the global index of its first row (for seeding and row ids).
    x : dask.array.Array, shape (n_samples, n_features)
        Row-chunked data (one column block, known chunk sizes).
    *aligned : dask.array.Array, shape (n_samples,)
        Per-row vectors chunked like ``x`` (labels, distances...).
    consts : tuple
        Small constants (centres, seeds) sent to every block.
    kernel_kwargs : dict, optional
        Keyword constants for the kernel.
    out_shape : tuple of int
        Shape of each block's result (``()`` for a scalar).
    dtype : numpy dtype
        dtype of the results.

    Returns
    -------
    dask.array.Array, shape (n_blocks, *out_shape)
        Lazy; reduce it with :func:`tree_sum` or compute it directly (it is small).
    """
    return row_blockwise(_call_partial, x, *aligned, out_rows=1, out_shape=out_shape,
                         dtype=dtype, kernel=kernel, consts=shared_consts(consts),
                         kernel_kwargs=kernel_kwargs)


def _call_partial(xb: np.ndarray, *blocks: Any, **kwargs: Any) -> np.ndarray:
    # one partial per block: a leading axis of length 1
    return _call_kernel(xb, *blocks, **kwargs)[None]


def block_rows(
    kernel: Callable[..., np.ndarray],
    x: da.Array,
    *aligned: da.Array,
    consts: tuple = (),
    width: int,
    dtype: Any = np.float64,
) -> da.Array:
    """Like :func:`block_partials` for kernels returning a variable number of rows.

    Each block's kernel returns an array of shape (m_b, width); the result is their
    row-wise concatenation, shape (sum m_b, width), with unknown chunk sizes. Use it for
    small selections only (samples, candidate centres, farthest points).
    """
    return row_blockwise(_call_kernel, x, *aligned, out_rows=np.nan, out_shape=(width,),
                         dtype=dtype, kernel=kernel, consts=shared_consts(consts))


def tree_sum(partials: da.Array, split_every: int = 8) -> da.Array:
    """Sum per-block partial results (axis 0) with a tree reduction, in float64."""
    return partials.sum(axis=0, dtype=np.float64, split_every=split_every)


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A reusable work array of this thread (contents undefined).

    Hot kernels run thousands of times; fresh multi-megabyte temporaries each time cost
    page faults that can exceed the arithmetic (docs/benchmarks.md, "Figures behind choices
    in the code").
    One buffer per name and thread is grown when needed and reused.
    """
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    buf = pool.get((name, dtype))
    if buf is None or buf.size < size:
        buf = pool[(name, dtype)] = np.empty(max(size, 1), dtype=dtype)
    return buf[:size].reshape(shape)


_RECYCLED: list[np.ndarray] = []
_RECYCLED_LOCK = threading.Lock()
#: Output arrays kept for reuse per process (a streamed pass has one or two in flight per
#: worker thread).
RECYCLED_MAX = 8


def recycled(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A fresh-looking output array that reuses the memory of one no longer referenced.

    For task outputs that are made many times at the same shape (the scaled float32 block
    of every streamed pass): new memory costs a page fault per 4 KiB page, which here
    costs ~8x the scaling arithmetic (docs/benchmarks.md, "Streamed passes"). An array is
    handed out again only when this pool holds the last reference to it: Dask has released
    the task output, and no view of it survives (a view keeps its base referenced).
    Contents undefined.
    """
    dtype = np.dtype(dtype)
    with _RECYCLED_LOCK:
        for buf in _RECYCLED:
            # References: the pool's list, this loop's name, getrefcount's argument.
            if buf.shape == shape and buf.dtype == dtype and sys.getrefcount(buf) == 3:
                return buf
        buf = np.empty(shape, dtype)
        if len(_RECYCLED) < RECYCLED_MAX:
            _RECYCLED.append(buf)
        return buf


def few_partials(partials: da.Array, split_every: int = 8) -> da.Array:
    """Per-block partials reduced just enough to send to the client; sum axis 0 there.

    With at most ``split_every`` blocks the partials go to the client as they are (the
    last level of the tree runs on the client, saving a worker-to-worker hop per call,
    which matters in loops of hundreds of small reductions); with more blocks a tree
    reduction on the workers leaves one partial. Either way the client receives at most
    ``split_every`` small arrays and sums them in a fixed order (deterministic).
    """
    if partials.numblocks[0] <= split_every:
        return partials
    return tree_sum(partials, split_every)[None]


def sum_rows_in_order(parts: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in float64, adding the rows one after another; shape (1, ...).

    The one addition order of :func:`ordered_tree` and :func:`ordered_sum`: with it the
    sum of the same partials is the same to the last bit wherever it runs.
    """
    out = np.array(parts[0], dtype=np.float64)
    for part in parts[1:]:
        out += part
    return out[None]


def ordered_tree(partials: da.Array, split_every: int = 8) -> da.Array:
    """Reduce per-block partials on the workers until at most ``split_every`` remain.

    ``partials`` is (n_blocks, ...) with one row per block (as :func:`block_partials`
    returns). Consecutive groups of ``split_every`` rows are added by
    :func:`sum_rows_in_order`, level after level. Finish on the client with
    ``sum_rows_in_order(np.asarray(result.compute()))[0]``, which saves a
    worker-to-worker hop in loops of hundreds of small reductions; the result is then
    bit for bit :func:`ordered_sum` of the same partials held in one process.
    """
    while partials.numblocks[0] > split_every:
        groups = -(-partials.shape[0] // split_every)
        partials = partials.rechunk({0: split_every}).map_blocks(
            sum_rows_in_order, chunks=((1,) * groups, *partials.chunks[1:]),
            dtype=np.float64,
        )
    return partials


def ordered_sum(parts: list[np.ndarray], split_every: int = 8) -> np.ndarray:
    """:func:`ordered_tree` and its last level for partials in one process.

    Parameters
    ----------
    parts : list of ndarray, each of shape (1, ...)
        One partial per block, in block order.
    split_every : int
        Fan-in, as given to :func:`ordered_tree`.

    Returns
    -------
    ndarray of shape (...), float64
    """
    while len(parts) > split_every:
        parts = [sum_rows_in_order(np.concatenate(parts[i : i + split_every]))
                 for i in range(0, len(parts), split_every)]
    return sum_rows_in_order(np.concatenate(parts))[0]


def exact_sq_dists(xs: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared distance of each row to its own centre, float64, from exact differences.

    Parameters
    ----------
    xs : ndarray of shape (rows, d)
    centers : ndarray of shape (k, d), float64
    labels : ndarray of shape (rows,), int
        Centre of each row.

    Returns
    -------
    ndarray of shape (rows,), float64
    """
    diff = scratch("exact_diff", xs.shape, np.float64)
    # mode="clip": with out= and the default "raise" numpy copies through a buffer (3x
    # slower); the labels are valid centre indices by construction
    np.take(centers, labels, axis=0, out=diff, mode="clip")
    np.subtract(xs, diff, out=diff)
    return np.einsum("ij,ij->i", diff, diff)


def gather_blocks(*arrays: da.Array) -> tuple[np.ndarray, ...]:
    """Compute small arrays chunked by rows only, each block fetched to the client and the
    blocks joined here.

    ``dask.compute`` joins them in a task of its own on a worker, where most of the blocks
    are; it then waits behind any long task running there (the eda stage's partials, done
    0.2 s after they were sent, came back 2.8 s later from behind a k-means fit;
    docs/benchmarks.md, "Session 18"). For results of a few MB at most.
    """
    if any(n != 1 for a in arrays for n in a.numblocks[1:]):
        raise ValueError("gather_blocks takes arrays chunked along the rows only")
    persisted = dask.persist(*arrays)
    if not is_persisted(persisted[0]):  # no distributed cluster: persist computed them
        return tuple(np.asarray(p.compute()) for p in persisted)
    from distributed import futures_of, get_client

    by_key = {f.key: f for p in persisted for f in futures_of(p)}
    blocks = get_client().gather(
        [[by_key[k] for k in flatten(p.__dask_keys__())] for p in persisted])
    return tuple(np.concatenate(b, axis=0) for b in blocks)


def computed(x: da.Array) -> da.Array:
    """Return the persisted ``x`` once its blocks are computed on the workers; raise the
    error of a task of it that failed.

    Not ``x.sum().compute()``: that adds a level of tasks and a joining task on a worker,
    two more waits behind another stage's long tasks (docs/benchmarks.md, "Session 18").
    """
    from distributed import futures_of, wait

    futures = futures_of(x)
    wait(futures)  # a failed task's future is done too
    for future in futures:
        if future.status in ("error", "cancelled"):
            future.result()  # raises the task's error
    return x


def one_block(x: da.Array) -> Any:
    """``x`` as a single delayed block, to hand whole to a task on a worker."""
    return x.rechunk({0: -1}).to_delayed().ravel()[0]


def task_key(name: str, *parts: Any) -> str:
    """A task-name prefix of its own for one call: ``name-<token of parts>`` (random without
    parts).

    Dask groups tasks by the name in their key, and a span (a stage on the dashboard, in
    the progress line and in the run's timeline) takes every task of a group: keys named
    after a function alone would put the tasks of two stages that call it into whichever
    stage came first. Use it in tuple keys, ``(task_key(...), i, ...)``.
    """
    return f"{name}-{tokenize(*parts) if parts else uuid.uuid4().hex}"


def on_worker(func, *args, **kwargs):
    """Run ``func`` on a worker (where the sample lives); return its small result."""
    key = (task_key(funcname(func)), 0)
    return dask.delayed(func, pure=False)(*args, dask_key_name=key, **kwargs).compute()


class BlockGraphs:
    """The row blocks of a lazy dask array, each computed on demand inside a task.

    Holds one small culled graph per block (for pixels streamed from ``cleaned/``: the one
    ``read_pixels`` call of its file), so that a task can compute the blocks of its range one
    after another and hold one at a time, instead of depending on them all (the scheduler
    would then keep every one in worker memory). Picklable; :meth:`subset` keeps a range.
    Not for persisted arrays: their blocks are already in worker memory, as futures.
    """

    def __init__(self, x: da.Array) -> None:
        from dask.optimization import cull

        graph = dict(x.__dask_graph__())
        self.keys = [k[0] if isinstance(k, list) else k for k in x.__dask_keys__()]
        self.graphs = [cull(graph, [key])[0] for key in self.keys]
        self.start = 0

    def subset(self, start: int, stop: int) -> BlockGraphs:
        """The blocks ``start:stop``, still indexed by their position in the whole array."""
        part = object.__new__(BlockGraphs)
        part.keys, part.graphs = self.keys[start:stop], self.graphs[start:stop]
        part.start = self.start + start
        return part

    def __getitem__(self, i: int) -> np.ndarray:
        """Block ``i`` (its position in the whole array), computed in this thread."""
        from dask.local import get_sync

        j = i - self.start
        return get_sync(self.graphs[j], self.keys[j])


def n_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_slots() -> list[str | None]:
    """One entry per thread of the cluster the dask scheduler runs on: the worker address,
    repeated per thread (sorted); ``[None] * cpus`` without a distributed scheduler."""
    client = getattr(dask.base.get_scheduler(), "__self__", None)
    info = getattr(client, "scheduler_info", None)
    if info is None:
        return [None] * n_cpus()
    workers = info(n_workers=-1)["workers"]
    return [address for address, w in sorted(workers.items()) for _ in range(w["nthreads"])]


def is_persisted(x: Any) -> bool:
    """Whether ``x``'s blocks are results held by a distributed cluster (futures)."""
    try:
        from distributed import futures_of
    except ImportError:
        return False
    return bool(futures_of(x))
