"""Patch-dictionary features of 4,000 real images: time per internal sub-block size.

``PatchDictionaryFeatures.transform`` works through a block ``_SUB_ROWS`` images at a time;
its (images x patches x atoms) temporaries are ~2.2 MB per image for the job's 128 atoms.
This fits one dictionary (the manifold job's settings) and times ``transform`` of the same
4,000 training images with each sub-block size, interleaved per repeat, in one process and
one thread (as on a worker), and checks the output is identical for every size.

Reproduce::

    python benchmarks/bench_patch_features.py --repeats 5 --json /tmp/bench_patch_features.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import fmnist_dask.models.features as features

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 64, 32, 16])
    parser.add_argument("--data", type=Path,
                        default=REPO.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with gzip.open(args.data / "train-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)[:4_000]
    X = (images / np.float32(255)).astype(np.float32)
    times: dict[int, list[float]] = {size: [] for size in args.sizes}
    with threadpool_limits(1):
        dictionary = features.PatchDictionaryFeatures(128, random_state=0).fit(X)
        reference = None
        for _ in range(args.repeats):
            for size in args.sizes:
                features._SUB_ROWS = size
                start = time.perf_counter()
                out = dictionary.transform(X)
                times[size].append(time.perf_counter() - start)
                reference = out if reference is None else reference
                assert np.array_equal(out, reference), f"sub-block {size} changed the output"
    medians = {size: statistics.median(t) for size, t in times.items()}
    result = {"load_average": os.getloadavg()[0], "images": len(X), "seconds": times,
              "median_s": medians,
              "ratio_to_first": {s: medians[args.sizes[0]] / m for s, m in medians.items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
