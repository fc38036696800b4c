"""fmnist-dask: distributed unsupervised analysis of image datasets on Dask."""

__version__ = "0.1.0"
