"""Imported by each worker as it starts (dask's ``distributed.worker.preload``).

The modules whose functions the job's tasks run take 1.7 s to import (scikit-learn, numba,
pyarrow, matplotlib's backend). Imported here, while the client imports the same stages,
they are not imported by a stage's first task on each worker, inside the stage's time.
"""

from fmnist_dask.stages import clean, cluster, eda, embed, evaluate, load, reduce  # noqa: F401
