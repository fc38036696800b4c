"""Load stage: CSV (plain or gzip), parquet or IDX files into one validated dask dataframe.

The input is cut into *pieces* (byte ranges of a CSV, row groups of a parquet file, row
ranges of an IDX file) whose row counts are known before parsing, so every row gets a
stable ``row_id`` (its position in the whole input) and its line number in its file.
Each piece is parsed on a worker into the *raw frame*: the pixels and label of every
well-formed row, and for every bad row the column and the reason it was rejected, so no
input row is ever lost.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from dask.utils import parse_bytes

from fmnist_dask import pixelfiles
from fmnist_dask.config import DataSpec
from fmnist_dask.pixelfiles import PIXELS, InputError
from fmnist_dask.schema import CSV_COLUMNS, N_PIXELS, PIXEL_COLUMNS

NO_LABEL = -1
ID_COLUMNS = ("row_id", "split", "source_file", "source_line", "label")
REJECT_COLUMNS = ("reject_column", "reject_reason", "content")
IDX_ROWS_PER_PIECE = 10_000


@dataclass(frozen=True)
class Piece:
    """A part of one input file whose rows are parsed by one task.

    ``first_line`` is the 1-based line number (CSV) or row number (IDX, parquet) of the
    piece's first row in its file; ``first_row_id`` its position in the whole input.
    """

    split: str
    file_index: int
    path: str
    kind: str  # "csv", "parquet" or "idx"
    offset: int
    length: int | None
    has_header: bool
    labelled: bool
    first_line: int = 1
    first_row_id: int = 0
    n_rows: int = 0


def raw_meta() -> pd.DataFrame:
    """Empty frame with the raw frame's columns and dtypes (dask's ``meta``)."""
    frame = pd.DataFrame(
        {
            "row_id": pd.Series(dtype="int64"),
            "split": pd.Series(dtype="string"),
            "source_file": pd.Series(dtype="int16"),
            "source_line": pd.Series(dtype="int64"),
            "label": pd.Series(dtype="int8"),
        }
    )
    frame[PIXELS] = pixelfiles.to_series(np.zeros((0, N_PIXELS), np.uint8))
    for column in REJECT_COLUMNS:
        frame[column] = pd.Series(dtype="string")
    return frame


# ---------------------------------------------------------------------------------------
# Finding files and cutting them into pieces


def resolve_inputs(spec: DataSpec) -> list[tuple[str, str]]:
    """Expand the spec's splits into ``(split, path)`` pairs, in spec order.

    Raises :class:`InputError` naming any path that matches no file.
    """
    pairs = []
    for split, entries in spec.splits.items():
        for entry in [entries] if isinstance(entries, str) else entries:
            full = entry if "://" in entry or entry.startswith("/") else f"{spec.dir}/{entry}"
            if "://" in full:
                fs, _, paths = fsspec.get_fs_token_paths(full)
                found = [fs.unstrip_protocol(p) for p in sorted(paths)]
            elif any(ch in full for ch in "*?["):
                found = sorted(globlib.glob(full))
            else:
                found = [full] if Path(full).exists() else []
            if spec.format == "parquet":
                found = [f for p in found for f in _parquet_files(p)]
            if not found:
                raise InputError(f"{full}: no such file (split {split!r})")
            pairs.extend((split, path) for path in found)
    return pairs


def _parquet_files(path: str) -> list[str]:
    if Path(path).is_dir():
        return sorted(str(p) for p in Path(path).rglob("*.parquet"))
    return [path]


def _open(path: str):
    return fsspec.open(path, "rb", compression="infer").open()


def read_header(path: str) -> tuple[list[str], bool]:
    """Check a CSV's header line; return its columns and whether it has a label column.

    Raises :class:`InputError` naming the file when it is empty, not text, or its header
    is not ``label,pixel1..pixel784`` (or ``pixel1..pixel784`` for unlabelled data).
    """
    try:
        with _open(path) as handle:
            first = handle.readline(64 * 1024)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise InputError(f"{path}: cannot be read as CSV ({error})") from None
    if not first.strip():
        raise InputError(f"{path}: file is empty (expected a header line)")
    try:
        text = first.decode("utf-8").strip().lstrip("\ufeff")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a CSV text file (line 1 is not UTF-8 text)") from None
    columns = [c.strip().strip('"') for c in text.split(",")]
    for expected, labelled in ((list(CSV_COLUMNS), True), (list(PIXEL_COLUMNS), False)):
        if columns == expected:
            return columns, labelled
    expected = list(CSV_COLUMNS)
    for position, (got, want) in enumerate(zip(columns, expected, strict=False), start=1):
        if got != want:
            raise InputError(
                f"{path}: line 1: wrong header: column {position} is {got!r}, expected {want!r} "
                "(the header must be label,pixel1..pixel784)"
            )
    raise InputError(
        f"{path}: line 1: wrong header: {len(columns)} columns, expected {len(expected)} "
        "(label,pixel1..pixel784)"
    )


def _csv_pieces(split: str, file_index: int, path: str, blocksize: int) -> list[Piece]:
    _, labelled = read_header(path)
    compressed = fsspec.utils.infer_compression(path) is not None
    if compressed:
        return [Piece(split, file_index, path, "csv", 0, None, True, labelled)]
    fs, _, (stripped,) = fsspec.get_fs_token_paths(path)
    size = fs.size(stripped)
    offsets = list(range(0, max(size, 1), blocksize))
    return [
        Piece(split, file_index, path, "csv", off, blocksize, off == 0, labelled)
        for off in offsets
    ]


def _idx_labels_path(images_path: str) -> str:
    return images_path.replace("images-idx3", "labels-idx1")


def _idx_count(path: str, magic_expected: int) -> int:
    with _open(path) as handle:
        header = handle.read(8)
    if len(header) < 8:
        raise InputError(f"{path}: file is empty or truncated (no IDX header)")
    magic, count = struct.unpack(">II", header)
    if magic != magic_expected:
        raise InputError(f"{path}: not an IDX file with magic {magic_expected} (got {magic})")
    return count


def _idx_pieces(split: str, file_index: int, path: str) -> list[Piece]:
    count = _idx_count(path, 2051)
    labels = _idx_labels_path(path)
    labelled = labels != path and fsspec.core.url_to_fs(labels)[0].exists(labels)
    if labelled and _idx_count(labels, 2049) != count:
        raise InputError(f"{labels}: label count differs from {path}")
    return [
        Piece(split, file_index, path, "idx", start, min(IDX_ROWS_PER_PIECE, count - start),
              False, labelled, first_line=start + 1, n_rows=min(IDX_ROWS_PER_PIECE, count - start))
        for start in range(0, count, IDX_ROWS_PER_PIECE)
    ]


def _parquet_pieces(split: str, file_index: int, path: str) -> list[Piece]:
    try:
        with _open(path) as handle:
            meta = pq.ParquetFile(handle).metadata
            schema = pq.ParquetFile(handle).schema_arrow
    except Exception as error:  # pyarrow raises several types for non-parquet bytes
        raise InputError(f"{path}: not a parquet file, or truncated ({error})") from None
    names = schema.names
    if PIXELS in names:
        if schema.field(PIXELS).type != pixelfiles.PIXEL_TYPE:
            raise InputError(f"{path}: column {PIXELS!r} is {schema.field(PIXELS).type}, "
                             f"expected {pixelfiles.PIXEL_TYPE} (784 uint8 pixels per row)")
    else:
        missing = [c for c in PIXEL_COLUMNS if c not in names]
        if missing:
            raise InputError(f"{path}: missing column {missing[0]!r} (need a {PIXELS!r} "
                             "column of 784-byte images, or pixel1..pixel784)")
    labelled = "label" in names
    pieces, line = [], 1
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        pieces.append(Piece(split, file_index, path, "parquet", group, None, False, labelled,
                            first_line=line, n_rows=rows))
        line += rows
    return pieces


def count_csv_rows(piece: Piece) -> tuple[int, int]:
    """Lines spanned and data rows (non-blank, non-header lines) of a CSV piece."""
    data = _read_piece_bytes(piece).replace(b"\r\n", b"\n")
    if not data:
        return 0, 0
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    lines = len(newlines) + (0 if data.endswith(b"\n") else 1)
    # A blank line is a newline right after another newline (or at the very start).
    blank = int(np.count_nonzero(np.diff(newlines) == 1)) + int(data.startswith(b"\n"))
    return lines, lines - blank - (1 if piece.has_header else 0)


def _file_pieces(spec: DataSpec) -> list[Piece]:
    """Every input file cut into pieces, rows not yet counted (headers and metadata read)."""
    blocksize = parse_bytes(spec.blocksize)
    pieces: list[Piece] = []
    for file_index, (split, path) in enumerate(resolve_inputs(spec)):
        if spec.format == "csv":
            pieces.extend(_csv_pieces(split, file_index, path, blocksize))
        elif spec.format == "idx":
            pieces.extend(_idx_pieces(split, file_index, path))
        else:
            pieces.extend(_parquet_pieces(split, file_index, path))
    return pieces


def check_inputs(spec: DataSpec) -> None:
    """What can be checked of the inputs without a cluster, in about a second: every path
    matches a file and each file starts as its format must (CSV header, IDX magic number
    and counts, parquet columns). Raises :class:`InputError` naming the file."""
    _file_pieces(spec)


def plan_pieces(spec: DataSpec) -> list[Piece]:
    """Cut every input file into pieces and number their rows.

    CSV row counts come from a cheap newline-counting pass run on the cluster; parquet and
    IDX counts come from their metadata and headers.
    """
    pieces = _file_pieces(spec)
    if spec.format == "csv":
        counts = dask.compute(*[dask.delayed(count_csv_rows)(p) for p in pieces])
    else:
        counts = [(p.n_rows, p.n_rows) for p in pieces]
    numbered: list[Piece] = []
    row_id, line_of_file, rows_of_split = 0, {}, {}
    for piece, (lines, rows) in zip(pieces, counts, strict=True):
        first_line = piece.first_line
        if piece.kind == "csv":
            first_line = line_of_file.get(piece.file_index, 1)
            line_of_file[piece.file_index] = first_line + lines
        taken = rows_of_split.get(piece.split, 0)
        if spec.limit_rows is not None:
            rows = max(0, min(rows, spec.limit_rows - taken))
        rows_of_split[piece.split] = taken + rows
        if rows == 0:
            continue
        numbered.append(
            Piece(**{**piece.__dict__, "first_line": first_line, "first_row_id": row_id,
                     "n_rows": rows})
        )
        row_id += rows
    if not numbered:
        raise InputError("no data rows in any input file: " + ", ".join(
            sorted({p.path for p in pieces})))
    return numbered


# ---------------------------------------------------------------------------------------
# Parsing one piece (runs on a worker)


def _read_piece_bytes(piece: Piece) -> bytes:
    if piece.length is None:
        with _open(piece.path) as handle:
            return handle.read()
    with fsspec.open(piece.path, "rb") as handle:
        return fsspec.utils.read_block(handle, piece.offset, piece.length, delimiter=b"\n")


def _split_lines(data: bytes) -> list[bytes]:
    """Non-blank lines of a block; blank lines are not rows (as in pandas)."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    return [line for line in lines if line]


