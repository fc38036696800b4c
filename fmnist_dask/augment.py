"""Augmented datasets many times the size of the source, generated on the workers.

Every source image appears ``factor`` times: copy 0 is the image itself (so a 1x dataset
is the source, and its scores are the plain job's), copies 1 to ``factor - 1`` are
transformed: a small random shift and rotation (one bilinear affine warp), an optional
horizontal flip, brightness/contrast jitter and Gaussian noise, each switchable. Copy ``c``
of a source piece draws its parameters from a generator seeded by ``(seed, first source
row, c)``, so the same seed and source give byte-identical files. One task writes a run of
copies of one piece (the piece is read once for all of them), each copy its own pixel
file (:mod:`fmnist_dask.pixelfiles`): nothing is gathered to the client.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd

from fmnist_dask import pixelfiles, plots
from fmnist_dask.config import AugmentSpec, DataSpec
from fmnist_dask.schema import N_PIXELS, PIXEL_COLUMNS
from fmnist_dask.stages.load import Piece, parse_piece, plan_pieces
from fmnist_dask.warp import warp

MANIFEST = "augment.json"
#: The files' layout: 2 is pixel files with copy 0 the source (1: 784 pixel columns, every
#: copy transformed). A directory of another layout is written again, not reused.
LAYOUT = 2


@dataclass(frozen=True)
class Transforms:
    """Per-image parameters of one block of copies, shape (n,) each."""

    shift_x: np.ndarray
    shift_y: np.ndarray
    angle: np.ndarray  # degrees
    flip: np.ndarray  # bool
    contrast: np.ndarray
    brightness: np.ndarray  # pixel levels
    noise: float  # standard deviation, pixel levels


def draw_transforms(rng: np.random.Generator, n: int, spec: AugmentSpec) -> Transforms:
    """Draw the parameters of ``n`` copies; a switched-off transform is the identity."""
    def uniform(enabled: bool, low: float, high: float, identity: float) -> np.ndarray:
        values = rng.uniform(low, high, n)  # drawn even when off: other draws stay put
        return values if enabled else np.full(n, identity)

    return Transforms(
        shift_x=uniform(spec.shift, -spec.max_shift, spec.max_shift, 0.0),
        shift_y=uniform(spec.shift, -spec.max_shift, spec.max_shift, 0.0),
        angle=uniform(spec.rotate, -spec.max_rotation, spec.max_rotation, 0.0),
        flip=(rng.random(n) < 0.5) & spec.flip,
        contrast=uniform(spec.jitter, 1 - spec.max_contrast, 1 + spec.max_contrast, 1.0),
        brightness=uniform(spec.jitter, -spec.max_brightness, spec.max_brightness, 0.0),
        noise=spec.noise_std if spec.noise else 0.0,
    )


def apply_transforms(images: np.ndarray, t: Transforms, rng: np.random.Generator) -> np.ndarray:
    """Transformed copies of ``images`` (n, 784) uint8, as uint8."""
    out = warp(images, t.angle, t.shift_x, t.shift_y, t.flip)
    mean = out.mean(axis=1, keepdims=True)
    out = (out - mean) * t.contrast[:, None] + mean + t.brightness[:, None]
    if t.noise:
        out += rng.normal(0.0, t.noise, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def parameter_columns(t: Transforms) -> dict[str, np.ndarray]:
    """The augmentation applied to each copy, as columns (``aug_*``) beside its pixels."""
    n = len(t.angle)
    return {
        "aug_shift_x": t.shift_x.astype(np.float32),
        "aug_shift_y": t.shift_y.astype(np.float32),
        "aug_rotation_deg": t.angle.astype(np.float32),
        "aug_flip": t.flip.astype(bool),
        "aug_contrast": t.contrast.astype(np.float32),
        "aug_brightness": t.brightness.astype(np.float32),
        "aug_noise_std": np.full(n, t.noise, np.float32),
    }


#: Copies of one source piece written by one task: enough work per task to amortise
#: reading the piece (a gzip IDX piece is decompressed from the file's start), while 100
#: copies of Fashion-MNIST's 7 pieces still make ~90 tasks for the workers to share.
COPIES_PER_TASK = 8


def identity(n: int) -> Transforms:
    """The parameters of ``n`` unchanged copies."""
    zeros = np.zeros(n)
    return Transforms(shift_x=zeros, shift_y=zeros, angle=zeros, flip=zeros.astype(bool),
                      contrast=np.ones(n), brightness=zeros, noise=0.0)


def _augment_block(piece: Piece, copies: range, spec: AugmentSpec, out_dir: str) -> int:
    """Write copies ``copies`` of one source piece, one file each; return the rows written."""
    frame = parse_piece(piece)
    frame = frame[frame["reject_reason"].isna()]
    images = pixelfiles.to_numpy(frame[pixelfiles.PIXELS])
    labels = frame["label"].to_numpy(np.int8)
    written = 0
    for copy in copies:
        if copy == 0:
            t, augmented = identity(len(images)), images
        else:
            rng = np.random.default_rng([spec.seed, piece.first_row_id, copy])
            t = draw_transforms(rng, len(images), spec)
            augmented = apply_transforms(images, t, rng)
        table = pd.DataFrame({"label": labels, pixelfiles.PIXELS: pixelfiles.to_series(augmented),
                              "source_row_id": frame["row_id"].to_numpy(np.int64),
                              "copy": np.full(len(images), copy, np.int32),
                              **parameter_columns(t)})
        name = f"part-{piece.first_row_id:09d}-{copy:04d}"
        pixelfiles.write_part(table, Path(out_dir) / piece.split / f"{name}.parquet")
        if spec.csv:
            csv = pd.DataFrame(augmented, columns=list(PIXEL_COLUMNS))
            csv.insert(0, "label", labels)
            csv.to_csv(Path(out_dir) / "csv" / piece.split / f"{name}.csv", index=False)
        written += len(images)
    return written


def augment(source: DataSpec, spec: AugmentSpec, out_dir: Path) -> dict[str, Any]:
    """Write ``spec.factor`` copies of every valid source row under ``out_dir`` (copy 0
    the row itself).

    Layout: ``out_dir/<split>/part-<first source row>-<copy>.parquet`` (``label``, ``pixels``
    784 bytes, ``source_row_id``, ``copy``, ``aug_*`` parameters), optional
    ``out_dir/csv/<split>/*.csv`` in the Kaggle layout, ``augment_preview.png``, and
    ``augment.json`` (the settings and row counts). A directory written with the same
    settings is reused as it is.

    Returns
    -------
    dict
        The contents of ``augment.json``.
    """
    out_dir = Path(out_dir)
    settings = {"source": source.model_dump(mode="json"), "augment": spec.model_dump(mode="json"),
                "layout": LAYOUT}
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in settings} == settings:
            return existing
    pieces = plan_pieces(source)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.incomplete")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    for split in {p.split for p in pieces}:
        (tmp_dir / split).mkdir(parents=True)
        if spec.csv:
            (tmp_dir / "csv" / split).mkdir(parents=True)
    blocks = [(p, range(start, min(start + COPIES_PER_TASK, spec.factor)))
              for p in pieces for start in range(0, spec.factor, COPIES_PER_TASK)]
    counts = dask.compute(*[dask.delayed(_augment_block, pure=True)(p, copies, spec,
                                                                    str(tmp_dir))
                            for p, copies in blocks])
    rows: dict[str, int] = {}
    for (piece, _), n in zip(blocks, counts, strict=True):
        rows[piece.split] = rows.get(piece.split, 0) + int(n)
    preview(pieces[0], spec, tmp_dir / "augment_preview.png")
    manifest = {**settings, "rows": rows, "files": len(pieces) * spec.factor}
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return manifest


def preview(piece: Piece, spec: AugmentSpec, path: Path, n_images: int = 6,
            n_variants: int = 5) -> Path:
    """A PNG: a few source images (first column) and augmented variants of each."""
    frame = parse_piece(piece).head(n_images)
    images = pixelfiles.to_numpy(frame[pixelfiles.PIXELS])
    rows, titles = [], []
    for copy in range(1, n_variants + 1):  # as copies 1.. of the data (0 is the source)
        rng = np.random.default_rng([spec.seed, piece.first_row_id, copy])
        t = draw_transforms(rng, len(images), spec)
        rows.append(apply_transforms(images, t, rng))
    for i in range(len(images)):
        titles.append(f"source {int(frame['row_id'].iloc[i])}")
        titles.extend(f"copy {c}" for c in range(1, n_variants + 1))
    grid = np.stack([np.vstack([images[i]] + [r[i] for r in rows]) for i in range(len(images))])
    return plots.image_grid(grid.reshape(-1, N_PIXELS) / 255.0, titles, n_variants + 1, path,
                            "Source images and augmented copies")
