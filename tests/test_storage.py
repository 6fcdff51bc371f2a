"""Where a run keeps its checkpoints and MLflow store: URIs reach Ray unchanged, and a submitted job
refuses locations inside its temporary working directory."""

from pathlib import Path

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from r2d3ray.config import build_config
from r2d3ray.train.launch import STORAGE_ENV, LaunchError, check_durable_locations, storage_path


@pytest.fixture(autouse=True)
def no_storage_env(monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)


def test_storage_defaults_beside_the_outputs_and_uris_stay_uris(tmp_path, monkeypatch):
    assert storage_path(build_config({"output_dir": str(tmp_path)})) == str(tmp_path / "ray_results")
    uri = "s3://bucket/r2d3ray/checkpoints"
    assert storage_path(build_config({"training": {"storage_path": uri}})) == uri
    monkeypatch.setenv(STORAGE_ENV, "gs://other/place")
    assert storage_path(build_config({})) == "gs://other/place"
    assert storage_path(build_config({"training": {"storage_path": uri}})) == uri  # the config wins
    monkeypatch.chdir(tmp_path)
    assert storage_path(build_config({"training": {"storage_path": "ckpts"}})) == str(Path(tmp_path / "ckpts").resolve())


def test_a_submitted_job_refuses_relative_locations(monkeypatch):
    check_durable_locations(build_config({"output_dir": "outputs"}))  # fine outside a job
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")
    with pytest.raises(LaunchError, match="output_dir is the relative path 'outputs'.*--set output_dir=/shared"):
        check_durable_locations(build_config({"output_dir": "outputs"}))
    with pytest.raises(LaunchError, match="training.storage_path is the relative path 'ckpts'"):
        check_durable_locations(build_config({"output_dir": "/shared/r2d3ray", "training": {"storage_path": "ckpts"}}))
    check_durable_locations(build_config({"output_dir": "/shared/r2d3ray", "training": {"storage_path": "s3://b/p"}}))
