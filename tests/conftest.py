"""Shared test settings.

Tests run small tensors; one torch thread per process avoids the two cores fighting over
intra-op parallelism while Ray workers and replicas run beside the test process.
"""

import os

import pytest
import torch

torch.set_num_threads(1)  # for module fixtures too, which run before the per-test one below
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def no_inherited_mlflow_store(monkeypatch):
    """Each test starts without MLFLOW_TRACKING_URI. ``mlflow.set_tracking_uri`` exports it to the
    environment, so without this a test that tracked a run would send the next test's runs (and
    those of the Ray workers it starts) to its store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs with one intra-op thread, also after code under test changed it (pretraining's
    num_threads, inference workers): on a busy 2-core machine a second thread only adds
    synchronisation, which costs tiny models up to ~40x."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
