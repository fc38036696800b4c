"""A new process's first manifold fit: UMAP's kernels compiled, or loaded from numba's cache.

Each repeat starts three fresh Python processes, one after the other, that each fit one
``ManifoldClustering`` with the shipped manifold job's settings on the same 1,000 real
training images and report the wall time of that fit:

- cold: an empty numba cache directory, so every kernel is compiled (what each new worker
  process paid before the kernels were cached);
- warm: the cache filled by ``compile_umap_kernels()`` (what ``make install`` runs);
- compiled: a second fit in the warm process, the floor (nothing left to compile).

Reproduce::

    python benchmarks/bench_umap_compile.py --repeats 3 --json /tmp/bench_umap_compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIT = """
import gzip, json, sys, time, warnings
import numpy as np
from fmnist_dask.config import load_job_spec
from fmnist_dask.models.manifold import compile_umap_kernels
from fmnist_dask.stages.cluster import manifold_ensemble
warnings.simplefilter("ignore")
if sys.argv[1] == "fill":
    compile_umap_kernels()
    raise SystemExit
with gzip.open(sys.argv[2]) as fh:
    images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)
X = (images[:1_000] / np.float32(255)).astype(np.float32)
spec = load_job_spec("jobs/fashion_mnist_manifold.yaml").manifold
member = manifold_ensemble(spec, seed=0).member_template().set_params(random_state=0)
times = []
for _ in range(2):
    start = time.perf_counter()
    member.fit(X)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def first_fits(images: Path, cache: Path, fill: bool) -> list[float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", FIT]
    if fill:
        subprocess.run([*run, "fill"], cwd=REPO, env=env, check=True)
    out = subprocess.run([*run, "fit", str(images)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = args.data / "train-images-idx3-ubyte.gz"
    cold, warm, compiled = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as empty:
            cold.append(first_fits(images, Path(empty), fill=False)[0])
        with tempfile.TemporaryDirectory() as cache:
            first, second = first_fits(images, Path(cache), fill=True)
            warm.append(first)
            compiled.append(second)
    result = {
        "load_average": os.getloadavg()[0],
        "cold_s": cold, "warm_s": warm, "compiled_s": compiled,
        "median_cold_s": statistics.median(cold),
        "median_warm_s": statistics.median(warm),
        "median_compiled_s": statistics.median(compiled),
    }
    result["cold_over_warm"] = result["median_cold_s"] / result["median_warm_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
