"""Clean stage: reject bad rows, drop exact duplicates, write the cleaned parquet.

Every input row ends in exactly one of three places: ``rejected`` (with its reason),
``duplicates`` (with the row it duplicates) or the cleaned parquet. The counts per split
are checked to add up before the stage returns.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fmnist_dask import runfiles
from fmnist_dask.config import CleanSpec
from fmnist_dask.schema import PIXEL_COLUMNS
from fmnist_dask.stages.load import ID_COLUMNS, REJECT_COLUMNS, Piece

_MIX = np.uint64(0xFF51AFD7ED558CCD)


class BadRowsError(ValueError):
    """Bad rows found while ``on_bad_rows: error``; the message names file, line, column."""


@dataclass
class CleanCounts:
    """Row accounting per split: ``read == rejected + duplicates + kept``."""

    read: dict[str, int]
    rejected: dict[str, int]
    duplicates: dict[str, int]
    kept: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Per-split counts plus a ``total`` entry, as plain ints for JSON."""
        splits = list(self.read)
        out = {
            split: {
                "read": self.read[split],
                "rejected": self.rejected.get(split, 0),
                "duplicates": self.duplicates.get(split, 0),
                "kept": self.kept.get(split, 0),
            }
            for split in splits
        }
        out["total"] = {k: sum(out[s][k] for s in splits) for k in out[splits[0]]}
        return out

    def check(self) -> None:
        """Raise if any split's rows are not all accounted for."""
        for split, row in self.as_dict().items():
            if row["read"] != row["rejected"] + row["duplicates"] + row["kept"]:
                raise AssertionError(f"rows of split {split!r} do not add up: {row}")


def _bucket_hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of a uint8 key matrix, used only to co-locate equal rows.

    Equality is decided later on the bytes themselves, so collisions cost nothing but
    a slightly larger bucket.
    """
    n_rows, width = keys.shape
    padded = np.zeros((n_rows, -(-width // 8) * 8), np.uint8)
    padded[:, :width] = keys
    words = padded.view(np.uint64)
    hashed = np.full(n_rows, 0x9E3779B97F4A7C15, np.uint64)
    for column in range(words.shape[1]):  # loop over 8-byte words, vectorised over rows
        hashed ^= words[:, column]
        hashed *= _MIX
        hashed ^= hashed >> np.uint64(33)
    return hashed


def _key_matrix(frame: pd.DataFrame, dedup_key: str) -> np.ndarray:
    pixels = frame[list(PIXEL_COLUMNS)].to_numpy(np.uint8)
    if dedup_key == "pixels":
        return np.ascontiguousarray(pixels)
    label = (frame["label"].to_numpy(np.int16) + 1).astype(np.uint8)
    return np.ascontiguousarray(np.column_stack([label, pixels]))


def _keyed(frame: pd.DataFrame, dedup_key: str) -> pd.DataFrame:
    """Narrow frame for the shuffle: ids, the key's bytes in one column, its bucket hash.

    Moving one binary column instead of 785 narrow ones keeps the shuffle cheap.
    """
    keys = _key_matrix(frame, dedup_key)
    return pd.DataFrame(
        {
            "row_id": frame["row_id"].to_numpy(),
            "split": frame["split"].to_numpy(),
            # Fixed-width bytes drop trailing NULs when boxed; all keys share one width,
            # so re-padding them on the other side restores them exactly.
            "key": keys.view(f"S{keys.shape[1]}").ravel().astype(object),
            "_bucket": _bucket_hash(keys) if len(frame) else np.zeros(0, np.uint64),
        }
    )


def _duplicates_in_bucket(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of one hash bucket whose key bytes equal an earlier (lower row id) row's."""
    frame = frame.sort_values("row_id")
    as_bytes = np.asarray(frame["key"].to_numpy(), dtype=bytes)
    # Stable sort (return_index) makes ``first`` the lowest row id of each group.
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    first_of_row = first[inverse.ravel()]
    is_duplicate = first_of_row != np.arange(len(frame))
    row_ids = frame["row_id"].to_numpy()
    return pd.DataFrame(
        {
            "row_id": row_ids[is_duplicate],
            "split": frame["split"].to_numpy()[is_duplicate],
            "duplicate_of": row_ids[first_of_row[is_duplicate]],
        }
    ).astype({"row_id": "int64", "split": "string", "duplicate_of": "int64"})


