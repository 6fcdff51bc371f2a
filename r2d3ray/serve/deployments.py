"""The reward plane: one Ray Serve deployment per reward model, plus an HTTP ingress.

The wire format between a trainer and a reward deployment is r2d3ray/serve/wire.py's.

Concurrent requests from several trainer ranks are merged into one forward when their view count,
resolution and extras agree, which is where a GPU reward model earns its throughput: whenever the
reward's device frees, every request waiting then (up to `max_batch_size`) goes in the next batch.
A request that fails (bad input, a reward error) fails alone, not the ones merged with it.
The queue is `RewardServer`'s own rather than `@serve.batch`'s because `@serve.batch` closes a batch
`batch_wait_timeout_s` after its first request arrives, not when the device frees: requests that
queue behind a running forward then run one by one (seen with two trainer workers on one replica:
every batch held a single request).

A reward registered outside r2d3ray is named `package.module:name` in the config; the replica
imports the module first so that its `@register_reward("name")` runs there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import itertools
import json
import logging
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from ray import serve

from r2d3ray.config import RewardAppConfig
from r2d3ray.errors import UserError
from r2d3ray.retry import backoff_s
from r2d3ray.serve.wire import GRAD_DTYPES, encode_answer, object_store_anchor

# Rewards compute in a worker thread, and glibc gives each thread an arena that hands freed
# memory back to the OS at once: every request then page-faults its large tensors in anew
# (measured: 10-18 thousand faults, 30-80 ms, a request of 16 views of 256^2 on a VM CPU). One
# arena that keeps up to 256 MiB free and serves blocks up to 32 MiB (glibc's maximum) behaves as
# the in-process caller's main thread does. Other C libraries ignore these variables.
REPLICA_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}
logger = logging.getLogger(__name__)
LOCK_NAMESPACE = "r2d3ray"  # named actors are per namespace, and every job has its own by default


class RewardServer:
    """Serves one reward model: batched scoring with gradients, and a real health check."""

    def __init__(self, reward: str, kwargs: dict[str, Any], max_batch_size: int, batch_wait_timeout_s: float):
        from r2d3ray.rewards.registry import build_reward

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_reward(reward, **kwargs).to(self.device).eval()
        self._anchor = object_store_anchor()
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._waiting: list[tuple[tuple, asyncio.Future]] = []  # (request, its answer), oldest first
        self._drain_task: asyncio.Task | None = None  # scoring the queue until it is empty
        # Images arrive as read-only views of the object store; torch only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    async def score(self, images, prompts, extras=None, with_grad=False, grad_dtype="float32") -> dict:
        """One request (the wire format in the module docstring); merged with others by `_drain`."""
        images, extras = np.asarray(images), dict(extras or {})
        # Checked per request before merging: a prompt count that is off in one request could
        # otherwise be balanced by another request's in the merged batch.
        if images.ndim != 5 or images.shape[2] != 3 or images.dtype.kind != "f":
            raise ValueError(f"images must be a (B, V, 3, H, W) float array, got {images.dtype} {list(images.shape)}")
        if not isinstance(prompts, (list, tuple)) or len(prompts) != images.shape[0]:
            raise ValueError(f"prompts must be a list of B={images.shape[0]} strings (one per object), got {prompts!r}")
        for key, value in extras.items():
            value = np.asarray(value)
            if value.ndim != 5 or value.shape[:2] != images.shape[:2] or value.shape[3:] != images.shape[3:]:
                b, v, _, h, w = images.shape
                raise ValueError(f"extras[{key!r}] must have shape ({b}, {v}, C, {h}, {w}), got {list(value.shape)}")
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype {grad_dtype!r} is not one of {GRAD_DTYPES}")
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(((images, list(prompts), extras, bool(with_grad), grad_dtype), answer))
        # A finished task saw the queue empty: it returns without awaiting after its last check.
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain())  # held: the loop keeps only weak references
        result = await answer
        if isinstance(result, Exception):  # this request's own failure, not its batch's
            raise result
        return result

    async def _drain(self) -> None:
        """Score the waiting requests, a batch at a time, until none is left."""
        await asyncio.sleep(self.batch_wait_timeout_s)  # an idle replica waits briefly for company
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
            try:
                results = await self._score_batch(*map(list, zip(*(request for request, _ in batch))))
            except Exception as err:  # not expected (_score_batch returns errors), but never leave a caller hanging
                results = [err] * len(batch)
            for (_, answer), result in zip(batch, results):
                if not answer.done():  # a caller that gave up has cancelled its future
                    answer.set_result(result)

    def _score_group(self, images, prompts, extras, with_grad, grad_dtype) -> list[dict]:
        """Score requests that share (V, H, W) and extras as one batch; split the results back."""
        sizes = [len(p) for p in prompts]

        def joined(arrays: list[np.ndarray]) -> torch.Tensor:
            # (sum B, ...) float32 on the reward's device. One request (the usual case) is used in
            # place: no copy of the shared-memory view on a CPU replica, one transfer to a GPU.
            if len(arrays) == 1:
                return torch.from_numpy(arrays[0]).to(self.device, torch.float32)
            # Several: each copied (and converted) once, straight into its rows of the batch on the
            # device; no merged copy on the host first.
            batch = torch.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), dtype=torch.float32,
                                device=self.device)
            for rows, array in zip(torch.split(batch, [len(a) for a in arrays]), arrays):
                rows.copy_(torch.from_numpy(array))
            return batch

        batch = joined(images)  # (sum B, V, 3, H, W)
        extra_batch = {k: joined([np.asarray(e[k]) for e in extras]) for k in extras[0]}
        out = self.model.score(batch, [p for ps in prompts for p in ps], extra_batch, with_grad=any(with_grad))
        # Each request's rows of the batch's answer, gradients converted to its dtype on the device.
        ends = list(itertools.accumulate(sizes))
        return [encode_answer(out, slice(end - size, end), grad_wanted, dtype)
                for size, end, grad_wanted, dtype in zip(sizes, ends, with_grad, grad_dtype)]

    async def _score_batch(self, images: list, prompts: list, extras: list, with_grad: list, grad_dtype: list) -> list:
        """One result (dict or Exception) per request; requests are grouped by what can be merged."""
        groups: dict[tuple, list[int]] = {}
        for i, (img, ext) in enumerate(zip(images, extras)):
            groups.setdefault((img.shape[1:], tuple(sorted(ext))), []).append(i)
        results: list[Any] = [None] * len(images)

        async def run(members: list[int]) -> list:
            pick = lambda seq: [seq[i] for i in members]  # noqa: E731
            try:
                # Off the event loop, so health checks and new requests are not starved meanwhile.
                return await asyncio.to_thread(
                    self._score_group, pick(images), pick(prompts), pick(extras), pick(with_grad), pick(grad_dtype)
                )
            except Exception as err:
                return [err] * len(members)

        for members in groups.values():
            group = await run(members)
            if len(members) > 1 and isinstance(group[0], Exception):
                # Re-run one by one, so a bad request fails alone and not the others merged with it.
                group = [(await run([i]))[0] for i in members]
            for i, result in zip(members, group):
                results[i] = result
        return results

    async def check_health(self) -> None:
        """Serve calls this periodically; a replica whose reward no longer scores is restarted."""
        from r2d3ray.rewards.base import EXTRA_CHANNELS

        probe = torch.full((1, 1, 3, 16, 16), 0.5, device=self.device)
        extras = {k: torch.ones((1, 1, EXTRA_CHANNELS[k], 16, 16), device=self.device) for k in self.model.needs}
        values = await asyncio.to_thread(lambda: self.model.score(probe, ["a red cube"], extras).values)
        if tuple(values.shape) != (1, 1):
            raise RuntimeError(f"reward health probe returned shape {tuple(values.shape)}, expected (1, 1)")


def build_app(cfg: RewardAppConfig):
    """The Serve application: every reward deployment, behind the HTTP ingress."""
    from r2d3ray.serve.http import RewardsHTTP, http_token, token_digest

    rewards = {}
    for d in cfg.deployments:
        scaling = (
            {"autoscaling_config": d.autoscaling.model_dump()} if d.autoscaling else {"num_replicas": d.num_replicas}
        )
        rewards[d.name] = serve.deployment(RewardServer).options(
            name=d.name,
            # Serve merges these env_vars into the job's runtime_env (working_dir and all stay).
            ray_actor_options={
                "num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": d.resources,
                "runtime_env": {"env_vars": REPLICA_ENV},
            },
            max_ongoing_requests=d.max_ongoing_requests,
            max_queued_requests=d.max_queued_requests,
            health_check_period_s=d.health_check_period_s,
            health_check_timeout_s=d.health_check_timeout_s,
            logging_config={"enable_access_log": d.access_log},
            **scaling,
        ).bind(d.reward, d.kwargs, d.max_batch_size, d.batch_wait_timeout_s)
    token = http_token(cfg.http.model_dump()) if cfg.http.enabled else None
    # The ingress only decodes and routes; it reserves no CPU so that it never blocks the rewards.
    return RewardsHTTP.options(name="http_ingress", ray_actor_options={"num_cpus": 0},
                               logging_config={"enable_access_log": cfg.http.access_log}).bind(
        cfg.http.model_dump(), rewards, token_digest(token) if token else None, app_fingerprint(cfg)
    )


def app_fingerprint(cfg: RewardAppConfig) -> dict:
    """What an app serves, as jobs compare it: per deployment the reward, its class, its kwargs
    (checkpoint paths included) and a hash of the source of the module defining it (the code
    version: a job's uploaded copy of the code has no git history)."""
    from r2d3ray.rewards.registry import reward_class

    served = {}
    for d in cfg.deployments:
        cls = reward_class(d.reward)
        source = inspect.getsource(sys.modules[cls.__module__])
        served[d.name] = {"reward": d.reward, "class": f"{cls.__module__}.{cls.__qualname__}",
                          "kwargs": json.loads(json.dumps(d.kwargs, sort_keys=True, default=str)),
                          "code": hashlib.sha256(source.encode()).hexdigest()[:12]}
    return {"deployments": served}


def fingerprint_difference(running: dict, wanted: dict) -> list[str]:
    """Human-readable differences between a running app's fingerprint and a config's."""
    have, want = running.get("deployments", {}), wanted["deployments"]
    lines = [f"deployment {n!r} is not served" for n in sorted(set(want) - set(have))]
    for name in sorted(set(want) & set(have)):
        for key in ("reward", "class", "kwargs", "code"):
            if have[name].get(key) != want[name][key]:
                what = "code version" if key == "code" else key
                lines.append(f"deployment {name!r}: {what} {have[name].get(key)!r} running, {want[name][key]!r} configured")
    return lines


def running_fingerprint(app_name: str) -> dict:
    return serve.get_app_handle(app_name).fingerprint.remote().result(timeout_s=60)


def app_status(app_name: str) -> str | None:
    """The Serve status of an application ("RUNNING", "DEPLOYING", ...), None when absent."""
    app = serve.status().applications.get(app_name)
    return None if app is None else str(app.status.value)


class RewardAppMismatch(UserError, RuntimeError):
    """A running reward app serves something other than the job's reward config."""


def deploy_rewards(cfg: RewardAppConfig, reuse: bool = True, timeout_s: float = 600.0, owner: bool = False) -> bool:
    """Deploy the reward app under `cfg.app_name`, or attach to the one running under that name.

    Needs a connected Ray. Returns True when it deployed, False when it reused a running app.
    The app is detached: it outlives this driver while the cluster lives, so other jobs reach it
    by name (handles) or over HTTP. A running app is reused only when its fingerprint
    (`app_fingerprint`) equals the config's; otherwise a training job (not the `owner`) stops with
    `RewardAppMismatch` naming the difference, because redeploying would restart replicas other
    jobs are using. The owner (`r2d3ray serve`, the serve job) updates the app instead. Two jobs
    that find no app at once do not both deploy: the one holding the app's deploy lock does, the
    other waits for it and attaches. HTTP host and port apply only when this call starts Serve on
    the cluster; a running Serve keeps its own.
    """
    deadline = time.monotonic() + timeout_s
    wanted = app_fingerprint(cfg)
    with _deploy_lock(cfg.app_name, deadline):
        while reuse and app_status(cfg.app_name) == "DEPLOYING" and time.monotonic() < deadline:
            time.sleep(1.0)  # its owner is updating it: wait rather than restart it
        if reuse and app_status(cfg.app_name) == "RUNNING":
            difference = fingerprint_difference(running_fingerprint(cfg.app_name), wanted)
            if not difference:
                logger.info("reusing the running reward app %r", cfg.app_name)
                return False
            if not owner:
                raise RewardAppMismatch(
                    f"the running reward app {cfg.app_name!r} serves something else than {'; '.join(difference)}; "
                    "attach to it with the same reward app config, or deploy yours under another name "
                    "(app_name in the reward app config and rewards.app_name in the run config)")
            logger.warning("updating the reward app %r: %s", cfg.app_name, "; ".join(difference))
        _start_serve(cfg, deadline)
        serve.run(
            build_app(cfg),
            name=cfg.app_name,
            route_prefix=cfg.http.route_prefix if cfg.http.enabled else None,
            blocking=False,
        )
        return True


def _start_serve(cfg: RewardAppConfig, deadline: float) -> None:
    """``serve.start``, repeated while a proxy dies or stays unready during start-up. On a loaded node
    the Serve controller replaces a proxy that was slow to answer its readiness checks, and the
    first call, which waits for the old proxy, fails; the next one finds the controller running."""
    import ray

    attempt = 0
    while True:
        attempt += 1
        try:
            serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
            return
        except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError) as err:
            wait = backoff_s(2.0, attempt)
            if time.monotonic() + wait > deadline:
                raise
            logger.warning("starting Serve for reward app %r: %s; trying again in %.1f s",
                           cfg.app_name, str(err).splitlines()[0], wait)
            time.sleep(wait)


@contextlib.contextmanager
def _deploy_lock(app_name: str, deadline: float):
    """Held while this driver checks and deploys the app: a named actor only one driver can create.
    It belongs to the driver that made it, so a driver that dies mid-deploy releases it too."""
    import ray

    @ray.remote(num_cpus=0)
    class DeployLock:
        pass

    name = f"r2d3ray_deploy_lock_{app_name}"
    while True:
        try:
            lock = DeployLock.options(name=name, namespace=LOCK_NAMESPACE).remote()
            ray.get(lock.__ray_ready__.remote())
            break
        except ValueError:  # the name is taken: another driver is deploying
            if time.monotonic() > deadline:
                raise TimeoutError(f"another job held the deploy lock of reward app {app_name!r} past the deadline")
            time.sleep(1.0)
    try:
        yield
    finally:
        ray.kill(lock)
