"""The orchestrator: runs the stages in order and records each one's wall time.

Each stage is a function from dask collections to dask collections plus the artefacts it
writes into the run directory; this module only wires them together.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fmnist_dask import logs, progress
from fmnist_dask.augment import augment
from fmnist_dask.config import JobSpec
from fmnist_dask.dask_cluster import load_cluster_config, open_cluster
from fmnist_dask.rundir import default_run_name, open_run
from fmnist_dask.stages import clean, cluster, eda, embed, evaluate, load, reduce, report

logger = logging.getLogger("fmnist_dask")
#: Keep the pixels in worker memory when they take at most this share of it.
PERSIST_SHARE = 0.25


def _worker_memory(description: dict) -> int:
    return sum(int(w.get("memory_limit_bytes") or 0) for w in description.get("workers", []))


def run_job(spec: JobSpec, run_name: str | None = None) -> Path:
    """Run the whole job described by ``spec``; return the finished run directory."""
    target = load_cluster_config(
        Path(spec.cluster.config) if spec.cluster.config else None, spec.cluster.scheduler
    )
    manifest = {"job": spec.model_dump(mode="json")}
    name = run_name or default_run_name(spec.name)
    with open_run(Path(spec.output_dir), name, manifest) as run, \
            logs.run_log(run.dir / logs.RUN_LOG), open_cluster(target) as session, \
            progress.watch(run, session.client):
        manifest["cluster"] = session.description
        manifest["dashboard_link"] = session.dashboard_link
        logger.info("Dask dashboard: %s", session.dashboard_link or "(none)")
        logger.info("run directory (while running): %s", run.dir)
        log = logger.info

        if spec.augment.enabled:
            with run.stage("augment", log) as record:
                record.update(augment(spec.augment.source, spec.augment, Path(spec.augment.out)))
        with run.stage("load", log) as record:
            raw, pieces, files = load.load(spec.data)
            record.update(inputs=files, partitions=len(pieces))
        with run.stage("clean", log) as record:
            counts = clean.clean(raw, pieces, files, spec.clean, run.dir)
            manifest["rows"] = counts.as_dict()
            record["rows"] = counts.as_dict()["total"]
        data = clean.load_cleaned(run.dir)
        if spec.eda.enabled:
            with run.stage("eda", log) as record:
                manifest["eda"] = eda.explore(data, list(counts.read), spec.eda, run.dir, spec.seed)
                record.update(pixel_mean=manifest["eda"]["pixel_mean"],
                              pixel_std=manifest["eda"]["pixel_std"])

        pixels = data.pixels
        keep = data.raw_pixels.nbytes <= min(spec.persist_max_bytes,
                                             PERSIST_SHARE * _worker_memory(session.description))
        manifest["pixels"] = {"bytes": int(data.raw_pixels.nbytes), "in_worker_memory": keep}
        if keep:
            # Read once and keep the uint8 pixels (a quarter of float32) in worker memory:
            # k-means and PCA pass over them many times; each pass rescales block by block.
            data.raw_pixels = data.raw_pixels.persist()
            pixels = data.pixels
        results: list[cluster.ClusterResult] = []
        spaces = {"pixels": pixels}
        if spec.kmeans.enabled:
            with run.stage("kmeans_raw", log) as record:
                result, model = cluster.kmeans(pixels, spec.kmeans, spec.seed, "kmeans_raw",
                                               "pixels")
                cluster.save_centroids(model.cluster_centers_, result.method, run.dir,
                                       images=model.cluster_centers_)
                results.append(result)
                record.update(result.scores)
        if spec.reduce.enabled:
            with run.stage("reduce", log) as record:
                reduction, manifest["pca"] = reduce.reduce(pixels, data.row_id, spec.reduce,
                                                           run.dir)
                spaces["pca"] = reduction.projected.persist()
                record["cumulative_explained_variance"] = manifest["pca"][
                    "cumulative_explained_variance"]
            if spec.kmeans.enabled:
                with run.stage("kmeans_pca", log) as record:
                    result, model = cluster.kmeans(spaces["pca"], spec.kmeans, spec.seed,
                                                   "kmeans_pca", "pca")
                    centres = reduction.pca.inverse_transform(model.cluster_centers_).compute()
                    cluster.save_centroids(model.cluster_centers_, result.method, run.dir,
                                           images=centres)
                    results.append(result)
                    record.update(result.scores)
            needs_sample = (spec.gmm.enabled or spec.spectral.enabled or spec.tsne.enabled
                            or spec.manifold.enabled)
            if needs_sample:
                with run.stage("sample", log) as record:
                    sample = cluster.draw_sample(spaces["pca"], spec.sample.size, spec.seed)
                    record["sample_size"] = sample.size
            if spec.gmm.enabled:
                with run.stage("gmm", log) as record:
                    results.append(cluster.gmm(spaces["pca"], sample, spec.gmm, spec.seed))
                    record.update(results[-1].scores)
            if spec.spectral.enabled:
                with run.stage("spectral", log) as record:
                    results.append(cluster.spectral(spaces["pca"], sample, spec.spectral,
                                                    spec.seed))
                    record.update(results[-1].scores)
            if spec.manifold.enabled:
                with run.stage("manifold_gmm", log) as record:
                    results.append(cluster.manifold(pixels, sample, spec.manifold, spec.seed))
                    record.update(results[-1].scores)
            if spec.tsne.enabled:
                with run.stage("tsne", log) as record:
                    embedding, manifest["tsne"] = embed.tsne(
                        spaces["pca"], sample, data.row_id, spec.tsne, spec.seed, run.dir)
                    record.update(manifest["tsne"])
        if results:
            with run.stage("evaluate", log) as record:
                rows = [evaluate.score(r, spaces[r.features], data, spec.scores, run.dir,
                                       spec.seed) for r in results]
                evaluate.write_assignments(results, data, run.dir)
                metrics = evaluate.write_metrics(rows, run.dir)
                manifest["metrics"] = metrics.to_dict("records")
                if spec.reduce.enabled and spec.tsne.enabled:
                    evaluate.tsne_figures(embedding.coordinates, embedding.indices, results,
                                          data, run.dir)
                seconds = {name: stage["seconds"] for name, stage in manifest["stages"].items()
                           if "seconds" in stage}
                evaluate.write_comparison(metrics, seconds, run.dir)
                record["methods"] = [r.method for r in results]
        with run.stage("report", log) as record:
            # Built from the files written above only, exactly as `fmnist-dask report` does.
            record["file"] = report.write_report(run.dir).name
    logger.info("run directory: %s", run.dir)
    return run.dir
