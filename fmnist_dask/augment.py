"""Augmented datasets many times the size of the source, generated on the workers.

Every source image gets ``factor`` transformed copies: a small random shift and rotation
(one bilinear affine warp), an optional horizontal flip, brightness/contrast jitter and
Gaussian noise, each switchable. Each (source partition, copy) pair is one task that draws
its parameters from a generator seeded by ``(seed, first source row, copy)``, so the same
seed and source give byte-identical files, and writes its own parquet file: nothing is
gathered to the client.
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

from fmnist_dask import plots
from fmnist_dask.config import AugmentSpec, DataSpec
from fmnist_dask.schema import CSV_COLUMNS, N_PIXELS, PIXEL_COLUMNS
from fmnist_dask.stages.load import Piece, parse_piece, plan_pieces
from fmnist_dask.warp import warp

MANIFEST = "augment.json"


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


def _augment_block(piece: Piece, copy: int, spec: AugmentSpec, out_dir: str) -> int:
    """Write the ``copy``-th augmented copy of one source piece; return its row count."""
    frame = parse_piece(piece)
    frame = frame[frame["reject_reason"].isna()]
    images = frame[list(PIXEL_COLUMNS)].to_numpy(np.uint8)
    rng = np.random.default_rng([spec.seed, piece.first_row_id, copy])
    t = draw_transforms(rng, len(images), spec)
    augmented = apply_transforms(images, t, rng)
    table = pd.DataFrame(augmented, columns=list(PIXEL_COLUMNS))
    table.insert(0, "label", frame["label"].to_numpy(np.int8))
    table["source_row_id"] = frame["row_id"].to_numpy(np.int64)
    table["copy"] = np.int32(copy)
    for name, values in parameter_columns(t).items():
        table[name] = values
    name = f"part-{piece.first_row_id:09d}-{copy:04d}"
    split_dir = Path(out_dir) / piece.split
    table.to_parquet(split_dir / f"{name}.parquet", index=False)
    if spec.csv:
        csv_dir = Path(out_dir) / "csv" / piece.split
        table[list(CSV_COLUMNS)].to_csv(csv_dir / f"{name}.csv", index=False)
    return len(table)


def augment(source: DataSpec, spec: AugmentSpec, out_dir: Path) -> dict[str, Any]:
    """Write ``spec.factor`` augmented copies of every valid source row under ``out_dir``.

    Layout: ``out_dir/<split>/part-<first source row>-<copy>.parquet`` (``label``,
    ``pixel1..pixel784`` uint8, ``source_row_id``, ``copy``, ``aug_*`` parameters), optional
    ``out_dir/csv/<split>/*.csv`` in the Kaggle layout, ``augment_preview.png``, and
    ``augment.json`` (the settings and row counts). A directory written with the same
    settings is reused as it is.

    Returns
    -------
    dict
        The contents of ``augment.json``.
    """
    out_dir = Path(out_dir)
    settings = {"source": source.model_dump(mode="json"), "augment": spec.model_dump(mode="json")}
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
    tasks = [dask.delayed(_augment_block, pure=True)(p, c, spec, str(tmp_dir))
             for p in pieces for c in range(spec.factor)]
    counts = dask.compute(*tasks)
    rows: dict[str, int] = {}
    for index, n in enumerate(counts):
        split = pieces[index // spec.factor].split
        rows[split] = rows.get(split, 0) + int(n)
    preview(pieces[0], spec, tmp_dir / "augment_preview.png")
    manifest = {**settings, "rows": rows, "files": len(tasks)}
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return manifest


def preview(piece: Piece, spec: AugmentSpec, path: Path, n_images: int = 6,
            n_variants: int = 5) -> Path:
    """A PNG: a few source images (first column) and augmented variants of each."""
    frame = parse_piece(piece).head(n_images)
    images = frame[list(PIXEL_COLUMNS)].to_numpy(np.uint8)
    rows, titles = [], []
    for copy in range(n_variants):
        rng = np.random.default_rng([spec.seed, piece.first_row_id, copy])
        t = draw_transforms(rng, len(images), spec)
        rows.append(apply_transforms(images, t, rng))
    for i in range(len(images)):
        titles.append(f"source {int(frame['row_id'].iloc[i])}")
        titles.extend(f"copy {c}" for c in range(n_variants))
    grid = np.stack([np.vstack([images[i]] + [r[i] for r in rows]) for i in range(len(images))])
    return plots.image_grid(grid.reshape(-1, N_PIXELS) / 255.0, titles, n_variants + 1, path,
                            "Source images and augmented copies")
