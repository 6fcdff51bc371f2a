"""The cluster rehearsal (benchmarks/cluster_rehearsal.py) in its short form, and the reward app's
placement by custom resources that it relies on.

The rehearsal runs in a subprocess: it starts its own three-node cluster (its own temporary
directory and ports) and its own MLflow server, and tears down only their processes, so a Ray
instance of this test process or of another test is never touched, and this process is not left
connected to a cluster other tests do not expect.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from r2d3ray.config import RewardAppConfig
from r2d3ray.serve.deployments import build_app

REPO = Path(__file__).resolve().parents[1]


def test_reward_deployment_resources_reach_the_replicas_actor_options():
    cfg = RewardAppConfig.model_validate({
        "deployments": [
            {"name": "color_match", "reward": "color_match", "num_cpus": 0, "resources": {"reward_node": 0.01}},
            {"name": "dnc", "reward": "dnc", "num_gpus": 0.5},
        ],
        "http": {"enabled": False},
    })
    ingress = build_app(cfg)._bound_deployment
    rewards = ingress.init_args[1]  # the ingress is bound to (limits, {name: reward app}, token, fingerprint)
    options = {name: app._bound_deployment.ray_actor_options for name, app in rewards.items()}
    assert options["color_match"]["resources"] == {"reward_node": 0.01} and options["color_match"]["num_cpus"] == 0
    assert options["dnc"]["resources"] == {} and options["dnc"]["num_gpus"] == 0.5


@pytest.mark.slow
def test_quick_cluster_rehearsal_passes_every_check(tmp_path):
    out = tmp_path / "rehearsal.json"
    rehearsal = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "cluster_rehearsal.py"), "--quick", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # A few minutes on an idle machine; much longer on a loaded one.
        output, _ = rehearsal.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        rehearsal.send_signal(signal.SIGINT)  # the rehearsal then tears its cluster and server down
        output, _ = rehearsal.communicate(timeout=300)
    assert out.is_file(), output[-8000:]
    result = json.loads(out.read_text())
    failed = [check for check in result["checks"] if not check["ok"]]
    assert rehearsal.returncode == 0 and not failed, f"{failed}\n{output[-8000:]}"
    names = " | ".join(check["name"] for check in result["checks"])
    for stage in ("reward-plane job", "every reward replica on the reward node", "reward request between nodes",
                  "reward replica killed mid-stream", "trainer node stopped mid-run",
                  "rehearsal-nabla resumed from its last checkpoint", "rehearsal-nft resumed from its last checkpoint",
                  "app answers by handle", "app answers over HTTP", "MLflow server holds one run rehearsal-nabla",
                  "MLflow server holds one run rehearsal-nft", "cluster and MLflow server torn down"):
        assert stage in names, f"the rehearsal did not check {stage!r}: {names}"
    figures = result["figures"]
    assert figures["requests_lost"] == 0 and figures["stream_requests"] > 0
    assert figures["epochs_redone"] <= 1  # no finished epoch lost beyond the checkpoint interval (1 epoch)
    assert figures["request_cross_node_p50_ms"] > figures["request_copy_floor_ms"] > 0
