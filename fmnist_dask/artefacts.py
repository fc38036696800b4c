"""Writing aligned dask arrays as parquet, block by block on the workers.

Per-row results (projections, cluster assignments, embeddings) are dask arrays chunked
like the cleaned data. Each row block becomes one parquet file written by the worker that
holds it, so nothing is gathered to the client.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd


def _write_block(index: np.ndarray, *blocks: np.ndarray, names: list[str], out_dir: str
                 ) -> np.ndarray:
    columns: dict[str, np.ndarray] = {}
    for name, block in zip(names, blocks, strict=True):
        if block.ndim == 1:
            columns[name] = block
        else:  # a 2-D block becomes name1..nameK
            for j in range(block.shape[1]):
                columns[f"{name}{j + 1}"] = block[:, j]
    frame = pd.DataFrame(columns)
    frame.to_parquet(f"{out_dir}/part.{int(index[0])}.parquet", index=False)
    return np.array([len(frame)])


def _block_number(block: np.ndarray, block_id: tuple[int, ...] = (0,)) -> np.ndarray:
    return np.array([block_id[0]], dtype=np.int64)


def write_aligned_parquet(out_dir: Path, columns: dict[str, da.Array]) -> int:
    """Write row-aligned arrays as ``out_dir/part.N.parquet``, one file per row block.

    Parameters
    ----------
    out_dir : Path
        Directory to (re)create.
    columns : dict of str to dask.array.Array
        Arrays with the same number of rows; a 1-D array becomes one column, a 2-D array
        of width K becomes columns ``name1..nameK``. They are rechunked to the row chunks
        of the first array.

    Returns
    -------
    int
        Rows written.
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    names = list(columns)
    first = columns[names[0]]
    chunks = first.chunks[0]
    arrays = []
    for name in names:
        array = columns[name]
        if array.shape[0] != first.shape[0]:
            raise ValueError(
                f"column {name!r} has {array.shape[0]} rows, expected {first.shape[0]}"
            )
        if array.ndim == 2 and array.numblocks[1] != 1:
            array = array.rechunk({1: -1})
        if array.chunks[0] != chunks:
            array = array.rechunk({0: chunks})
        arrays.append(array)
    # One blockwise task per row block (its position comes in as a one-element block):
    # picking the blocks one by one (``a.blocks[i].to_delayed()``) costs a pass over the
    # whole graph per block, minutes of client time at 700 blocks. The positions are made
    # from the first array's blocks, not by ``da.arange``: those would be root tasks, which
    # the scheduler holds back while the workers are busy with other stages' tasks.
    index = first.map_blocks(_block_number, chunks=((1,) * len(chunks),),
                             drop_axis=list(range(1, first.ndim)), dtype=np.int64)
    pairs = [(a, "ij" if a.ndim == 2 else "i") for a in arrays]
    written = da.blockwise(
        _write_block, "i", index, "i", *[x for pair in pairs for x in pair],
        names=names, out_dir=str(out_dir), align_arrays=False, concatenate=True,
        adjust_chunks={"i": 1}, dtype=np.int64, meta=np.empty((0,), dtype=np.int64),
    )
    return int(written.sum().compute())
