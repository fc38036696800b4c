"""Loading, validation and exact deduplication, on the real data and on planted cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.core import flatten
from distributed import futures_of, wait

from fmnist_dask import passes, pixelfiles
from fmnist_dask.config import CleanSpec, DataSpec, EdaSpec
from fmnist_dask.schema import CSV_COLUMNS, LABEL_NAMES
from fmnist_dask.stages import clean as clean_stage
from fmnist_dask.stages import eda as eda_stage
from fmnist_dask.stages.load import InputError, load
from tests.conftest import cli, pixels_of, write_rows


def run_clean(tmp_path: Path, spec: DataSpec, clean_spec: CleanSpec | None = None,
              hasher: clean_stage.RowHasher = clean_stage.row_hash):
    raw, pieces, files = load(spec)
    out = tmp_path / "run"
    out.mkdir()
    counts = clean_stage.clean(raw, pieces, files, clean_spec or CleanSpec(), out, hasher)
    return counts, out


def cleaned_frame(out: Path) -> pd.DataFrame:
    """``cleaned/`` read as a user reads it, with plain pandas."""
    return pd.read_parquet(out / "cleaned").sort_values("row_id").reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Real data


def test_real_idx_counts_classes_and_scaling_match_numpy(tmp_path, real_dir, real_arrays,
                                                          dask_client):
    spec = DataSpec(format="idx", dir=str(real_dir), splits={
        "train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"})
    counts, out = run_clean(tmp_path, spec)
    rows = counts.as_dict()
    assert rows["train"] == {"read": 60000, "rejected": 0, "duplicates": 0, "kept": 60000}
    assert rows["test"] == {"read": 10000, "rejected": 0, "duplicates": 0, "kept": 10000}

    data = clean_stage.load_cleaned(out)
    assert data.pixels.shape == (70000, 784)
    assert not any(np.isnan(c) for c in data.pixels.chunks[0])  # known chunk sizes
    train_x, train_y = real_arrays["train"]
    summary = eda_stage.explore(data, ["train", "test"], EdaSpec(), out, seed=0)
    expected = np.bincount(train_y, minlength=10)
    assert [summary["class_counts"]["train"][n] for n in LABEL_NAMES] == expected.tolist()
    test_counts = np.bincount(real_arrays["test"][1], minlength=10)
    assert [summary["class_counts"]["test"][n] for n in LABEL_NAMES] == test_counts.tolist()
    # the sample images are the rows the seed picks, wherever their blocks lie
    picked = np.sort(np.random.default_rng(0).choice(70000, size=9, replace=False))
    assert summary["sample_row_ids"] == data.row_id.compute()[picked].tolist()
    everything = np.concatenate([train_x, real_arrays["test"][0]]).astype(np.float64) / 255
    assert summary["pixel_mean"] == pytest.approx(everything.mean(), abs=1e-7)  # float32 pixels
    assert summary["pixel_std"] == pytest.approx(everything.std(), abs=1e-7)
    assert summary["histogram"]["counts"] == np.histogram(
        everything, bins=50, range=(0, 1))[0].tolist()
    # The train-only figures quoted by the dataset's README.
    train_scaled = data.pixels[:60000]
    assert float(train_scaled.mean().compute()) == pytest.approx(0.286041, abs=1e-6)
    assert float(train_scaled.std().compute()) == pytest.approx(0.353024, abs=1e-6)
    first = data.pixels[:5].compute()
    np.testing.assert_array_equal(first, (train_x[:5] / np.float32(255)).astype(np.float32))
    np.testing.assert_array_equal(data.label[:60000].compute(), train_y)
    # each row's split, made per block from the files' statistics
    assert data.split.compute().tolist() == ["train"] * 60000 + ["test"] * 10000
    for png in ("sample_images.png", "class_distribution.png", "pixel_histogram.png"):
        assert (out / "eda" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_csv_subset_reads_same_values_as_idx(tmp_path, real_arrays, dask_client):
    train_x, train_y = real_arrays["train"]
    test_x, test_y = real_arrays["test"]
    write_rows(tmp_path / "train.csv", train_y[:3000], train_x[:3000])
    write_rows(tmp_path / "test.csv", test_y[:500], test_x[:500])
    spec = DataSpec(dir=str(tmp_path), splits={"train": "train.csv", "test": "test.csv"},
                    blocksize="1MiB")
    raw, pieces, _ = load(spec)
    assert len(pieces) > 4  # several partitions per file
    counts, out = run_clean(tmp_path, spec)
    assert counts.as_dict()["total"]["kept"] == 3500
    frame = cleaned_frame(out)
    np.testing.assert_array_equal(pixels_of(frame),
                                  np.concatenate([train_x[:3000], test_x[:500]]))
    np.testing.assert_array_equal(frame["label"], np.concatenate([train_y[:3000], test_y[:500]]))
    # Line numbers: the header is line 1, so data row k of a file is on line k + 2.
    assert frame["source_line"].tolist()[:3] == [2, 3, 4]
    assert frame.loc[frame.split == "test", "source_line"].tolist()[:2] == [2, 3]


def test_cleaned_blocks_kept_in_memory_have_images_ids_and_labels_on_one_worker(
        tmp_path, real_arrays, dask_client):
    train_x, train_y = real_arrays["train"]
    write_rows(tmp_path / "train.csv", train_y[:2000], train_x[:2000])
    spec = DataSpec(dir=str(tmp_path), splits={"train": "train.csv"}, blocksize="512KiB")
    _, out = run_clean(tmp_path, spec)
    kept = clean_stage.load_cleaned(out, in_memory=True)
    blocks = kept.raw_pixels.numblocks[0]
    assert blocks > 4
    arrays = (kept.raw_pixels, kept.row_id, kept.label)
    wait(arrays)
    who_has = dask_client.who_has([f for a in arrays for f in futures_of(a)])
    keys = [list(flatten(a.__dask_keys__())) for a in arrays]
    for i in range(blocks):
        holders = {who_has[k[i]] for k in keys}
        assert len(holders) == 1 and len(next(iter(holders))) == 1, (i, holders)
    # the same rows as the arrays read apart
    apart = clean_stage.load_cleaned(out)
    np.testing.assert_array_equal(kept.raw_pixels.compute(), train_x[:2000])
    np.testing.assert_array_equal(kept.label.compute(), train_y[:2000])
    np.testing.assert_array_equal(kept.row_id.compute(), apart.row_id.compute())
    assert kept.block_splits == apart.block_splits
    assert kept.raw_pixels.chunks == apart.raw_pixels.chunks


# ---------------------------------------------------------------------------------------
# Deduplication


def _random_images(rng, n):
    return rng.integers(0, 256, size=(n, 784), dtype=np.uint8)


def two_bit_hash(keys: np.ndarray) -> np.ndarray:
    """A hash with 4 values: every row collides with about a quarter of all rows."""
    bucket = (keys[:, -1] % 4).astype(np.uint64)
    return np.column_stack([bucket, np.zeros_like(bucket)])


@pytest.mark.parametrize("hasher", [clean_stage.row_hash, two_bit_hash])
def test_dedup_removes_exactly_the_planted_copies(tmp_path, dask_client, hasher):
    """With the job's 128-bit hash, and with a 2-bit one under which hundreds of distinct
    rows collide: only the planted copies are duplicates, since colliding rows are compared
    byte by byte."""
    rng = np.random.default_rng(1)
    train_x = _random_images(rng, 400)
    train_y = rng.integers(0, 10, 400)
    test_x = _random_images(rng, 100)
    test_y = rng.integers(0, 10, 100)
    planted = {}  # row_id of copy -> row_id of the original it copies
    train_x[11], train_y[11] = train_x[10], train_y[10]  # same partition, adjacent
    planted[11] = 10
    train_x[390], train_y[390] = train_x[3], train_y[3]  # far apart: other partition
    planted[390] = 3
    train_x[391], train_y[391] = train_x[3], train_y[3]  # a third copy
    planted[391] = 3
    test_x[7], test_y[7] = train_x[200], train_y[200]  # across train and test
    planted[400 + 7] = 200
    test_x[8], test_y[8] = train_x[201], (train_y[201] + 1) % 10  # same pixels, other label
    write_rows(tmp_path / "train.csv", train_y, train_x)
    write_rows(tmp_path / "test.csv", test_y, test_x)
    spec = DataSpec(dir=str(tmp_path), splits={"train": "train.csv", "test": "test.csv"},
                    blocksize="128KiB")
    _, pieces, _ = load(spec)
    assert len(pieces) >= 6  # copies really sit in different partitions

    counts, out = run_clean(tmp_path, spec, hasher=hasher)
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert dict(zip(dups.row_id, dups.duplicate_of, strict=True)) == planted
    if hasher is two_bit_hash:  # the collisions really are there
        keys = np.column_stack([np.r_[train_y, test_y] + 1, np.r_[train_x, test_x]])
        assert len(np.unique(hasher(keys.astype(np.uint8)), axis=0)) == 4
    rows = counts.as_dict()
    assert rows["train"] == {"read": 400, "rejected": 0, "duplicates": 3, "kept": 397}
    assert rows["test"] == {"read": 100, "rejected": 0, "duplicates": 1, "kept": 99}
    kept_ids = set(cleaned_frame(out)["row_id"])
    assert kept_ids == set(range(500)) - set(planted)

    # Keyed on pixels only, the relabelled copy is a duplicate too.
    (tmp_path / "px").mkdir()
    counts, out = run_clean(tmp_path / "px", spec, CleanSpec(dedup_key="pixels"), hasher)
    assert counts.as_dict()["test"]["duplicates"] == 2
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert dict(zip(dups.row_id, dups.duplicate_of, strict=True)) == planted | {408: 201}


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_files_are_refused_naming_the_file(tmp_path, dask_client):
    good = write_rows(tmp_path / "good.csv", np.zeros(2, int), np.zeros((2, 784), int))
    cases = {
        "empty.csv": (b"", "file is empty"),
        "header.csv": (good.read_bytes().replace(b"pixel5,", b"pixelfive,", 1),
                       "column 6 is 'pixelfive', expected 'pixel5'"),
        "short.csv": (b"label,pixel1,pixel2\n1,2,3\n", "3 columns, expected 785"),
        "image.csv": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "not a CSV text file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        spec = DataSpec(dir=str(tmp_path), splits={"train": name})
        with pytest.raises(InputError) as error:
            load(spec)
        assert name in str(error.value) and message in str(error.value)
    with pytest.raises(InputError, match="missing.csv: no such file"):
        load(DataSpec(dir=str(tmp_path), splits={"train": "missing.csv"}))


BAD_ROWS = [
    # (line text replacing data row 3, column, reason)
    ("3," + ",".join(["0"] * 783) + ",2.5", "pixel784", "not an integer: '2.5'"),
    ("3,0,abc," + ",".join(["0"] * 782), "pixel2", "not an integer: 'abc'"),
    ("12," + ",".join(["0"] * 784), "label", "label not in 0..9: '12'"),
    ("1,0,0,300," + ",".join(["0"] * 781), "pixel3", "pixel not in 0..255: '300'"),
    ("1,0,-1," + ",".join(["0"] * 782), "pixel2", "pixel not in 0..255: '-1'"),
    ("1,0,," + ",".join(["0"] * 782), "pixel2", "missing value"),
    ("1,0,0", None, "expected 785 fields, found 3"),
]


@pytest.mark.parametrize(("line", "column", "reason"), BAD_ROWS)
def test_bad_row_stops_the_run_naming_file_line_and_column(tmp_path, dask_client, line, column,
                                                           reason):
    rng = np.random.default_rng(0)
    path = write_rows(tmp_path / "train.csv", rng.integers(0, 10, 6), _random_images(rng, 6))
    lines = path.read_text().splitlines()
    lines[3] = line  # data row 3 is file line 4
    path.write_text("\n".join(lines) + "\n")
    spec = DataSpec(dir=str(tmp_path), splits={"train": "train.csv"})
    with pytest.raises(clean_stage.BadRowsError) as error:
        run_clean(tmp_path, spec)
    message = str(error.value)
    assert f"{path}: line 4, column " in message
    assert reason in message
    if column:
        assert f"column {column}:" in message


def test_quarantine_sets_bad_rows_aside_and_accounts_for_every_row(tmp_path, dask_client):
    rng = np.random.default_rng(2)
    pixels = _random_images(rng, 40)
    labels = rng.integers(0, 10, 40)
    pixels[30], labels[30] = pixels[5], labels[5]  # one duplicate
    path = write_rows(tmp_path / "train.csv", labels, pixels)
    lines = path.read_text().splitlines()
    for index, (line, _, _) in zip((3, 10, 17, 20, 25, 33, 38), BAD_ROWS, strict=True):
        lines[index] = line
    lines.insert(12, "")  # a blank line is not a row, but shifts the line numbers after it
    path.write_text("\n".join(lines) + "\n")
    spec = DataSpec(dir=str(tmp_path), splits={"train": "train.csv"}, blocksize="20KiB")
    counts, out = run_clean(tmp_path, spec, CleanSpec(on_bad_rows="quarantine"))
    assert counts.as_dict()["train"] == {"read": 40, "rejected": 7, "duplicates": 1, "kept": 32}
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert rejected["source_line"].tolist() == [4, 11, 19, 22, 27, 35, 40]
    for (_, column, reason), got_reason, got_column in zip(
            BAD_ROWS, rejected["reject_reason"], rejected["reject_column"], strict=True):
        assert reason in got_reason
        if column:
            assert got_column == column
    assert set(rejected["source_file"]) == {str(path)}
    assert rejected["content"].iloc[0].startswith("3,")  # the raw line is kept
    kept = cleaned_frame(out)
    assert len(kept) == 32 and not set(kept.row_id) & set(rejected.row_id)


# ---------------------------------------------------------------------------------------
# Other input formats


def test_gzip_csv_parquet_and_file_urls_read_the_same_rows(tmp_path, real_arrays, dask_client):
    import gzip

    images, labels = real_arrays["test"]
    images, labels = images[:700], labels[:700]
    plain = write_rows(tmp_path / "plain.csv", labels, images)
    with gzip.open(tmp_path / "packed.csv.gz", "wb") as handle:
        handle.write(plain.read_bytes())
    frame = pd.DataFrame(np.column_stack([labels, images]), columns=list(CSV_COLUMNS))
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    frame.iloc[:300].to_parquet(parquet_dir / "a.parquet", index=False)
    frame.iloc[300:].to_parquet(parquet_dir / "b.parquet", index=False, row_group_size=150)

    specs = {
        "gzip": DataSpec(dir=str(tmp_path), splits={"test": "packed.csv.gz"}),
        "url": DataSpec(dir=str(tmp_path), splits={"test": f"file://{plain}"}),
        "glob": DataSpec(dir=str(tmp_path), splits={"test": "pl*.csv"}),
        "parquet": DataSpec(format="parquet", dir=str(tmp_path), splits={"test": "parquet"}),
    }
    for name, spec in specs.items():
        out = tmp_path / f"run-{name}"
        out.mkdir()
        counts, run = run_clean(out, spec)
        assert counts.as_dict()["test"]["kept"] == 700, name
        kept = cleaned_frame(run)
        np.testing.assert_array_equal(pixels_of(kept), images, err_msg=name)
        np.testing.assert_array_equal(kept["label"], labels, err_msg=name)


def test_unlabelled_csv_is_read_with_label_minus_one(tmp_path, real_arrays, dask_client):
    images = real_arrays["test"][0][:50]
    write_rows(tmp_path / "unlabelled.csv", None, images)
    counts, out = run_clean(tmp_path, DataSpec(dir=str(tmp_path),
                                               splits={"new": "unlabelled.csv"}))
    assert counts.as_dict()["new"]["kept"] == 50
    kept = cleaned_frame(out)
    assert (kept["label"] == -1).all()
    np.testing.assert_array_equal(pixels_of(kept), images)


def test_parquet_with_bad_values_is_quarantined(tmp_path, dask_client):
    rng = np.random.default_rng(5)
    frame = pd.DataFrame(np.column_stack([rng.integers(0, 10, 20), _random_images(rng, 20)]),
                         columns=list(CSV_COLUMNS)).astype("int64")
    frame.loc[4, "pixel9"] = 999
    frame.loc[7, "label"] = 10
    frame.to_parquet(tmp_path / "data.parquet", index=False)
    spec = DataSpec(format="parquet", dir=str(tmp_path), splits={"train": "data.parquet"})
    counts, out = run_clean(tmp_path, spec, CleanSpec(on_bad_rows="quarantine"))
    assert counts.as_dict()["train"] == {"read": 20, "rejected": 2, "duplicates": 0, "kept": 18}
    rejected = pd.read_parquet(out / "rejected.parquet")
    assert rejected["source_line"].tolist() == [5, 8]  # 1-based row numbers
    assert rejected["reject_column"].tolist() == ["pixel9", "label"]
    assert rejected["reject_reason"].tolist() == ["pixel not in 0..255: '999'",
                                                  "label not in 0..9: '10'"]


# ---------------------------------------------------------------------------------------
# Pixel files (augmented data as input, cleaned/ as read by the later stages)


def _pixel_files(directory: Path, images: np.ndarray, labels: np.ndarray, n_files: int) -> list:
    directory.mkdir(parents=True)
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(images)), n_files)):
        path = directory / f"part-{i}.parquet"
        pixelfiles.write_part(pd.DataFrame({"label": labels[rows].astype(np.int8),
                                            "pixels": pixelfiles.to_series(images[rows])}), path)
        paths.append(path)
    return paths


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_pixel_file_input_is_read_and_validated_naming_the_file(tmp_path, real_arrays,
                                                               dask_client):
    images, labels = real_arrays["test"][0][:600], real_arrays["test"][1][:600]
    paths = _pixel_files(tmp_path / "pix" / "train", images, labels, 3)
    spec = DataSpec(format="parquet", dir=str(tmp_path / "pix"), splits={"train": "train"})
    counts, out = run_clean(tmp_path, spec)
    assert counts.as_dict()["train"] == {"read": 600, "rejected": 0, "duplicates": 0,
                                         "kept": 600}
    np.testing.assert_array_equal(pixels_of(cleaned_frame(out)), images)

    # Truncated, or a pixels column of another type: refused when the inputs are planned.
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    with pytest.raises(InputError, match=f"{paths[1]}: not a parquet file, or truncated"):
        load(spec)
    pd.DataFrame({"label": labels[:5], "pixels": list(range(5))}).to_parquet(paths[1])
    with pytest.raises(InputError, match=f"{paths[1]}: column 'pixels' is int64, expected "
                                         r"fixed_size_binary\[784\]"):
        load(spec)
    # A corrupt page (the footer intact): the run stops with exit 3, the file named.
    _pixel_files(tmp_path / "pix2" / "train", images, labels, 3)
    _flip_middle_byte(tmp_path / "pix2" / "train" / "part-2.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(f"data: {{format: parquet, dir: {tmp_path / 'pix2'}, "
                   "splits: {train: train}}\n"
                   "eda: {enabled: false}\ntsne: {enabled: false}\nspectral: {enabled: false}\n"
                   "scores: {silhouette: 'off'}\n")
    result = cli("run", str(job), "--out", str(tmp_path / "runs"), "--scheduler",
                 dask_client.scheduler.address)
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"{tmp_path / 'pix2' / 'train' / 'part-2.parquet'}: row group 0 cannot be read" in \
        result.stderr and "CRC checksum" in result.stderr


def test_cleaned_pixel_file_missing_or_corrupt_stops_the_read_naming_it(tmp_path, real_arrays,
                                                                       dask_client):
    images, labels = real_arrays["test"][0][:600], real_arrays["test"][1][:600]
    _pixel_files(tmp_path / "pix" / "train", images, labels, 3)
    spec = DataSpec(format="parquet", dir=str(tmp_path / "pix"), splits={"train": "train"})
    _, out = run_clean(tmp_path, spec)
    parts = clean_stage.cleaned_parts(out)
    assert len(parts) == 3
    data = clean_stage.load_cleaned(out)
    np.testing.assert_array_equal(data.raw_pixels.compute(), images)
    _flip_middle_byte(parts[1])
    with pytest.raises(InputError, match=f"{parts[1]}: pixel data cannot be read .*CRC"):
        data.raw_pixels.compute()
    parts[2].unlink()
    with pytest.raises(InputError, match=f"{parts[2]}: pixel file is missing"):
        data.raw_pixels[-5:].compute()
    with pytest.raises(InputError, match=f"{parts[1]}: not a parquet pixel file|"
                                         f"{parts[1]}: pixel data cannot be read"):
        clean_stage.load_cleaned(out).raw_pixels.compute()


def test_scaled_blocks_reuse_memory_only_when_nothing_refers_to_it(real_arrays):
    images = real_arrays["test"][0][:1000]
    first = clean_stage._scale_block(images)
    np.testing.assert_array_equal(first, images.astype(np.float32) / np.float32(255))
    second = clean_stage._scale_block(images[::-1])
    assert not np.shares_memory(first, second)  # first is still referenced
    np.testing.assert_array_equal(first, images.astype(np.float32) / np.float32(255))
    view = second[:10]
    del second
    third = clean_stage._scale_block(images)
    assert not np.shares_memory(view, third)  # a surviving view keeps its base
    np.testing.assert_array_equal(view, images[::-1][:10].astype(np.float32) / 255)
    address = first.__array_interface__["data"][0]
    del first
    fourth = clean_stage._scale_block(images[::-1])
    assert fourth.__array_interface__["data"][0] == address  # released: reused
    np.testing.assert_array_equal(fourth, images[::-1].astype(np.float32) / np.float32(255))


def test_passes_over_the_pixels_are_counted_per_span(tmp_path, real_arrays, dask_client):
    from distributed import span

    images, labels = real_arrays["test"][0][:3000], real_arrays["test"][1][:3000]
    _pixel_files(tmp_path / "pix" / "train", images, labels, 3)
    spec = DataSpec(format="parquet", dir=str(tmp_path / "pix"), splits={"train": "train"})
    _, out = run_clean(tmp_path, spec)
    data = clean_stage.load_cleaned(out)  # streamed: every pass reads the files
    with span("two-passes") as two:
        data.pixels.sum().compute()
        data.pixels.max().compute()
    with span("first-block") as first:
        data.pixels[:10].compute()
    counts = passes.span_counts(dask_client, two)
    assert counts == {"scaled": 2 * images.nbytes, "read": 2 * images.nbytes}
    assert passes.summary(counts, images.nbytes) == {"passes": 2.0,
                                                      "bytes_read": 2 * images.nbytes}
    assert passes.span_counts(dask_client, first) == {"scaled": 1000 * 784, "read": 1000 * 784}
    kept = data.raw_pixels.persist()  # kept in worker memory: passes scale, nothing is read
    kept.sum().compute()
    with span("in-memory") as in_memory:
        clean_stage.scale_pixels(kept).sum().compute()
    assert passes.span_counts(dask_client, in_memory) == {"scaled": images.nbytes}
