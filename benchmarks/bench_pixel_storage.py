"""Pixel storage benchmark: how fast the cleaned pixels can be written and read back, by format.

Issue 17 asks for the format the job's scalable stages stream from, chosen by measurement at
16x (1.12 million images). The rows are real: the 70,000 official images plus 15 augmented
copies of each (the job's own ``augment`` transforms, seed 0). Each format holds the same
uint8 matrix, cut into files (parquet) or chunks (Zarr) of ``--rows-per-part`` rows, and is
read back whole into one uint8 array (n, 784), one part after the other in one process, as a
job task reads its block. The files are in the page cache (just written, as in a job run).

Formats:
  * ``parquet-int32x784``: the layout before issue 17, one INT32 (uint8 logical) column per pixel.
  * ``parquet-binary-<codec>``: one ``fixed_size_binary(784)`` column, codec none/snappy/zstd.
  * ``zarr-<codec>``: a Zarr v3 uint8 array (n, 784), chunks of ``rows-per-part`` rows,
    codec none/zstd (Zarr's default)/blosc-lz4.

Reproduce (from the repository root, after ``make install``, quiet machine)::

    .venv/bin/python benchmarks/bench_pixel_storage.py --mirror ../shared/data/fashion-mnist

Writes ``benchmarks/results/pixel_storage.json``; prints a markdown table (in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist_dask.augment import apply_transforms, draw_transforms
from fmnist_dask.config import AugmentSpec
from fmnist_dask.schema import N_PIXELS, PIXEL_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def official_images(mirror: Path) -> np.ndarray:
    parts = []
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        data = gzip.open(mirror / name).read()
        parts.append(np.frombuffer(data, np.uint8, offset=16).reshape(-1, N_PIXELS))
    return np.concatenate(parts)


def _copy(args: tuple[np.ndarray, int]) -> np.ndarray:
    images, copy = args
    rng = np.random.default_rng([0, copy])
    return apply_transforms(images, draw_transforms(rng, len(images), AugmentSpec()), rng)


def augmented(images: np.ndarray, factor: int) -> np.ndarray:
    with ProcessPoolExecutor(2) as pool:
        copies = list(pool.map(_copy, [(images, c) for c in range(1, factor)]))
    return np.concatenate([images, *copies])


# --- writers and readers: one part = one file (parquet) or one chunk (Zarr) ---------------


def write_int32(pixels: np.ndarray, out: Path, rows: int) -> None:
    out.mkdir()
    for i, start in enumerate(range(0, len(pixels), rows)):
        block = pixels[start:start + rows]
        table = pa.table({name: block[:, j] for j, name in enumerate(PIXEL_COLUMNS)})
        pq.write_table(table, out / f"part.{i}.parquet")


def read_int32(out: Path) -> np.ndarray:
    blocks = []
    for path in sorted(out.glob("*.parquet"), key=lambda p: int(p.stem.split(".")[1])):
        table = pq.read_table(path)
        blocks.append(np.column_stack([c.to_numpy() for c in table.columns]).astype(np.uint8))
    return np.concatenate(blocks)


def binary_column(block: np.ndarray) -> pa.Array:
    block = np.ascontiguousarray(block)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(N_PIXELS), len(block),
                                                [None, pa.py_buffer(block)])


def write_binary(codec: str) -> Callable[[np.ndarray, Path, int], None]:
    def write(pixels: np.ndarray, out: Path, rows: int) -> None:
        out.mkdir()
        for i, start in enumerate(range(0, len(pixels), rows)):
            table = pa.table({"pixels": binary_column(pixels[start:start + rows])})
            pq.write_table(table, out / f"part.{i}.parquet", compression=codec,
                           use_dictionary=False, write_statistics=False)
    return write


def read_binary(out: Path) -> np.ndarray:
    blocks = []
    for path in sorted(out.glob("*.parquet"), key=lambda p: int(p.stem.split(".")[1])):
        column = pq.read_table(path, columns=["pixels"]).column("pixels").combine_chunks()
        blocks.append(np.frombuffer(column.buffers()[1], np.uint8)
                      [column.offset * N_PIXELS:(column.offset + len(column)) * N_PIXELS]
                      .reshape(-1, N_PIXELS))
    return np.concatenate(blocks)


def write_zarr(codec: str) -> Callable[[np.ndarray, Path, int], None]:
    def write(pixels: np.ndarray, out: Path, rows: int) -> None:
        import zarr
        from zarr.codecs import BloscCodec, ZstdCodec

        compressors = {"none": None, "zstd": ZstdCodec(level=0), "blosc-lz4": BloscCodec(
            cname="lz4", clevel=5, shuffle="bitshuffle")}[codec]
        array = zarr.create_array(str(out), shape=pixels.shape, chunks=(rows, N_PIXELS),
                                  dtype="uint8", compressors=compressors)
        for start in range(0, len(pixels), rows):
            array[start:start + rows] = pixels[start:start + rows]
    return write


def read_zarr(out: Path) -> np.ndarray:
    import zarr

    array = zarr.open_array(str(out), mode="r")
    rows = array.chunks[0]
    return np.concatenate([array[start:start + rows] for start in range(0, array.shape[0], rows)])


FORMATS: dict[str, tuple[Callable, Callable]] = {
    "parquet-int32x784": (write_int32, read_int32),
    "parquet-binary-none": (write_binary("none"), read_binary),
    "parquet-binary-snappy": (write_binary("snappy"), read_binary),
    "parquet-binary-zstd": (write_binary("zstd"), read_binary),
    "zarr-none": (write_zarr("none"), read_zarr),
    "zarr-zstd": (write_zarr("zstd"), read_zarr),
    "zarr-blosc-lz4": (write_zarr("blosc-lz4"), read_zarr),
}


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mirror", type=Path, default=REPO.parent / "shared/data/fashion-mnist")
    parser.add_argument("--factor", type=int, default=16)
    parser.add_argument("--rows-per-part", type=int, nargs="+", default=[10_000, 70_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/pixel_storage.json")
    args = parser.parse_args()

    start = time.perf_counter()
    pixels = augmented(official_images(args.mirror), args.factor)
    print(f"{len(pixels):,} rows ({pixels.nbytes / 1e9:.2f} GB uint8) built in "
          f"{time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    results = []
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks/results") as tmp:
        for rows in args.rows_per_part:
            for name in args.formats:
                write, read = FORMATS[name]
                out = Path(tmp) / f"{name}-{rows}"
                begin = time.perf_counter()
                write(pixels, out, rows)
                write_s = time.perf_counter() - begin
                reads = []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    back = read(out)
                    reads.append(time.perf_counter() - begin)
                assert np.array_equal(back, pixels), name
                del back
                row = {"format": name, "rows_per_part": rows, "write_s": write_s,
                       "read_s": reads, "read_median_s": statistics.median(reads),
                       "disk_bytes": disk_bytes(out), "load_average": os.getloadavg()[0]}
                results.append(row)
                print(f"{name:24s} {rows:>7,} rows/part  write {write_s:6.2f} s  read median "
                      f"{row['read_median_s']:6.2f} s  {row['disk_bytes'] / 1e9:5.2f} GB  "
                      f"load {row['load_average']:.2f}", flush=True)
                shutil.rmtree(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": len(pixels), "uint8_bytes": int(pixels.nbytes),
                                    "results": results}, indent=2) + "\n")
    reference = {r["rows_per_part"]: r["read_median_s"] for r in results
                 if r["format"] == "parquet-int32x784"}
    print("\n| format | rows per part | write (s) | read, median of "
          f"{args.repeats} (s) | vs int32x784 | on disk (GB) | read GB/s of uint8 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = reference.get(r["rows_per_part"], float("nan")) / r["read_median_s"]
        print(f"| {r['format']} | {r['rows_per_part']:,} | {r['write_s']:.2f} | "
              f"{r['read_median_s']:.2f} | {ratio:.1f}x | {r['disk_bytes'] / 1e9:.2f} | "
              f"{pixels.nbytes / 1e9 / r['read_median_s']:.2f} |")


if __name__ == "__main__":
    main()
