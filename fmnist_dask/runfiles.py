"""The names of the files and folders inside a run directory, defined once.

The stages write these, the report and ``fmnist-dask compare`` read them, and
outputs/README.md describes them for users. Paths are relative to the run directory, with
``/`` as separator (they are also the report's links).
"""

from __future__ import annotations

MANIFEST = "manifest.json"
RUN_LOG = "run.log"
REPORT = "report.html"
PERFORMANCE_REPORT = "performance-report.html"
TIMELINE = "timeline.png"

# clean
CLEANED = "cleaned"
REJECTED = "rejected.parquet"
DUPLICATES = "duplicates.parquet"
#: The clean stage's intermediate files, removed before it returns.
WORK = "_work"

# eda
SAMPLE_IMAGES = "eda/sample_images.png"
CLASS_DISTRIBUTION = "eda/class_distribution.png"
PIXEL_HISTOGRAM = "eda/pixel_histogram.png"

# reduce
PROJECTED = "projected"
EXPLAINED_VARIANCE = "pca/explained_variance.parquet"
EXPLAINED_VARIANCE_PNG = "pca/explained_variance.png"
COMPONENTS_PNG = "pca/components.png"

# embed
EMBEDDING = "embedding"
TSNE_TRUE_CLASS = "tsne/tsne_true_class.png"

# evaluate
ASSIGNMENTS = "assignments"
METRICS = "metrics.parquet"
COMPARISON_PNG = "comparison.png"
COMPARISON_MD = "comparison.md"


def tsne_figure(method: str) -> str:
    """The t-SNE map coloured by ``method``'s clusters."""
    return f"tsne/tsne_{method}.png"


def centroids(method: str, suffix: str = "png") -> str:
    """``method``'s cluster centres as images (``png``) or a table (``parquet``)."""
    return f"clusters/{method}_centroids.{suffix}"


def cluster_samples(method: str) -> str:
    """Sample images of each of ``method``'s clusters."""
    return f"clusters/{method}_samples.png"


def contingency(method: str) -> str:
    """Classes against ``method``'s clusters."""
    return f"clusters/{method}_contingency.png"
