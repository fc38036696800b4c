"""How long a prediction waits behind lower-priority tasks, by how its model is shipped.

A LocalCluster of 2 workers x 1 thread; 200 tasks of 0.1 s at priority -1 are queued on
the workers (5 persisted map_blocks over 40 blocks), then a map_blocks at priority 10 whose
model is either a bare value in the graph (``dask.delayed(value)``: data to produce, which
the scheduler holds back while the workers have tasks assigned) or a task returning it
(``fmnist_dask._blocks.ship``). Prints the prediction's latency for each, twice.

    python benchmarks/bench_shipping.py
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

from fmnist_dask._blocks import ship


def _busy(block: np.ndarray) -> np.ndarray:
    end = time.perf_counter() + 0.1
    while time.perf_counter() < end:
        pass
    return block[:1]


def _kernel(block: np.ndarray, model: float) -> np.ndarray:
    return block[:, :1] * model


def main() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster):
        x = da.random.random((40_000, 10), chunks=(1_000, 10)).persist()
        x.sum().compute()
        for mode in ("data", "task", "data", "task"):
            flood = [da.map_blocks(_busy, x, chunks=(1, 10), dtype=float,
                                   name=f"flood-{mode}-{i}-{time.time()}").persist()
                     for i in range(5)]
            time.sleep(0.3)
            start = time.perf_counter()
            model = (dask.delayed(np.float64(2.0), name=f"model-{start}") if mode == "data"
                     else ship(np.float64(2.0), f"model-{start}"))
            with dask.annotate(priority=10):
                da.map_blocks(_kernel, x, model=model, chunks=(x.chunks[0], (1,)),
                              dtype=float).sum().compute()
            print(f"model as {mode}: the prediction took {time.perf_counter() - start:.2f} s")
            dask.compute(flood)


if __name__ == "__main__":
    main()
