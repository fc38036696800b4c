"""Reproducible uniform row samples of a dask array, drawn without gathering the data.

The row indices are chosen on the client from the number of rows alone (cheap: only
``size`` integers), then each block's selected rows are taken on the workers by one task
per block, fused with whatever produced the block, so only the sampled rows travel and no
block is held whole.
The same indices take the same rows from any other array aligned with the data (row ids,
labels), whatever its chunking.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import dask.array as da
import numpy as np

from fmnist_dask._blocks import ship

#: Rows kept by default: the whole dataset up to this many rows, else a sample of this size.
DEFAULT_SAMPLE_CAP = 70_000

RandomStateLike = int | np.random.Generator | np.random.RandomState | None


def default_sample_size(n_rows: int, cap: int = DEFAULT_SAMPLE_CAP) -> int:
    """Rows to sample by default: all ``n_rows`` when ``n_rows <= cap``, else ``cap``.

    Parameters
    ----------
    n_rows : int
        Number of rows of the full data.
    cap : int, default=70_000
        Largest sample.

    Returns
    -------
    int
        Sample size, ``min(n_rows, cap)``.
    """
    if n_rows < 0 or cap < 1:
        raise ValueError(f"need n_rows >= 0 and cap >= 1, got {n_rows=} and {cap=}")
    return min(int(n_rows), int(cap))


def _generator(random_state: RandomStateLike) -> np.random.Generator:
    """A numpy Generator from a seed, a Generator or a legacy RandomState."""
    if isinstance(random_state, np.random.RandomState):
        # Derive a seed so that a RandomState gives reproducible indices too.
        return np.random.default_rng(random_state.randint(np.iinfo(np.int32).max))
    return np.random.default_rng(random_state)


def choose_sample_indices(
    n_rows: int, size: int | None = None, random_state: RandomStateLike = None
) -> np.ndarray:
    """Draw ``size`` distinct row indices uniformly from ``range(n_rows)``.

    Parameters
    ----------
    n_rows : int
        Number of rows to draw from.
    size : int or None, default=None
        Number of rows to draw; ``None`` uses :func:`default_sample_size`. A size of at least
        ``n_rows`` keeps every row.
    random_state : int, numpy Generator, RandomState or None
        Seed of the draw; the same seed gives the same indices.

    Returns
    -------
    numpy.ndarray of shape (size,), int64
        Sorted, unique row indices.
    """
    n_rows = int(n_rows)
    if size is None:
        size = default_sample_size(n_rows)
    if not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"size must be a non-negative integer or None, got {size!r}")
    if size >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    # Generator.choice without replacement does not build a permutation of all n_rows
    # when size is small, so this stays cheap for very large datasets.
    indices = _generator(random_state).choice(n_rows, size=int(size), replace=False)
    return np.sort(indices.astype(np.int64, copy=False))


def take_rows(X: da.Array, indices: np.ndarray) -> da.Array:
    """Take the rows ``indices`` (sorted, unique) of a dask array, block by block.

    Parameters
    ----------
    X : dask.array.Array of shape (n_rows, ...)
        Data with known chunk sizes along the rows.
    indices : numpy.ndarray of shape (size,)
        Sorted unique row indices in ``[0, n_rows)``.

    Returns
    -------
    dask.array.Array of shape (size, ...)
        The selected rows, in index order; lazy, one block per block of X holding any.
    """
    _check_known_rows(X)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError("indices must be one-dimensional")
    if indices.size and (indices[0] < 0 or indices[-1] >= X.shape[0]):
        raise IndexError(f"row indices out of range [0, {X.shape[0]})")
    if np.any(np.diff(indices) <= 0):
        raise ValueError("indices must be sorted and unique")
    if indices.size == X.shape[0]:
        return X  # every row: nothing to select
    if indices.size == 0:
        return X[:0]
    # Not X[indices]: dask's fancy indexing shuffles, and on a derived array (the lazily
    # scaled pixels) the scheduler then held every input block at once (the 16x evaluate
    # peak, docs/benchmarks.md "Scale"). One blockwise task per block fuses with the
    # block's producer instead.
    bounds = np.cumsum((0, *X.chunks[0]))
    cuts = np.searchsorted(indices, bounds)
    counts = np.diff(cuts)
    # Only the blocks holding a selected row: a few rows of pixels streamed from files
    # (eda's nine sample images, evaluate's images per cluster) would otherwise read every
    # file, 700 of them at 7 million rows.
    holding = np.flatnonzero(counts)
    if len(holding) < len(counts):
        X = X.blocks[holding]
    # each index relative to its block's first row
    local = indices - np.repeat(bounds[:-1], counts)
    # The indices travel once per worker as a task (ship): cut into a da.from_array, their
    # blocks would be data to produce, which the scheduler holds back while the workers
    # have other tasks, whatever the priorities (docs/benchmarks.md, "Session 15").
    taken = tuple(int(c) for c in counts[holding])
    return da.map_blocks(_select_rows, X, local=ship(local), cuts=np.cumsum((0, *taken)),
                         chunks=(taken, *X.chunks[1:]), dtype=X.dtype, meta=X._meta)


def _select_rows(block: np.ndarray, local: np.ndarray, cuts: np.ndarray,
                 block_info: dict | None = None) -> np.ndarray:
    """The rows ``local[cuts[i]:cuts[i + 1]]`` (positions within the block) of block i."""
    i = block_info[0]["chunk-location"][0]
    return block[local[cuts[i]:cuts[i + 1]]]


def uniform_row_sample(
    X: da.Array, size: int | None = None, random_state: RandomStateLike = None
) -> tuple[np.ndarray, da.Array]:
    """A reproducible uniform sample of rows, without replacement, taken on the workers.

    Parameters
    ----------
    X : dask.array.Array of shape (n_rows, ...)
        Data with known chunk sizes along the rows (call ``compute_chunk_sizes`` first
        otherwise).
    size : int or None, default=None
        Rows to draw; ``None`` means all rows when ``n_rows <= 70,000`` else 70,000.
    random_state : int, numpy Generator, RandomState or None
        Seed of the draw.

    Returns
    -------
    indices : numpy.ndarray of shape (size,), int64
        Sorted unique positions of the sampled rows in ``X``; pass them to :func:`take_rows`
        to take the same rows from aligned arrays (labels, row ids).
    sample : dask.array.Array of shape (size, ...)
        The sampled rows, lazy (``.compute()`` or ``client.compute`` brings only them back).
    """
    _check_known_rows(X)
    indices = choose_sample_indices(X.shape[0], size, random_state)
    return indices, take_rows(X, indices)


def _check_known_rows(X: da.Array) -> None:
    """Raise when the row chunk sizes of ``X`` are unknown."""
    if not isinstance(X, da.Array):
        raise TypeError(f"expected a dask array, got {type(X).__name__}")
    if any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError("row chunk sizes are unknown; call X.compute_chunk_sizes() first")


@dataclass
class Sample:
    """The reduced sample: positions in the full data and the rows, kept on the workers.

    Attributes
    ----------
    indices : ndarray, shape (n_sample,), int64
        Sorted positions of the sampled rows.
    rows : dask.array, shape (n_sample, n_features)
        The sampled rows of the PCA projection, persisted on the workers.
    """

    indices: np.ndarray
    rows: da.Array

    @property
    def size(self) -> int:
        return len(self.indices)


def draw_sample(projected: da.Array, size: int | None, seed: int) -> Sample:
    """A seeded uniform sample of the projected rows, taken block by block on the workers."""
    indices, rows = uniform_row_sample(projected, size, seed)
    return Sample(indices=indices, rows=rows.rechunk({0: -1}).persist())
