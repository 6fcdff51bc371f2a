"""`r2d3ray serve`: bring the reward plane up on a Ray cluster, or on a local one.

    serve_main("configs/rewards_toy.yaml", [], address="auto")    # a running cluster: deploy, return
    serve_main("configs/rewards_toy.yaml", [], address="local")   # a local cluster: deploy, block until Ctrl-C

On a cluster the app is detached: it stays up after this process exits, for the trainers and
other jobs that reach it by name (Serve handles) or over HTTP. A local cluster lives only as long
as this process, so the call blocks while the app serves. An app already running under the
configured name is reused, not restarted, when it serves what the config names; otherwise this
command, the app's owner, updates it (training jobs never do: they stop and name the difference).
"""

from __future__ import annotations

import sys
import time


def connect(address: str) -> bool:
    """Connect to Ray: "auto" a running cluster ($RAY_ADDRESS or this machine's), "local" a new
    cluster in this process, anything else a cluster address such as "ray://head:10001".
    Returns True when this process started the cluster (it ends with the process)."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local")
        return True
    ray.init(address=address)
    return False


def endpoints(cfg) -> list[str]:
    """Lines telling other jobs how to reach the app."""
    lines = [f"  handle: serve.get_deployment_handle({d.name!r}, app_name={cfg.app_name!r})" for d in cfg.deployments]
    if cfg.http.enabled:
        base = f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
        names = "|".join(d.name for d in cfg.deployments)
        lines.append(f"  HTTP:   POST {base}/rewards/{{{names}}}  (schema: {base}/docs)")
    return lines


def serve_main(config_path: str, overrides: list[str] | None = None, address: str = "auto") -> int:
    """Deploy (or reuse) the reward app of `config_path`; see the module docstring. Returns an exit code.

    Bad configs raise ConfigError (a ValueError) naming the key; no reachable cluster prints a
    one-line error and returns 2.
    """
    from ray import serve

    from r2d3ray.config import load_reward_app_config
    from r2d3ray.serve.deployments import deploy_rewards

    cfg = load_reward_app_config(config_path, overrides)
    try:
        local = connect(address)
    except ConnectionError as err:
        print(f"error: no Ray cluster at address {address!r} ({err}); start one with `ray start --head` "
              "or pass --address local to run one in this process", file=sys.stderr)
        return 2
    deployed = deploy_rewards(cfg, owner=True)  # the serve job owns the app: it may update it
    names = ", ".join(d.name for d in cfg.deployments)
    print(f"reward app {cfg.app_name!r} {'deployed' if deployed else 'already running, reused'}: {names}")
    print("\n".join(endpoints(cfg)))
    if not local:
        print(f"The app stays up on the cluster; remove it with serve.delete({cfg.app_name!r}).")
        return 0
    print("Serving on a local Ray cluster that ends with this process; press Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the reward app")
        serve.shutdown()
    return 0
