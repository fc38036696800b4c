"""The typed job spec: a YAML file in ``jobs/`` loaded into validated settings.

Unknown keys and wrong types are rejected with a message naming the key, so a typo in a
job file stops the run before any work starts instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """Where the images come from.

    ``splits`` maps a split name to one path, glob or fsspec URL (or a list of them).
    Relative paths resolve against ``dir``. For ``format: idx`` each path names an images
    file; its labels file is found by the official naming (``images-idx3`` -> ``labels-idx1``).
    """

    format: Literal["csv", "parquet", "idx"] = "csv"
    dir: str = "data/fashion-mnist"
    splits: dict[str, str | list[str]] = Field(
        default_factory=lambda: {
            "train": "fashion-mnist_train.csv",
            "test": "fashion-mnist_test.csv",
        }
    )
    blocksize: str = "16MiB"
    limit_rows: int | None = Field(default=None, ge=1)

    @field_validator("splits")
    @classmethod
    def _non_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("at least one split is needed")
        return value


class AugmentSourceSpec(DataSpec):
    """The data augmented: by default the official IDX files fetched into data/."""

    format: Literal["csv", "parquet", "idx"] = "idx"
    splits: dict[str, str | list[str]] = Field(
        default_factory=lambda: {
            "train": "train-images-idx3-ubyte.gz",
            "test": "t10k-images-idx3-ubyte.gz",
        }
    )


class AugmentSpec(_Strict):
    """Augmented copies of a source dataset (``fmnist-dask augment`` and the job's stage).

    When ``enabled`` in a job, the copies are written to ``out`` before the job loads its
    data (reused when ``out`` already holds them with these settings); point ``data`` at
    ``out`` (``format: parquet``, splits ``train: train``, ``test: test``).
    """

    enabled: bool = False
    factor: int = Field(default=2, ge=1)
    seed: int = 0
    out: str = "data/fashion-mnist-augmented"
    source: AugmentSourceSpec = AugmentSourceSpec()
    shift: bool = True
    max_shift: float = Field(default=2.0, ge=0, le=14)
    rotate: bool = True
    max_rotation: float = Field(default=10.0, ge=0, le=180)
    flip: bool = True
    jitter: bool = True
    max_contrast: float = Field(default=0.2, ge=0, lt=1)
    max_brightness: float = Field(default=20.0, ge=0, le=255)
    noise: bool = True
    noise_std: float = Field(default=8.0, ge=0)
    csv: bool = False


class CleanSpec(_Strict):
    """Validation and deduplication settings."""

    on_bad_rows: Literal["error", "quarantine"] = "error"
    dedup_key: Literal["label+pixels", "pixels"] = "label+pixels"


class EdaSpec(_Strict):
    """Exploration plots."""

    enabled: bool = True
    histogram_bins: int = Field(default=50, ge=2, le=256)
    sample_grid: int = Field(default=3, ge=1, le=10)


class ReduceSpec(_Strict):
    """PCA settings."""

    enabled: bool = True
    n_components: int = Field(default=10, ge=1, le=784)


class KMeansSpec(_Strict):
    """k-means settings, used for raw pixels and for the PCA projection."""

    enabled: bool = True
    n_clusters: int = Field(default=10, ge=2)
    max_iter: int = Field(default=300, ge=1)
    tol: float = Field(default=1e-4, gt=0)


class SampleSpec(_Strict):
    """The reduced sample the sample-based models are fitted on.

    ``size: null`` takes every row when the data has at most 70,000 rows, else 70,000.
    """

    size: int | None = Field(default=None, ge=2)


class GMMSpec(_Strict):
    """Gaussian mixture on the PCA-projected sample."""

    enabled: bool = True
    n_components: int = Field(default=10, ge=2)
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full"


class SpectralSpec(_Strict):
    """Spectral clustering (nearest-neighbours affinity) on the PCA-projected sample."""

    enabled: bool = True
    n_clusters: int = Field(default=10, ge=2)
    n_neighbors: int = Field(default=10, ge=2)
    extension_neighbors: int = Field(default=10, ge=1)


class ManifoldSpec(_Strict):
    """``manifold-gmm``: patch-dictionary features -> shift-invariant projection -> UMAP ->
    Gaussian mixture on the sample's images, ``n_runs`` times with different seeds, and the
    partition the runs agree on; every other row by a k-NN vote (issue 8; docs/quality.md).

    Off in the default job: on all 70,000 images it costs more than the rest of the job
    together (``jobs/fashion_mnist_manifold.yaml`` turns it on).
    """

    enabled: bool = False
    n_clusters: int = Field(default=10, ge=2)
    n_atoms: int = Field(default=128, ge=2)
    patch_size: int = Field(default=6, ge=2, le=28)
    pool: int = Field(default=2, ge=1, le=7)
    n_pca: int = Field(default=30, ge=2)
    max_shift: int = Field(default=2, ge=0, le=8)
    max_rotation: float = Field(default=0.0, ge=0, le=45)
    n_view_pca: int = Field(default=256, ge=2)
    n_neighbors: int = Field(default=20, ge=2)
    n_components: int = Field(default=10, ge=2)
    n_init: int = Field(default=3, ge=1)
    mixture_selection: Literal["likelihood", "balanced"] = "likelihood"
    extension_neighbors: int = Field(default=10, ge=1)
    n_runs: int = Field(default=4, ge=1)


class TSNESpec(_Strict):
    """2-D t-SNE map of the sample (openTSNE)."""

    enabled: bool = True
    perplexity: float = Field(default=30.0, gt=0)
    embed_all: bool = False
    n_jobs: int = -1


class ScoreSpec(_Strict):
    """Scoring settings."""

    silhouette: Literal["auto", "exact", "sampled", "off"] = "auto"
    exact_silhouette_max_rows: int = Field(default=100_000, ge=2)
    silhouette_sample_size: int = Field(default=10_000, ge=2)
    #: Rows the sampled silhouette's mean distances are taken over: its cost stays the same
    #: at any data size (metrics.silhouette_sampled).
    silhouette_reference_size: int = Field(default=50_000, ge=2)
    #: Precision of the distance products: float32 takes half the time of float64 and moves
    #: the silhouette by ~1e-7 on Fashion-MNIST (docs/benchmarks.md); totals are float64.
    silhouette_precision: Literal["float32", "float64"] = "float32"
    images_per_cluster: int = Field(default=10, ge=1, le=30)


class ClusterRef(_Strict):
    """Which Dask cluster to run on: a file in ``cluster_config/`` or a scheduler address."""

    config: str | None = None
    scheduler: str | None = None


#: Sections that need the PCA: they are fitted on (or embed) a sample of its projection.
NEEDS_REDUCE = ("gmm", "spectral", "manifold", "tsne")


class JobSpec(_Strict):
    """A whole job.

    A stage whose inputs another setting turns off is refused rather than skipped: GMM,
    spectral, manifold-gmm and t-SNE work on a sample of the PCA projection, so each of
    them needs ``reduce.enabled``. (k-means runs on the pixels as well; with the PCA off it
    runs there only.)
    """

    name: str = "fashion-mnist"
    seed: int = 0
    output_dir: str = "outputs"
    #: Keep the cleaned pixels (uint8) in worker memory when they take at most this many
    #: bytes (and a quarter of the workers' memory); larger data streams from parquet, so
    #: memory stays flat as the data grows. 1 GiB keeps up to ~19x Fashion-MNIST (16x:
    #: 0.88 GB, read once instead of on each of k-means' ~60 passes); lower it to trade
    #: speed for memory (docs/benchmarks.md has 16x measured both ways). k-means on the
    #: raw pixels gathers them into one task only up to this size too; above it each
    #: worker streams its share of the pixel files on every pass.
    persist_max_bytes: int = Field(default=1 << 30, ge=0)
    augment: AugmentSpec = AugmentSpec()
    data: DataSpec = DataSpec()
    clean: CleanSpec = CleanSpec()
    eda: EdaSpec = EdaSpec()
    reduce: ReduceSpec = ReduceSpec()
    kmeans: KMeansSpec = KMeansSpec()
    sample: SampleSpec = SampleSpec()
    gmm: GMMSpec = GMMSpec()
    spectral: SpectralSpec = SpectralSpec()
    manifold: ManifoldSpec = ManifoldSpec()
    tsne: TSNESpec = TSNESpec()
    scores: ScoreSpec = ScoreSpec()
    cluster: ClusterRef = ClusterRef()

    @model_validator(mode="after")
    def _prerequisites_on(self) -> JobSpec:
        needing = [f"{section}.enabled" for section in NEEDS_REDUCE
                   if getattr(self, section).enabled]
        if needing and not self.reduce.enabled:
            raise PydanticCustomError(
                "prerequisite_off",
                "{keys} {verb} reduce.enabled, which is false: these work on a sample of the "
                "PCA projection; turn reduce on or them off",
                {"keys": ", ".join(needing), "verb": "needs" if len(needing) == 1 else "need"})
        return self


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif item["type"] == "prerequisite_off":  # names its keys itself
            lines.append(f"  {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_job_spec(raw: dict[str, Any], source: str = "<job spec>") -> JobSpec:
    """Validate a mapping as a :class:`JobSpec`, raising :class:`SpecError` naming keys."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec must be a mapping, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_describe(error, source)) from None


def load_job_spec(path: Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML job spec and apply dotted-key overrides (``{"data.dir": "x"}``)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SpecError(f"{path}: job spec not found") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_job_spec(raw, str(path))