def find_duplicates(valid: dd.DataFrame, dedup_key: str) -> dd.DataFrame:
    """Exact duplicate rows across all partitions, as ``(row_id, split, duplicate_of)``.

    Rows are hash-partitioned on their key so that all copies of a row meet in one
    partition, wherever they started (another partition, another file, another split);
    there the key bytes are compared exactly and the copy with the lowest row id is kept.
    """
    columns = ["row_id", "split", "label", *PIXEL_COLUMNS]
    meta_keyed = pd.DataFrame({"row_id": pd.Series(dtype="int64"),
                               "split": pd.Series(dtype="string"),
                               "key": pd.Series(dtype=object),
                               "_bucket": pd.Series(dtype="uint64")})
    keyed = valid[columns].map_partitions(_keyed, dedup_key, meta=meta_keyed)
    buckets = keyed.shuffle(on="_bucket", npartitions=max(valid.npartitions, 1))
    meta = pd.DataFrame(
        {"row_id": pd.Series(dtype="int64"), "split": pd.Series(dtype="string"),
         "duplicate_of": pd.Series(dtype="int64")}
    )
    return buckets.map_partitions(_duplicates_in_bucket, meta=meta)


def _drop_rows(frame: pd.DataFrame, row_ids: np.ndarray) -> pd.DataFrame:
    return frame[~np.isin(frame["row_id"].to_numpy(), row_ids)]


def _first_bad_row(rejected: pd.DataFrame, files: list[str]) -> str:
    first = rejected.sort_values("row_id").iloc[0]
    more = len(rejected) - 1
    tail = f" ({more} more bad row{'s' if more != 1 else ''})" if more else ""
    path = files[int(first["source_file"])]
    unit = "line" if ".csv" in path else "row"
    return (
        f"{path}: {unit} {int(first['source_line'])}, "
        f"column {first['reject_column']}: {first['reject_reason']}{tail}. "
        "Fix the input or set clean.on_bad_rows: quarantine to set bad rows aside."
    )


def clean(raw: dd.DataFrame, pieces: list[Piece], files: list[str], spec: CleanSpec,
          run_dir: Path) -> CleanCounts:
    """Validate, deduplicate and write ``run_dir/cleaned/`` (uint8 pixels, ids, labels).

    Writes ``rejected.parquet`` (quarantine mode) and ``duplicates.parquet`` beside it.
    Raises :class:`BadRowsError` naming file, line and column of the first bad row when
    ``spec.on_bad_rows == "error"`` and any row is bad.
    """
    keep_columns = [*ID_COLUMNS, *PIXEL_COLUMNS]
    is_bad = ~raw["reject_reason"].isna()
    valid = raw[~is_bad][keep_columns]
    rejected = raw[is_bad][[*ID_COLUMNS, *REJECT_COLUMNS]]

    work = run_dir / runfiles.WORK
    validated_dir = work / "validated"
    write_valid = valid.to_parquet(validated_dir, write_index=False, compute=False)
    _, rejected_rows = dask.compute(write_valid, rejected)
    read = {}
    for piece in pieces:
        read[piece.split] = read.get(piece.split, 0) + piece.n_rows
    rejected_counts = {k: int(v) for k, v in rejected_rows["split"].value_counts().items()}
    if len(rejected_rows) and spec.on_bad_rows == "error":
        raise BadRowsError(_first_bad_row(rejected_rows, files))
    if len(rejected_rows):
        rejected_rows = rejected_rows.assign(
            source_file=[files[int(i)] for i in rejected_rows["source_file"]]
        ).sort_values("row_id")
        rejected_rows.to_parquet(run_dir / runfiles.REJECTED, index=False)

    validated = dd.read_parquet(validated_dir)
    duplicates = find_duplicates(validated, spec.dedup_key).compute().sort_values("row_id")
    duplicates.to_parquet(run_dir / runfiles.DUPLICATES, index=False)
    duplicate_counts = {k: int(v) for k, v in duplicates["split"].value_counts().items()}

    ids = dask.delayed(np.sort(duplicates["row_id"].to_numpy()))
    kept = validated.map_partitions(_drop_rows, ids, meta=validated._meta)
    kept.to_parquet(run_dir / runfiles.CLEANED, write_index=False)
    shutil.rmtree(work)

    counts = CleanCounts(read, rejected_counts, duplicate_counts, kept_per_split(run_dir))
    counts.check()
    return counts