def _line_numbers(data: bytes, first_line: int) -> np.ndarray:
    """1-based file line number of each non-blank line of ``data``."""
    lengths = np.fromiter(map(len, data.replace(b"\r\n", b"\n").split(b"\n")), dtype=np.int64)
    return first_line + np.flatnonzero(lengths > 0)


def _check_values(values: np.ndarray, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    """First bad column index (or -1) and reason code per row of a float64 value matrix.

    Reason codes: 0 ok, 1 missing, 2 not an integer, 3 label out of range, 4 pixel out
    of range.
    """
    n_rows, n_cols = values.shape
    codes = np.zeros((n_rows, n_cols), np.int8)
    finite = np.isfinite(values)
    codes[~np.isnan(values) & ~finite] = 2
    codes[np.isnan(values)] = 1
    with np.errstate(invalid="ignore"):
        not_integer = finite & (values != np.floor(values))
        codes[not_integer & (codes == 0)] = 2
        start = 0
        if labelled:
            bad_label = finite & ~not_integer & ((values[:, 0] < 0) | (values[:, 0] > 9))[:, None]
            codes[:, 0][bad_label[:, 0] & (codes[:, 0] == 0)] = 3
            start = 1
        pix = values[:, start:]
        bad_pixel = np.isfinite(pix) & ((pix < 0) | (pix > 255))
        codes[:, start:][bad_pixel & (codes[:, start:] == 0)] = 4
    flagged = codes > 0
    first = np.where(flagged.any(axis=1), flagged.argmax(axis=1), -1)
    reason = np.where(first >= 0, codes[np.arange(n_rows), np.maximum(first, 0)], 0)
    return first, reason


def _describe_rejects(values: np.ndarray, first_bad: np.ndarray, codes: np.ndarray
                      ) -> list[str | None]:
    """Reason text per row (None for good rows); loops over the bad rows only."""
    reasons: list[str | None] = [None] * len(values)
    for i in np.flatnonzero(first_bad >= 0):
        reasons[i] = f"{_REASONS[int(codes[i])]}: {_format_value(values[i, first_bad[i]])}"
    return reasons


_REASONS = {
    1: "missing value",
    2: "not an integer",
    3: "label not in 0..9",
    4: "pixel not in 0..255",
}


def _check_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First bad column (0, the label, or -1) and reason code per row, for rows whose pixels
    are uint8 already (IDX, binary parquet, a CSV block that parsed as uint8): only the label
    can be wrong. ``labels`` is float64, NaN where missing."""
    with np.errstate(invalid="ignore"):
        codes = np.where(np.isnan(labels), 1, np.where(
            labels != np.floor(labels), 2, np.where((labels < 0) | (labels > 9), 3, 0)))
    return np.where(codes > 0, 0, -1), codes.astype(np.int8)


def _frame(piece: Piece, pixels: np.ndarray, labels: np.ndarray | None, lines: np.ndarray,
           first_bad: np.ndarray, reasons: list[str | None], columns: list[str],
           contents: list[str | None]) -> pd.DataFrame:
    """Assemble the raw frame of a piece from its pixels (uint8, n x 784), labels and
    rejection details; a rejected row's pixels and label are zeroed."""
    n_rows = len(pixels)
    bad = first_bad >= 0
    if bad.any():
        pixels = np.where(bad[:, None], np.uint8(0), pixels)
    label = (np.where(bad, 0, labels).astype(np.int8) if labels is not None
             else np.full(n_rows, NO_LABEL, np.int8))
    reject_column = [columns[i] if i >= 0 else None for i in first_bad] if bad.any() else None
    frame = pd.DataFrame(
        {
            "row_id": piece.first_row_id + np.arange(n_rows, dtype=np.int64),
            "split": pd.array([piece.split] * n_rows, dtype="string"),
            "source_file": np.full(n_rows, piece.file_index, np.int16),
            "source_line": lines.astype(np.int64),
            "label": label,
        }
    )
    frame[PIXELS] = pixelfiles.to_series(pixels)
    frame["reject_column"] = pd.array(reject_column or [None] * n_rows, dtype="string")
    frame["reject_reason"] = pd.array(reasons, dtype="string")
    frame["content"] = pd.array(contents, dtype="string")
    return frame


def _parse_csv_fast(body: bytes, columns: list[str], labelled: bool) -> np.ndarray | None:
    """The block's values as uint8 (label first), or None when any field is not a uint8.

    pyarrow's parser refuses a value outside uint8 or not an integer, and reads an empty
    field as null: any of these sends the block to the row-by-row diagnosis.
    """
    types = {name: pa.uint8() for name in columns}
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False,
                                           block_size=max(len(body), 1 << 20)),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    if table.num_columns != len(columns) or any(c.null_count for c in table.columns):
        return None
    return np.column_stack([c.to_numpy() for c in table.columns]) if table.num_rows else \
        np.zeros((0, len(columns)), np.uint8)


