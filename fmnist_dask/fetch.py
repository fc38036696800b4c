"""Get the official Fashion-MNIST files (verified by sha256) and convert them.

The four IDX files are downloaded from the official location, or copied from a local
mirror directory when the machine is offline (``--mirror DIR`` or ``$FMNIST_MIRROR``).
Every file is checked against its published sha256 before it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist_dask.schema import CSV_COLUMNS

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MIRROR_ENV = "FMNIST_MIRROR"

@dataclass(frozen=True)
class OfficialFile:
    """One of the four official IDX files."""

    name: str
    sha256: str
    size: int


OFFICIAL_FILES: dict[str, OfficialFile] = {
    f.name: f
    for f in (
        OfficialFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            26_421_880,
        ),
        OfficialFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            29_515,
        ),
        OfficialFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            4_422_102,
        ),
        OfficialFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            5_148,
        ),
    )
}
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CSV_NAMES: dict[str, str] = {
    "train": "fashion-mnist_train.csv",
    "test": "fashion-mnist_test.csv",
}


class ChecksumError(RuntimeError):
    """A file's sha256 does not match the official one."""


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: OfficialFile) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the official sha256."""
    actual = sha256_of(path)
    if actual != expected.sha256:
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match the official {expected.sha256}; "
            "refusing to use it"
        )


def default_mirror() -> Path | None:
    """The mirror directory from ``$FMNIST_MIRROR``, if set."""
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def fetch(dest: Path, mirror: Path | None = None, url: str = OFFICIAL_URL) -> list[Path]:
    """Place the four official IDX files in ``dest``, each verified by sha256.

    Files already present with the right checksum are kept. Missing ones are copied from
    ``mirror`` when given, else downloaded from ``url``. A file is written under a temporary
    name and moved into place only after its checksum matched, so ``dest`` never holds an
    unverified file under an official name.

    Returns
    -------
    list of Path
        The four verified files, in :data:`OFFICIAL_FILES` order.
    """
    dest.mkdir(parents=True, exist_ok=True)
    placed = []
    for name, official in OFFICIAL_FILES.items():
        target = dest / name
        if target.exists():
            try:
                verify(target, official)
                placed.append(target)
                continue
            except ChecksumError:
                target.unlink()
        with tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            if mirror is not None:
                source = mirror / name
                if not source.exists():
                    raise FileNotFoundError(f"{source}: not in the mirror directory {mirror}")
                shutil.copyfile(source, tmp_path)
            else:
                with urllib.request.urlopen(url + name, timeout=60) as response:  # noqa: S310
                    with open(tmp_path, "wb") as out:
                        shutil.copyfileobj(response, out)
            verify(tmp_path, official)
            tmp_path.chmod(0o644)  # temporary files are private; the data need not be
            tmp_path.replace(target)
        finally:
            tmp_path.unlink(missing_ok=True)
        placed.append(target)
    return placed


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a uint8 array.

    Images come back with shape ``(count, 784)``, labels with shape ``(count,)``.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic == 2051:
        count, rows, cols = struct.unpack(">III", data[4:16])
        expected = 16 + count * rows * cols
        if len(data) != expected:
            raise ValueError(f"{path}: {len(data)} bytes, header says {expected}")
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows * cols)
    if magic == 2049:
        (count,) = struct.unpack(">I", data[4:8])
        if len(data) != 8 + count:
            raise ValueError(f"{path}: {len(data)} bytes, header says {8 + count}")
        return np.frombuffer(data, np.uint8, offset=8)
    raise ValueError(f"{path}: not an IDX file (magic number {magic})")


def load_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 784)`` uint8 and labels ``(n,)`` uint8 of one split from IDX files."""
    images_name, labels_name = SPLIT_FILES[split]
    images = read_idx(idx_dir / images_name)
    labels = read_idx(idx_dir / labels_name)
    if len(images) != len(labels):
        raise ValueError(f"{idx_dir}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels


def write_csv(idx_dir: Path, out_dir: Path, compress: bool = False) -> list[Path]:
    """Write the Kaggle CSV layout (``label,pixel1..pixel784``) for both splits.

    Rows are formatted in blocks with numpy, not one by one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, csv_name in CSV_NAMES.items():
        images, labels = load_split(idx_dir, split)
        target = out_dir / (csv_name + (".gz" if compress else ""))
        tmp = target.with_name("." + target.name + ".tmp")
        opener = gzip.open if compress else open
        with opener(tmp, "wt", newline="") as handle:
            handle.write(",".join(CSV_COLUMNS) + "\n")
            table = np.column_stack([labels, images])
            for start in range(0, len(table), 5000):
                np.savetxt(handle, table[start : start + 5000], fmt="%d", delimiter=",")
        tmp.replace(target)
        written.append(target)
    return written
