"""The per-block helpers every stage's tasks go through, on a real LocalCluster."""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import futures_of, get_task_stream, wait

from fmnist_dask._blocks import block_partials, block_rows, computed, gather_blocks


def _block_summary(xb: np.ndarray, labels: np.ndarray, weights: np.ndarray, scale: float, *,
                   block_index: int, row_offset: int) -> np.ndarray:
    return np.array([block_index, row_offset, len(xb), xb.sum() * scale,
                     (labels * weights).sum()])


def _rows_above(xb: np.ndarray, labels: np.ndarray, threshold: float, **_: Any) -> np.ndarray:
    chosen = xb[:, 0] > threshold
    return np.column_stack([xb[chosen], labels[chosen]])


def _uneven(dask_client) -> tuple[np.ndarray, np.ndarray, np.ndarray, da.Array, da.Array,
                                  da.Array]:
    rng = np.random.default_rng(3)
    x = rng.random((3000, 4))
    labels = rng.integers(0, 10, 3000).astype(np.int8)
    weights = rng.random(3000)
    chunks = (1000, 700, 1300)
    dx, dl = dask.persist(da.from_array(x, chunks=(chunks, 4)),
                          da.from_array(labels, chunks=(chunks,)))
    # the weights cut otherwise: rechunked to x's rows
    dw = da.from_array(weights, chunks=1500).persist()
    wait([dx, dl, dw])
    return x, labels, weights, dx, dl, dw


def test_block_kernels_see_their_rows_aligned_vectors_and_position(dask_client):
    x, labels, weights, dx, dl, dw = _uneven(dask_client)
    got = block_partials(_block_summary, dx, dl, dw, consts=(2.0,), out_shape=(5,)).compute()
    starts = (0, 1000, 1700)
    expected = [[i, s, n, 2.0 * x[s:s + n].sum(), (labels[s:s + n] * weights[s:s + n]).sum()]
                for i, (s, n) in enumerate(zip(starts, (1000, 700, 1300), strict=True))]
    np.testing.assert_allclose(got, expected)


def test_one_task_per_block_when_the_vectors_are_cut_like_the_rows(dask_client):
    _, _, _, dx, dl, _ = _uneven(dask_client)
    (partials,) = dask.optimize(block_partials(_block_summary, dx, dl, dl, consts=(1.0,),
                                               out_shape=(5,)))
    # map_blocks with the vectors as v[:, None] columns made a task per vector and block,
    # which had to run first, wherever a worker thread was free
    assert len(dict(partials.__dask_graph__())) == dx.numblocks[0]


def test_gather_blocks_joins_the_blocks_on_the_client(dask_client):
    x, labels, _, dx, dl, _ = _uneven(dask_client)
    rows = block_rows(_rows_above, dx, dl, consts=(0.9,), width=5)
    partials = block_partials(_block_summary, dx, dl, dl, consts=(1.0,), out_shape=(5,))
    with get_task_stream(dask_client) as stream:
        got_rows, got_partials = gather_blocks(rows, partials)
    chosen = x[:, 0] > 0.9
    np.testing.assert_array_equal(got_rows, np.column_stack([x[chosen], labels[chosen]]))
    np.testing.assert_array_equal(got_partials, partials.compute())
    # one task per block and collection, none that joins them on a worker
    ran = [str(t["key"]) for t in stream.data]
    assert len(ran) == 2 * dx.numblocks[0], ran
    assert not any("finalize" in key for key in ran)


def _fails_on_the_second_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    if block_info[0]["chunk-location"][0] == 1:
        raise ValueError("block 1 is bad")
    return block


def test_computed_waits_for_the_blocks_and_raises_a_failed_tasks_error(dask_client):
    _, labels, _, _, dl, _ = _uneven(dask_client)
    doubled = computed((dl * 2).persist())
    assert all(f.status == "finished" for f in futures_of(doubled))
    np.testing.assert_array_equal(doubled.compute(), labels * 2)
    failing = dl.map_blocks(_fails_on_the_second_block, dtype=dl.dtype).persist()
    with pytest.raises(ValueError, match="block 1 is bad"):
        computed(failing)