def _parse_csv(piece: Piece) -> pd.DataFrame:
    data = _read_piece_bytes(piece)
    lines = _split_lines(data)
    line_numbers = _line_numbers(data, piece.first_line)
    if piece.has_header:
        lines, line_numbers = lines[1:], line_numbers[1:]
    lines, line_numbers = lines[: piece.n_rows], line_numbers[: piece.n_rows]
    columns = list(CSV_COLUMNS if piece.labelled else PIXEL_COLUMNS)
    offset = 1 if piece.labelled else 0
    values = _parse_csv_fast(b"\n".join(lines), columns, piece.labelled)
    if values is not None and len(values) == len(lines):
        labels = values[:, 0].astype(np.float64) if piece.labelled else None
        pixels = values[:, offset:]
        if labels is not None:
            first_bad, codes = _check_labels(labels)
            reasons = _describe_rejects(values, first_bad, codes)
        else:
            first_bad, reasons = np.full(len(values), -1), [None] * len(values)
    else:
        floats, first_bad, reasons = _parse_csv_slow(lines, columns, piece.labelled)
        labels = floats[:, 0] if piece.labelled else None
        pixels = floats[:, offset:].astype(np.uint8)
    contents: list[str | None] = [None] * len(lines)
    for i in np.flatnonzero(first_bad >= 0):
        contents[i] = lines[i].decode("utf-8", "replace")
    return _frame(piece, pixels, labels, line_numbers, first_bad, reasons, columns, contents)


