"""The data's shape: class names, image size, and the columns of the Kaggle CSV layout.

One place for what every stage, model and file format agrees on about a Fashion-MNIST row.
"""

from __future__ import annotations

#: Class names by label id (0-9), as the dataset publishes them.
LABEL_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Height and width of an image, in pixels.
IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
#: Pixel columns of the CSV layout, row by row of the image.
PIXEL_COLUMNS: tuple[str, ...] = tuple(f"pixel{i}" for i in range(1, N_PIXELS + 1))
#: Columns of a labelled CSV file.
CSV_COLUMNS: tuple[str, ...] = ("label", *PIXEL_COLUMNS)
