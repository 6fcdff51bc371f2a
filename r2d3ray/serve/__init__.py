"""The reward plane: reward models as a Ray Serve application, reachable by handle and by HTTP.

- `deployments`: `RewardServer` (one deployment per reward; batched scoring with gradients, health
  check), `build_app`, `deploy_rewards` (deploy or reuse the app by name), the numpy wire format.
- `client`: `ServedRewards` (trainer side: one `ray.put`, fan-out to the deployments, retries) and
  `LocalRewards` (the same interface in-process), both answering a `PendingRewards` with a
  `RewardAnswer` (r2d3ray/rewards/combiner.py).
- `http`: the FastAPI ingress, POST /rewards/{name} with JSON + base64 .npy or PNG.
- `launch`: `serve_main`, behind `r2d3ray serve` and jobs/serve_rewards.py.
"""

from r2d3ray.serve.client import LocalRewards, PendingRewards, RewardPlaneError, ServedRewards
from r2d3ray.serve.deployments import RewardServer, build_app, deploy_rewards
from r2d3ray.serve.launch import serve_main

__all__ = [
    "LocalRewards",
    "PendingRewards",
    "RewardPlaneError",
    "RewardServer",
    "ServedRewards",
    "build_app",
    "deploy_rewards",
    "serve_main",
]
