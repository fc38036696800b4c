"""Exact silhouette of all 70,000 images: this tree's kernel, a reference, and the floor.

The partition is scikit-learn's ``KMeans(10, random_state=0, n_init=1)`` of the space
scored (the 10 PCA components, or the 784 scaled pixels). Timed, interleaved per repeat so a
load change hits all alike, with dask's threaded scheduler on 2 threads (one per core):

- ``ours``: ``fmnist_dask.metrics.silhouette_exact`` of this tree, float64 products;
- ``ours float32``: the same with float32 products (the job's default,
  ``scores.silhouette_precision``);
- ``reference``: the same function from a git revision (``--reference``, default the commit
  before the augmented-product kernel), loaded from ``git show``.

The floor is what the arithmetic needs on this machine, measured in the same run: the pair
tiles' matrix products (n^2/2 pairs x (2(d+2) + 4k) flops: one product for the squared
distances, two for the per-cluster sums of both blocks) at the rate of one large float64
matrix product on 2 threads, plus one square root and one max per pair at the rate numpy
takes them over a cached tile.

Reproduce::

    python benchmarks/bench_silhouette.py --repeats 3 --json /tmp/bench_silhouette.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from fmnist_dask.metrics import silhouette_exact

REPO = Path(__file__).resolve().parents[1]


def reference_module(revision: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{revision}:fmnist_dask/metrics.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    module = sys.modules["reference_metrics"] = types.ModuleType("reference_metrics")
    exec(compile(source, f"{revision}:metrics.py", "exec"), module.__dict__)  # noqa: S102
    return module


def rates() -> tuple[float, float]:
    """(float64 flops/s of a large matrix product on 2 threads, sqrt+max elements/s)."""
    a = np.random.default_rng(0).random((3000, 3000))
    with threadpool_limits(2):
        start = time.perf_counter()
        a @ a
        gemm = 2 * 3000**3 / (time.perf_counter() - start)
    tile = np.random.default_rng(1).random((256, 1024))
    start = time.perf_counter()
    for _ in range(200):
        np.maximum(tile, 0.0, out=tile)
        np.sqrt(tile, out=tile)
    # two cores, one tile each
    elementwise = 2 * 200 * tile.size / (time.perf_counter() - start)
    return gemm, elementwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw-repeats", type=int, default=1)
    parser.add_argument("--reference", default="2eaa2a6")
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = []
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        with gzip.open(args.data / name) as fh:
            images.append(np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784))
    X = (np.concatenate(images) / np.float32(255)).astype(np.float32)
    spaces = {"pca10": PCA(10, random_state=0).fit_transform(X), "raw": X}
    reference = reference_module(args.reference).silhouette_exact
    gemm_rate, elementwise_rate = rates()
    result: dict = {"load_average_start": os.getloadavg(), "reference": args.reference,
                    "gemm_flops_per_s": gemm_rate, "sqrt_max_per_s": elementwise_rate}
    k = 10

    def float32(X: da.Array, labels: np.ndarray) -> float:
        return silhouette_exact(X, labels, dtype=np.float32)

    for space, data in spaces.items():
        repeats = args.repeats if space == "pca10" else args.raw_repeats
        if not repeats:
            continue
        n, d = data.shape
        labels = KMeans(k, random_state=0, n_init=1).fit_predict(data)
        dX = da.from_array(data, chunks=(5000, d))
        times: dict[str, list[float]] = {"ours": [], "reference": [], "ours float32": []}
        values = {}
        with dask.config.set(scheduler="threads", num_workers=2), threadpool_limits(1):
            for _ in range(repeats):
                for name, fn in (("reference", reference), ("ours", silhouette_exact),
                                 ("ours float32", float32)):
                    start = time.perf_counter()
                    values[name] = float(fn(dX, labels))
                    times[name].append(time.perf_counter() - start)
        pairs = n * n / 2
        # float64 products; float32 ones run at twice the rate (twice the lanes per vector)
        floor = pairs * (2 * (d + 2) + 4 * k) / gemm_rate + pairs / elementwise_rate
        medians = {name: statistics.median(t) for name, t in times.items()}
        result[space] = {"rows": n, "features": d, "seconds": times, "median_s": medians,
                         "values": values, "floor_s": floor,
                         "floor32_s": floor / 2,
                         "reference_over_ours": medians["reference"] / medians["ours"],
                         "ours_over_floor": medians["ours"] / floor,
                         "ours32_over_floor32": medians["ours float32"] / (floor / 2)}
        print(f"{space}: {json.dumps(result[space])}", file=sys.stderr)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
