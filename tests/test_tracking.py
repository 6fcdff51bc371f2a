"""The MLflow tracker: runs land in the run config's experiment, and a resume continues the same run."""

from __future__ import annotations

import mlflow

from r2d3ray.tracking import Tracker


def test_runs_land_in_the_trackers_experiment_whatever_mlflow_has_active(tmp_path):
    """Two jobs creating the experiment at once: the loser gets it back from mlflow.set_experiment
    without MLflow making it active. Its run must still go into that experiment, and resume there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "shared-experiment")
    mlflow.set_experiment("something-else")  # what MLflow has active is not the tracker's experiment
    run_id = tracker.start("run-a")
    tracker.log_metrics({"reward": 1.0}, step=1)
    tracker.end()

    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.experiment_id == tracker.experiment_id

    resumed = Tracker(uri, "shared-experiment")
    mlflow.set_experiment("something-else")
    assert resumed.start("run-a") == run_id  # found by name in its experiment, not a duplicate
    assert resumed.last_logged_step == -1  # no 'epoch' metric logged here
    resumed.log_metrics({"reward": 2.0}, step=2)
    resumed.end()
    runs = client.search_runs([tracker.experiment_id], "tags.mlflow.runName = 'run-a'")
    assert len(runs) == 1 and [m.value for m in client.get_metric_history(run_id, "reward")] == [1.0, 2.0]