def _parquet_parts(run_dir: Path) -> list[Path]:
    return sorted((run_dir / runfiles.CLEANED).glob("*.parquet"), key=lambda p: _part_number(p))


def _part_number(path: Path) -> int:
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return int(digits) if digits else 0


def kept_per_split(run_dir: Path) -> dict[str, int]:
    """Rows per split in the cleaned parquet (reads only the ``split`` column)."""
    frame = dd.read_parquet(run_dir / runfiles.CLEANED, columns=["split"])
    per_part = frame.map_partitions(lambda part: part["split"].value_counts()).compute()
    return {k: int(v) for k, v in per_part.groupby(level=0).sum().items()}


@dataclass
class CleanData:
    """The cleaned data as aligned dask arrays with known chunk sizes.

    Attributes
    ----------
    raw_pixels : dask.array, shape (n_rows, 784), uint8
        Pixels as stored (a quarter of the float32 size: what to keep in memory).
    row_id : dask.array, shape (n_rows,), int64
    split : dask.array, shape (n_rows,), object (split names)
    label : dask.array, shape (n_rows,), int8
        Class ids (-1 when unlabelled); for evaluation only, never given to a model.
    """

    raw_pixels: da.Array
    row_id: da.Array
    split: da.Array
    label: da.Array

    @property
    def pixels(self) -> da.Array:
        """dask.array, shape (n_rows, 784), float32: pixels scaled to [0, 1]."""
        return scale_pixels(self.raw_pixels)

    @property
    def n_rows(self) -> int:
        return int(self.raw_pixels.shape[0])


def _read_pixels(path: Path) -> np.ndarray:
    table = pq.read_table(path, columns=list(PIXEL_COLUMNS))
    return np.column_stack([col.to_numpy() for col in table.columns]).astype(np.uint8)


def _scale_block(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32) / np.float32(255)


def scale_pixels(raw: da.Array) -> da.Array:
    """uint8 pixels (n, 784) to float32 in [0, 1], block by block (lazy)."""
    return raw.map_blocks(_scale_block, dtype=np.float32)


def _read_column(path: Path, name: str) -> np.ndarray:
    return pq.read_table(path, columns=[name]).column(name).to_numpy(zero_copy_only=False)


def load_cleaned(run_dir: Path) -> CleanData:
    """Open ``run_dir/cleaned/`` as :class:`CleanData`; row counts come from parquet metadata."""
    parts = _parquet_parts(run_dir)
    lengths = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    parts = [p for p, n in zip(parts, lengths, strict=True) if n]
    lengths = [n for n in lengths if n]

    def stack(reader, dtype, *args, width: int | None = None) -> da.Array:
        blocks = [
            da.from_delayed(dask.delayed(reader)(p, *args),
                            shape=(n, width) if width else (n,), dtype=dtype)
            for p, n in zip(parts, lengths, strict=True)
        ]
        return da.concatenate(blocks, axis=0)

    return CleanData(
        raw_pixels=stack(_read_pixels, np.uint8, width=len(PIXEL_COLUMNS)),
        row_id=stack(_read_column, np.int64, "row_id"),
        split=stack(_read_column, object, "split"),
        label=stack(_read_column, np.int8, "label"),
    )
