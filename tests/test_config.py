"""The typed job spec: shipped specs validate; bad keys and types are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmnist_dask.config import JobSpec, SpecError, load_job_spec, parse_job_spec

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_job_specs_validate(path):
    spec = load_job_spec(path)
    assert isinstance(spec, JobSpec) and spec.name


def test_defaults_are_the_original_analysis():
    spec = parse_job_spec({})
    assert spec.kmeans.n_clusters == 10 and spec.reduce.n_components == 10
    assert spec.gmm.n_components == 10 and spec.gmm.covariance_type == "full"
    assert spec.clean.dedup_key == "label+pixels" and spec.clean.on_bad_rows == "error"
    assert spec.eda.histogram_bins == 50


@pytest.mark.parametrize(("raw", "message"), [
    ({"kmeans": {"n_clusterz": 3}}, "kmeans.n_clusterz: unknown key"),
    ({"reduce": {"n_components": "ten"}}, "reduce.n_components"),
    ({"reduce": {"n_components": 0}}, "reduce.n_components"),
    ({"clean": {"on_bad_rows": "skip"}}, "clean.on_bad_rows"),
    ({"data": {"format": "xlsx"}}, "data.format"),
    ({"augment": {"source": {"dirr": "x"}}}, "augment.source.dirr: unknown key"),
    ({"seed": [1]}, "seed"),
])
def test_bad_keys_and_types_are_named(raw, message):
    with pytest.raises(SpecError) as error:
        parse_job_spec(raw, "job.yaml")
    assert str(error.value).startswith("job.yaml: invalid job spec")
    assert message in str(error.value)


@pytest.mark.parametrize("section", ["gmm", "spectral", "manifold", "tsne"])
def test_a_method_whose_prerequisite_is_off_is_refused_naming_both_keys(section):
    # These work on a sample of the PCA projection: with the PCA off they cannot run, and
    # the spec says so instead of the job skipping them silently.
    others = {s: {"enabled": s == section} for s in ("gmm", "spectral", "manifold", "tsne")}
    with pytest.raises(SpecError) as error:
        parse_job_spec({"reduce": {"enabled": False}, **others}, "job.yaml")
    assert f"{section}.enabled needs reduce.enabled, which is false" in str(error.value)
    off = {s: {"enabled": False} for s in others}
    assert not parse_job_spec({"reduce": {"enabled": False}, **off}).reduce.enabled


def test_command_line_overrides_reach_nested_keys(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("data:\n  dir: somewhere\nseed: 1\n")
    spec = load_job_spec(job, {"data.dir": "elsewhere", "seed": 5, "output_dir": None,
                               "augment.source.dir": "mirror"})
    assert spec.data.dir == "elsewhere" and spec.seed == 5 and spec.output_dir == "outputs"
    assert spec.augment.source.dir == "mirror" and spec.augment.source.format == "idx"


def test_yaml_errors_name_the_file(tmp_path):
    job = tmp_path / "broken.yaml"
    job.write_text("data: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_job_spec(job)
    job.write_text("- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_job_spec(job)
