"""Clean stage: reject bad rows, drop exact duplicates, write the cleaned pixel files.

Every input row ends in exactly one of three places: ``rejected`` (with its reason),
``duplicates`` (with the row it duplicates) or ``cleaned/``. The counts per split are
checked to add up before the stage returns.

One pass over the input does most of the work: each piece is parsed, its valid rows are
written to ``cleaned/`` as one pixel file (:mod:`fmnist_dask.pixelfiles`), its bad rows are
set aside, and a 128-bit hash of each valid row's key (label and pixel bytes) is kept.
Only the hashes are shuffled, 24 bytes a row: rows whose hashes agree are candidates, and
their key bytes, read back from the few files that hold them, are compared exactly; a
copy is removed by rewriting the one file that holds it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.delayed import Delayed

from fmnist_dask import passes, pixelfiles, runfiles
from fmnist_dask._blocks import recycled
from fmnist_dask.config import CleanSpec
from fmnist_dask.pixelfiles import PIXELS, InputError
from fmnist_dask.schema import N_PIXELS
from fmnist_dask.stages.load import ID_COLUMNS, REJECT_COLUMNS, Piece

#: ``hasher(keys) -> hashes``: uint8 keys of shape (n, width) to uint64 of shape (n, 2).
RowHasher = Callable[[np.ndarray], np.ndarray]


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


def row_hash(keys: np.ndarray) -> np.ndarray:
    """BLAKE2b-128 of each row of a uint8 key matrix, as uint64 of shape (n, 2).

    One C call per row: measured faster than two vectorised 64-bit numpy mixes over the
    8-byte words (60,000 keys of 785 bytes: 65 ms against 145 ms, docs/benchmarks.md), and a
    cryptographic hash, so a collision is as good as never seen; dedup compares bytes anyway.
    """
    digests = b"".join(hashlib.blake2b(row, digest_size=16).digest() for row in keys)
    return np.frombuffer(digests, np.uint64).reshape(len(keys), 2)


def key_matrix(pixels: np.ndarray, labels: np.ndarray, dedup_key: str) -> np.ndarray:
    """The bytes two rows must share to be duplicates: pixels, with the label first
    (as ``label + 1``, so an unlabelled row's -1 is a byte too) unless ``dedup_key`` is
    ``"pixels"``."""
    if dedup_key == "pixels":
        return np.ascontiguousarray(pixels)
    label = (labels.astype(np.int16) + 1).astype(np.uint8)
    return np.ascontiguousarray(np.column_stack([label, pixels]))


def part_path(out_dir: Path, first_row_id: int) -> Path:
    """The pixel file of the piece whose first row is ``first_row_id`` (names sort in row
    order)."""
    return Path(out_dir) / f"part-{first_row_id:012d}.parquet"


_HASHED_META = pd.DataFrame({"row_id": pd.Series(dtype="int64"),
                             "hash_hi": pd.Series(dtype="uint64"),
                             "hash_lo": pd.Series(dtype="uint64")})


def _write_piece(frame: pd.DataFrame, out_dir: str, work_dir: str, dedup_key: str,
                 hasher: RowHasher) -> pd.DataFrame:
    """The one pass over a piece: write its valid rows, set its bad rows aside, return the
    valid rows' key hashes."""
    if not len(frame):
        return _HASHED_META
    first_row_id = int(frame["row_id"].iloc[0])
    bad = frame["reject_reason"].notna().to_numpy()
    if bad.any():
        frame.loc[bad, [*ID_COLUMNS, *REJECT_COLUMNS]].to_parquet(
            part_path(Path(work_dir), first_row_id), index=False)
    valid = frame.loc[~bad, [*ID_COLUMNS, PIXELS]].reset_index(drop=True)
    if not len(valid):
        return _HASHED_META
    pixelfiles.write_part(valid, part_path(Path(out_dir), first_row_id))
    keys = key_matrix(pixelfiles.to_numpy(valid[PIXELS]), valid["label"].to_numpy(), dedup_key)
    hashes = hasher(keys)
    return pd.DataFrame({"row_id": valid["row_id"].to_numpy(),
                         "hash_hi": hashes[:, 0], "hash_lo": hashes[:, 1]})


def _colliding(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of one hash bucket whose 128-bit hash another row shares."""
    return frame[frame.duplicated(["hash_hi", "hash_lo"], keep=False)]


def _candidate_keys(path: str, candidates: pd.DataFrame, dedup_key: str) -> pd.DataFrame:
    """The candidates' rows of one pixel file with their key bytes, for the exact comparison."""
    table = pq.read_table(path, columns=["row_id", "label", PIXELS])
    ids = table.column("row_id").to_numpy()
    chosen = np.flatnonzero(np.isin(ids, candidates["row_id"].to_numpy()))
    table = table.take(chosen)
    keys = key_matrix(pixelfiles.to_numpy(table.column(PIXELS)),
                      table.column("label").to_numpy(), dedup_key)
    hash_of = candidates.set_index("row_id")["hash_hi"]
    return pd.DataFrame({"row_id": ids[chosen],
                         "hash_hi": hash_of.loc[ids[chosen]].to_numpy(),
                         "key": _key_column(keys)})


def _key_width(dedup_key: str) -> int:
    return N_PIXELS + (dedup_key != "pixels")


def _key_column(keys: np.ndarray) -> pd.arrays.ArrowExtensionArray:
    """Key rows as one arrow ``binary`` column, moved whole through the shuffle (variable
    width: dask's P2P shuffle cannot name a fixed-size binary type)."""
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(keys.shape[1]), len(keys), [None, pa.py_buffer(np.ascontiguousarray(keys))])
    return pd.arrays.ArrowExtensionArray(fixed.cast(pa.binary()))


def _duplicates_among(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose key bytes equal an earlier (lower row id) row's, as (row_id, duplicate_of)."""
    frame = frame.sort_values("row_id")
    as_bytes = np.asarray(frame["key"].to_numpy(), dtype=bytes)
    # Stable sort (return_index) makes ``first`` the lowest row id of each group.
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    first_of_row = first[inverse.ravel()]
    is_duplicate = first_of_row != np.arange(len(frame))
    row_ids = frame["row_id"].to_numpy()
    return pd.DataFrame({"row_id": row_ids[is_duplicate],
                         "duplicate_of": row_ids[first_of_row[is_duplicate]]}
                        ).astype("int64")


def find_duplicates(hashed: dd.DataFrame, parts: dict[int, str], dedup_key: str
                    ) -> pd.DataFrame:
    """Exact duplicate rows, as ``(row_id, duplicate_of)`` sorted by row id.

    ``hashed`` holds every valid row's ``(row_id, hash_hi, hash_lo)``; ``parts`` maps the
    first row id of each pixel file to its path. Rows whose hashes agree anywhere in the
    data are candidates; their key bytes are read from their files and compared exactly,
    so a hash collision costs a read and is never taken for a duplicate.
    """
    buckets = hashed.shuffle(on="hash_hi", npartitions=max(1, hashed.npartitions // 8))
    candidates = buckets.map_partitions(_colliding, meta=_HASHED_META).compute()
    empty = pd.DataFrame({"row_id": [], "duplicate_of": []}).astype("int64")
    if not len(candidates):
        return empty
    starts = np.array(sorted(parts))
    owner = starts[np.searchsorted(starts, candidates["row_id"].to_numpy(), "right") - 1]
    keyed = candidates.assign(part=owner)
    key_meta = pd.DataFrame({"row_id": pd.Series(dtype="int64"),
                             "hash_hi": pd.Series(dtype="uint64"),
                             "key": _key_column(np.zeros((0, _key_width(dedup_key)), np.uint8))})
    reads = [dask.delayed(_candidate_keys)(parts[int(start)], group, dedup_key)
             for start, group in keyed.groupby("part")]
    keys = dd.from_delayed(reads, meta=key_meta, verify_meta=False)
    groups = keys.shuffle(on="hash_hi", npartitions=max(1, min(len(reads), 64)))
    found = groups.map_partitions(_duplicates_among, meta=empty).compute()
    return found.sort_values("row_id").reset_index(drop=True) if len(found) else empty


def _drop_rows(path: str, row_ids: np.ndarray) -> int:
    """Rewrite one pixel file without the given rows; return the rows it keeps."""
    table = pq.read_table(path)
    keep = ~np.isin(table.column("row_id").to_numpy(), row_ids)
    table = table.filter(keep)
    pixelfiles.write_part(table, Path(path))
    return table.num_rows


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
          run_dir: Path, hasher: RowHasher = row_hash) -> CleanCounts:
    """Validate, deduplicate and write ``run_dir/cleaned/`` (one pixel file per piece).

    Writes ``rejected.parquet`` (quarantine mode) and ``duplicates.parquet`` beside it.
    Raises :class:`BadRowsError` naming file, line and column of the first bad row when
    ``spec.on_bad_rows == "error"`` and any row is bad. ``hasher`` is for tests (a weak
    hash shows that colliding rows are compared, not taken for duplicates).
    """
    out_dir, work_dir = run_dir / runfiles.CLEANED, run_dir / runfiles.WORK
    out_dir.mkdir(parents=True)
    work_dir.mkdir(parents=True)
    hashed = raw.map_partitions(_write_piece, str(out_dir), str(work_dir), spec.dedup_key,
                                hasher, meta=_HASHED_META).persist()
    valid_per_piece = hashed.map_partitions(len).compute()

    read: dict[str, int] = {}
    for piece in pieces:
        read[piece.split] = read.get(piece.split, 0) + piece.n_rows
    rejected_files = sorted(work_dir.glob("*.parquet"))
    rejected_rows = (pd.concat([pd.read_parquet(f) for f in rejected_files])
                     if rejected_files else pd.DataFrame(columns=["row_id", "split"]))
    rejected_counts = {k: int(v) for k, v in rejected_rows["split"].value_counts().items()}
    if len(rejected_rows) and spec.on_bad_rows == "error":
        raise BadRowsError(_first_bad_row(rejected_rows, files))
    if len(rejected_rows):
        rejected_rows = rejected_rows.assign(
            source_file=[files[int(i)] for i in rejected_rows["source_file"]]
        ).sort_values("row_id")
        rejected_rows.to_parquet(run_dir / runfiles.REJECTED, index=False)

    parts = {p.first_row_id: str(part_path(out_dir, p.first_row_id))
             for p, n in zip(pieces, valid_per_piece, strict=True) if n}
    duplicates = find_duplicates(hashed, parts, spec.dedup_key)
    split_of = _split_of_rows(pieces)
    duplicates.insert(1, "split", pd.array(split_of(duplicates["row_id"].to_numpy()),
                                           dtype="string"))
    duplicates.to_parquet(run_dir / runfiles.DUPLICATES, index=False)
    duplicate_counts = {k: int(v) for k, v in duplicates["split"].value_counts().items()}
    starts = np.array(sorted(parts))
    owner = starts[np.searchsorted(starts, duplicates["row_id"].to_numpy(), "right") - 1]
    rewrites = [dask.delayed(_drop_rows)(parts[int(start)], ids["row_id"].to_numpy())
                for start, ids in duplicates.assign(part=owner).groupby("part")]
    dask.compute(*rewrites)
    shutil.rmtree(work_dir)

    counts = CleanCounts(read, rejected_counts, duplicate_counts, kept_per_split(run_dir, pieces))
    counts.check()
    return counts


def _split_of_rows(pieces: list[Piece]) -> Callable[[np.ndarray], np.ndarray]:
    """``split_of(row_ids)``: each row's split, from the pieces' row ranges."""
    starts = np.array([p.first_row_id for p in pieces])
    splits = np.array([p.split for p in pieces], dtype=object)
    return lambda row_ids: splits[np.searchsorted(starts, row_ids, "right") - 1]


def cleaned_parts(run_dir: Path) -> list[Path]:
    """The pixel files of ``run_dir/cleaned/``, in row order."""
    return sorted((run_dir / runfiles.CLEANED).glob("part-*.parquet"))


def kept_per_split(run_dir: Path, pieces: list[Piece]) -> dict[str, int]:
    """Rows per split in ``cleaned/``, from the files' footers (a file holds one piece)."""
    split_of = _split_of_rows(pieces)
    kept: dict[str, int] = {}
    for path in cleaned_parts(run_dir):
        split = split_of(np.array([int(path.stem.removeprefix("part-"))]))[0]
        kept[split] = kept.get(split, 0) + pixelfiles.check_part(path).num_rows
    return kept


@dataclass
class CleanData:
    """The cleaned data as aligned dask arrays with known chunk sizes.

    Attributes
    ----------
    raw_pixels : dask.array, shape (n_rows, 784), uint8
        Pixels as stored (a quarter of the float32 size: what to keep in memory).
    row_id : dask.array, shape (n_rows,), int64
    label : dask.array, shape (n_rows,), int8
        Class ids (-1 when unlabelled); for evaluation only, never given to a model.
    block_splits : tuple of str
        The split of each block's rows (a cleaned file holds rows of one split).
    """

    raw_pixels: da.Array
    row_id: da.Array
    label: da.Array
    block_splits: tuple[str, ...]

    @property
    def split(self) -> da.Array:
        """dask.array, shape (n_rows,), object: each row's split name.

        Made per block beside the labels, not read from the files: reads are root tasks,
        which the scheduler holds back while the workers are busy, and the labels are kept
        in worker memory (pipeline's clean stage).
        """
        return self.label.map_blocks(_split_block, self.block_splits, dtype=object)

    @property
    def pixels(self) -> da.Array:
        """dask.array, shape (n_rows, 784), float32: pixels scaled to [0, 1]."""
        return scale_pixels(self.raw_pixels)

    @property
    def n_rows(self) -> int:
        return int(self.raw_pixels.shape[0])


def _split_block(labels: np.ndarray, splits: tuple[str, ...],
                 block_id: tuple[int] = (0,)) -> np.ndarray:
    return np.full(len(labels), splits[block_id[0]], dtype=object)


def _split_of_part(footer: pq.FileMetaData, path: Path) -> str:
    """The split of a cleaned file's rows, from its column statistics (no data read)."""
    if footer.num_rows == 0:
        return ""
    column = footer.schema.to_arrow_schema().get_field_index("split")
    names = set()
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        names |= {stats.min, stats.max} if stats is not None and stats.has_min_max else {None}
    if len(names) != 1 or None in names:
        raise InputError(f"{path}: a cleaned file must hold the rows of one split, "
                         f"its statistics say {sorted(map(str, names))}")
    return names.pop()


def _scale_block(block: np.ndarray) -> np.ndarray:
    # Every streamed pass scales every block: into recycled memory, in place (the same
    # IEEE division as ``block / 255`` in float32, bit for bit, without a temporary).
    passes.note("scaled", block.nbytes)
    scaled = recycled(block.shape, np.float32)
    np.copyto(scaled, block, casting="unsafe")
    scaled /= np.float32(255)
    return scaled


def scale_pixels(raw: da.Array) -> da.Array:
    """uint8 pixels (n, 784) to float32 in [0, 1], block by block (lazy)."""
    return raw.map_blocks(_scale_block, dtype=np.float32)


def _read_part(path: str, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pixel file's images, row ids and labels, read by one task."""
    return (pixelfiles.read_pixels(path, rows), pixelfiles.read_column(path, "row_id"),
            pixelfiles.read_column(path, "label"))


def load_cleaned(run_dir: Path, in_memory: bool = False) -> CleanData:
    """Open ``run_dir/cleaned/`` as :class:`CleanData`, one block per pixel file.

    Row counts come from the files' footers, read here; each file is checked again when a
    task reads it, so a file missing, truncated or foreign stops the run (:class:`InputError`,
    exit 3) with its name.

    ``in_memory``: every array is computed now and kept in worker memory, each file's
    images, row ids and labels read by one task, so that a block's three parts are on one
    worker. Read apart (the default, for pixels too large to keep: each pass over them
    reads the files), the parts of one block were on different workers in half the blocks,
    and a task needing two of them waited for a transfer from a worker that could be inside
    a long task (docs/benchmarks.md, "Session 18").
    """
    parts = cleaned_parts(run_dir)
    if not parts:
        raise InputError(f"{run_dir / runfiles.CLEANED}: no pixel files (part-*.parquet)")
    footers = [pixelfiles.check_part(p) for p in parts]
    lengths = [f.num_rows for f in footers]
    block_splits = tuple(_split_of_part(f, p) for f, p in zip(footers, parts, strict=True))
    shapes = {"pixels": (N_PIXELS,), "row_id": (), "label": ()}
    dtypes = {"pixels": np.uint8, "row_id": np.int64, "label": np.int8}

    def stack(blocks: list[Delayed], name: str) -> da.Array:
        return da.concatenate([
            da.from_delayed(block, shape=(n, *shapes[name]), dtype=dtypes[name])
            for block, n in zip(blocks, lengths, strict=True)])

    if in_memory:
        reads = [dask.delayed(_read_part, pure=True, nout=3)(str(p), n)
                 for p, n in zip(parts, lengths, strict=True)]
        arrays = dask.persist(*(stack([r[i] for r in reads], name)
                                for i, name in enumerate(shapes)))
    else:
        # Row ids and classes (9 bytes a row) stay in worker memory all the same. Read
        # from the files, their tasks would be root tasks, which the scheduler holds back
        # while the workers are busy with tasks already sent to them, whatever the
        # priorities: the reduce stage waited 13 s for the raw silhouette's 246 tasks to
        # drain before writing its rows (docs/benchmarks.md, "Big data, session 12").
        columns = {name: [dask.delayed(pixelfiles.read_column, pure=True)(str(p), name)
                          for p in parts] for name in ("row_id", "label")}
        row_id, label = dask.persist(*(stack(columns[name], name) for name in columns))
        pixels = stack([dask.delayed(pixelfiles.read_pixels, pure=True)(str(p), n)
                        for p, n in zip(parts, lengths, strict=True)], "pixels")
        arrays = (pixels, row_id, label)
    return CleanData(*arrays, block_splits=block_splits)
