"""Image geometry shared by the augmentation and the manifold features: rotations, shifts
and flips of flattened images (bilinear, zero outside the picture), in numpy."""

from __future__ import annotations

import numpy as np

from fmnist_dask.schema import IMAGE_SHAPE

#: Rows warped at a time: bounds the float temporaries of the bilinear warp.
WARP_ROWS = 1024


def _warp_rows(images: np.ndarray, angle: np.ndarray, shift_x: np.ndarray,
               shift_y: np.ndarray, flip: np.ndarray,
               image_shape: tuple[int, int]) -> np.ndarray:
    """Rotate about the centre and shift (bilinear, zero outside), then flip; float32."""
    n = len(images)
    height, width = image_shape
    pictures = images.reshape(n, height, width).astype(np.float32)
    if not (angle.any() or shift_x.any() or shift_y.any()):
        warped = pictures
    else:
        cy, cx = (height - 1) / 2, (width - 1) / 2
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = np.deg2rad(angle).astype(np.float32)[:, None, None]
        cos, sin = np.cos(theta), np.sin(theta)
        # Inverse map: each output pixel samples the source at R^-1 (p - c - shift) + c.
        dx = xs[None] - cx - shift_x[:, None, None].astype(np.float32)
        dy = ys[None] - cy - shift_y[:, None, None].astype(np.float32)
        src_x = cos * dx + sin * dy + cx
        src_y = -sin * dx + cos * dy + cy
        x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
        fx, fy = src_x - x0, src_y - y0
        padded = np.zeros((n, height + 2, width + 2), np.float32)
        padded[:, 1:-1, 1:-1] = pictures
        index = np.arange(n)[:, None, None]

        def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            # +1 for the zero border; anything further out reads the border too.
            return padded[index, np.clip(yy + 1, 0, height + 1), np.clip(xx + 1, 0, width + 1)]

        warped = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                  + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    warped = np.where(flip[:, None, None], warped[:, :, ::-1], warped)
    return warped.reshape(n, height * width)


def warp(images: np.ndarray, angle: np.ndarray, shift_x: np.ndarray, shift_y: np.ndarray,
         flip: np.ndarray, image_shape: tuple[int, int] = IMAGE_SHAPE) -> np.ndarray:
    """Each image rotated about its centre, shifted, then mirrored left-right where asked.

    Parameters
    ----------
    images : numpy.ndarray of shape (n, height * width)
    angle : numpy.ndarray of shape (n,)
        Degrees; positive turns the picture clockwise as displayed (rows downwards).
    shift_x, shift_y : numpy.ndarray of shape (n,)
        Pixels, right and down.
    flip : numpy.ndarray of shape (n,), bool
    image_shape : (height, width)

    Returns
    -------
    numpy.ndarray of shape (n, height * width), float32
        Bilinear samples of the source, zero outside it; ``WARP_ROWS`` images at a time.
    """
    out = np.empty((len(images), image_shape[0] * image_shape[1]), dtype=np.float32)
    for start in range(0, len(images), WARP_ROWS):
        part = slice(start, start + WARP_ROWS)
        out[part] = _warp_rows(images[part], angle[part], shift_x[part], shift_y[part],
                               flip[part], image_shape)
    return out


def rotate(images: np.ndarray, angles: np.ndarray,
           image_shape: tuple[int, int] = IMAGE_SHAPE) -> np.ndarray:
    """Each image rotated about its centre by its angle (degrees), bilinear, zero outside.

    Parameters
    ----------
    images : numpy.ndarray of shape (n, height * width)
    angles : numpy.ndarray of shape (n,)
        Degrees; positive turns the picture clockwise as displayed (rows downwards).

    Returns
    -------
    numpy.ndarray of shape (n, height * width), float32
    """
    none = np.zeros(len(images), dtype=np.float32)
    return warp(images, np.asarray(angles, np.float32), none, none, none.astype(bool),
                image_shape)