def _format_value(value: float) -> str:
    if np.isnan(value):
        return "''"
    return repr(str(int(value)) if value == int(value) else str(float(value)))


def _parse_csv_slow(lines: list[bytes], columns: list[str], labelled: bool
                    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Row-by-row diagnosis of a block the fast parser refused (the rare, bad-data path)."""
    n_cols = len(columns)
    values = np.zeros((len(lines), n_cols), np.float64)
    first_bad = np.full(len(lines), -1, np.int64)
    reasons: list[str | None] = [None] * len(lines)
    for i, line in enumerate(lines):
        try:
            fields = line.decode("utf-8").split(",")
        except UnicodeDecodeError:
            first_bad[i], reasons[i] = 0, "not UTF-8 text"
            continue
        if len(fields) != n_cols:
            first_bad[i] = min(len(fields), n_cols - 1)
            reasons[i] = f"expected {n_cols} fields, found {len(fields)}"
            continue
        numeric = pd.to_numeric(pd.Series(fields).str.strip(), errors="coerce").to_numpy(
            np.float64
        )
        text_bad = np.isnan(numeric) & (pd.Series(fields).str.strip() != "").to_numpy()
        if text_bad.any():
            col = int(np.argmax(text_bad))
            first_bad[i], reasons[i] = col, f"not an integer: {fields[col].strip()!r}"
            continue
        row_first, row_code = _check_values(numeric[None, :], labelled)
        if row_first[0] >= 0:
            col = int(row_first[0])
            first_bad[i] = col
            reasons[i] = f"{_REASONS[int(row_code[0])]}: {fields[col].strip()!r}"
            continue
        values[i] = numeric
    return values, first_bad, reasons


def _parse_idx(piece: Piece) -> pd.DataFrame:
    start, count = piece.offset, piece.n_rows
    with _open(piece.path) as handle:
        handle.seek(16 + start * N_PIXELS)
        images = np.frombuffer(handle.read(count * N_PIXELS), np.uint8).reshape(-1, N_PIXELS)
    if len(images) != count:
        raise InputError(f"{piece.path}: truncated: rows {start + 1}..{start + count} expected, "
                         f"{len(images)} found")
    columns = list(CSV_COLUMNS if piece.labelled else PIXEL_COLUMNS)
    labels, first_bad, reasons = None, np.full(count, -1), [None] * count
    if piece.labelled:
        with _open(_idx_labels_path(piece.path)) as handle:
            handle.seek(8 + start)
            labels = np.frombuffer(handle.read(count), np.uint8).astype(np.float64)
        first_bad, codes = _check_labels(labels)
        reasons = _describe_rejects(labels[:, None], first_bad, codes)
    lines = piece.first_line + np.arange(count)
    return _frame(piece, images, labels, lines, first_bad, reasons, columns, [None] * count)


def _parse_parquet(piece: Piece) -> pd.DataFrame:
    with _open(piece.path) as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
        binary = PIXELS in names
        wanted = ([PIXELS] if binary else list(PIXEL_COLUMNS)) + (["label"] if piece.labelled
                                                                    else [])
        try:
            table = pq.ParquetFile(handle, page_checksum_verification=True).read_row_group(
                piece.offset, columns=wanted)
        except Exception as error:  # a page cut short or corrupt
            raise InputError(f"{piece.path}: row group {piece.offset} cannot be read "
                             f"({error})") from None
    table = table.slice(0, piece.n_rows)
    lines = piece.first_line + np.arange(table.num_rows)
    labels = (table.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
              if piece.labelled else None)
    if binary:
        column = table.column(PIXELS).combine_chunks()
        pixels = pixelfiles.to_numpy(column)
        n_rows = len(pixels)
        missing = column.is_null().to_numpy(zero_copy_only=False)
        # What the reasons quote, column by column: the label, and NaN for a missing image.
        quoted = np.column_stack([labels if labels is not None else np.zeros(n_rows),
                                  np.where(missing, np.nan, 0.0)])
        first_bad, codes = (_check_labels(labels) if labels is not None
                            else (np.full(n_rows, -1), np.zeros(n_rows, np.int8)))
        first_bad = np.where(missing & (first_bad < 0), 1, first_bad)  # the label first
        codes = np.where(missing & (codes == 0), 1, codes)
        columns = ["label", PIXELS]
        if labels is None:
            quoted, columns, first_bad = quoted[:, 1:], [PIXELS], np.where(first_bad > 0, 0, -1)
        reasons = _describe_rejects(quoted, first_bad, codes)
        return _frame(piece, pixels, labels, lines, first_bad, reasons, columns,
                      [None] * n_rows)
    columns = list(CSV_COLUMNS if piece.labelled else PIXEL_COLUMNS)
    values = table.select(columns).to_pandas().to_numpy(dtype=np.float64, na_value=np.nan)
    first_bad, codes = _check_values(values, piece.labelled)
    reasons = _describe_rejects(values, first_bad, codes)
    offset = 1 if piece.labelled else 0
    pixels = np.where(first_bad[:, None] >= 0, 0, values[:, offset:]).astype(np.uint8)
    return _frame(piece, pixels, labels, lines, first_bad, reasons, columns,
                  [None] * len(values))


def parse_piece(piece: Piece) -> pd.DataFrame:
    """Parse one piece into the raw frame (see :func:`raw_meta` for the columns)."""
    parser = {"csv": _parse_csv, "idx": _parse_idx, "parquet": _parse_parquet}[piece.kind]
    frame = parser(piece)
    return frame.set_index(pd.Index(frame["row_id"].to_numpy(), name="index"))


def load(spec: DataSpec) -> tuple[dd.DataFrame, list[Piece], list[str]]:
    """The raw frame of all inputs, its pieces, and the input file paths by ``source_file``.

    The frame's index is ``row_id`` with known divisions, one partition per piece.
    """
    pieces = plan_pieces(spec)
    files = [path for _, path in resolve_inputs(spec)]
    meta = raw_meta().set_index(pd.Index([], dtype="int64", name="index"))
    divisions = [p.first_row_id for p in pieces] + [pieces[-1].first_row_id + pieces[-1].n_rows - 1]
    frame = dd.from_map(parse_piece, pieces, meta=meta, divisions=divisions,
                        enforce_metadata=False)
    return frame, pieces, files
