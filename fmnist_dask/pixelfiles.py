"""Images on disk for streaming: parquet files with one ``fixed_size_binary(784)`` pixel column.

Each row keeps its image as 784 uint8 bytes in the ``pixels`` column, beside its metadata
(``row_id``, ``split``, ``source_file``, ``source_line``, ``label``). One pass of a stage
over the pixels reads that one column, a memory copy per file. The layout was chosen by
measurement (benchmarks/bench_pixel_storage.py, docs/benchmarks.md "Pixel storage"): at
1.12 M images it is read back 11-14x faster than 784 INT32 columns and faster than a Zarr
array with any codec tried, and compression does not pay (noisy augmented images shrink by
a quarter at best and take 2.5x longer to read).

The files carry no pandas metadata, so pandas, DuckDB and pyarrow read them as plain
tables; ``pixels`` arrives as 784-byte values (see outputs/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist_dask import passes
from fmnist_dask.schema import N_PIXELS

PIXELS = "pixels"
PIXEL_TYPE = pa.binary(N_PIXELS)


class InputError(ValueError):
    """Input that cannot be read at all (missing, empty, truncated, foreign); names the file."""


def to_arrow(images: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 images of shape (n, 784) as a ``fixed_size_binary(784)`` array (no copy)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(PIXEL_TYPE, len(images),
                                                [None, pa.py_buffer(images)])


def to_series(images: np.ndarray, index: pd.Index | None = None) -> pd.Series:
    """uint8 images of shape (n, 784) as a pandas column of arrow dtype (no copy)."""
    return pd.Series(pd.arrays.ArrowExtensionArray(to_arrow(images)), index=index, name=PIXELS)


def to_numpy(values: pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
    """Images of a pixel column as a uint8 array of shape (n, 784).

    No copy for a single-chunk arrow column; null entries (never in a validated column)
    come back as whatever bytes their slot holds.
    """
    if isinstance(values, pd.Series):
        values = pa.array(values.array) if isinstance(values.dtype, pd.ArrowDtype) else \
            pa.array(values.to_numpy(), type=PIXEL_TYPE)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if values.type != PIXEL_TYPE:
        raise TypeError(f"pixel column is {values.type}, expected {PIXEL_TYPE}")
    start = values.offset * N_PIXELS
    data = np.frombuffer(values.buffers()[1], np.uint8)
    return data[start:start + len(values) * N_PIXELS].reshape(len(values), N_PIXELS)


def write_part(rows: pd.DataFrame | pa.Table, path: Path) -> None:
    """Write ``rows`` as one parquet file: ``pixels`` uncompressed, the rest snappy, every
    page with a CRC checksum (a corrupt page is then an error when read, not wrong pixels;
    verifying costs ~4 GB/s).

    Written to a temporary name and renamed, so a file under its own name is complete.
    """
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata(None)
    codecs = {name: "none" if name == PIXELS else "snappy" for name in table.column_names}
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression=codecs, use_dictionary=[c for c in codecs
                                                                   if c != PIXELS],
                   write_statistics=[c for c in codecs if c != PIXELS],
                   write_page_checksum=True)
    tmp.replace(path)


def check_part(path: Path | str, rows: int | None = None) -> pq.FileMetaData:
    """The footer of a pixel file, after checking it is one (:class:`InputError` if not).

    Checks that the file exists and is parquet (a truncated file has no footer), that its
    ``pixels`` column is ``fixed_size_binary(784)`` and, when ``rows`` is given, that it
    holds that many rows.
    """
    return _open_part(path, rows).metadata


#: Pixel files whose every page checksum this process has verified, with the size and
#: modification time they had then: ``{path: (bytes, mtime_ns)}``.
_VERIFIED: dict[str, tuple[int, int]] = {}


def _file_version(path: Path | str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: pixel file is missing") from None
    return stat.st_size, stat.st_mtime_ns


def _open_part(path: Path | str, rows: int | None, verify: bool = True,
               memory_map: bool = False) -> pq.ParquetFile:
    try:
        handle = pq.ParquetFile(path, page_checksum_verification=verify, memory_map=memory_map)
    except FileNotFoundError:
        raise InputError(f"{path}: pixel file is missing") from None
    except Exception as error:  # pyarrow raises several types for non-parquet bytes
        raise InputError(f"{path}: not a parquet pixel file, or truncated ({error})") from None
    schema = handle.schema_arrow
    if PIXELS not in schema.names:
        raise InputError(f"{path}: no {PIXELS!r} column (columns: {', '.join(schema.names)})")
    found = schema.field(PIXELS).type
    if found != PIXEL_TYPE:
        raise InputError(f"{path}: column {PIXELS!r} is {found}, expected {PIXEL_TYPE} "
                         "(784 uint8 pixels per row)")
    if rows is not None and handle.metadata.num_rows != rows:
        raise InputError(f"{path}: holds {handle.metadata.num_rows} rows, expected {rows}")
    return handle


def read_pixels(path: Path | str, rows: int | None = None) -> np.ndarray:
    """The images of one pixel file, uint8 of shape (n, 784), after :func:`check_part`;
    every page's checksum is verified the first time this process reads the file (and
    again whenever its size or modification time has changed)."""
    # Checksums verified once per process: k-means' streamed passes read every file ~90
    # times, and verifying cost more than the read itself (4.2 against 1.7 ms for a
    # 10,000-row file, memory-mapped). A file changed since (size or mtime) is verified again.
    version = _file_version(path)
    verify = _VERIFIED.get(str(path)) != version
    handle = _open_part(path, rows, verify=verify, memory_map=True)
    try:
        column = handle.read(columns=[PIXELS]).column(PIXELS)
    except Exception as error:  # a page cut short or corrupt
        raise InputError(f"{path}: pixel data cannot be read ({error})") from None
    if column.null_count:
        raise InputError(f"{path}: {column.null_count} rows have no pixels")
    if verify:
        _VERIFIED[str(path)] = version
    images = to_numpy(column)
    passes.note("read", images.nbytes)
    return images


def read_column(path: Path | str, name: str) -> np.ndarray:
    """One metadata column of a pixel file as numpy (object for strings)."""
    try:
        table = pq.read_table(path, columns=[name], page_checksum_verification=True)
    except Exception as error:  # missing, truncated or corrupt
        raise InputError(f"{path}: column {name!r} cannot be read ({error})") from None
    return table.column(name).to_numpy(zero_copy_only=False)
