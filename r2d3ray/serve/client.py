"""What a trainer uses to ask the reward plane for rewards and reward gradients.

    client = ServedRewards(app_name="rewards", terms=[("hps", 1.0), ("dnc", 0.5)])
    pending = client.submit(images, prompts, extras)     # returns at once; requests are in flight
    ...                                                  # the trainer keeps computing
    result = pending.result()                            # RewardResult: values, grads, finite

One `ray.put` of the image batch fans out to every configured reward through DeploymentHandles,
and values and gradients come back as numpy arrays. A request whose replica dies, that times out
(it is cancelled first), or that a full queue turns away (back-pressure) is re-sent after an
exponential backoff with jitter, for as long as the retry budget lasts, which should outlast a GPU
reward replica's restart; past it the attempt ends with RewardPlaneError naming the reward and
its deadlines, and Ray Train's restart takes over. A request the reward rejects (bad input)
fails at once with ValueError. `LocalRewards` has the same interface with the rewards
in this process (for tests, benchmarks, and a single-machine run without Serve).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)

from r2d3ray.errors import UserError
from r2d3ray.rewards.base import RewardOutput
from r2d3ray.serve.wire import GRAD_DTYPES, decode_grad, object_store_anchor

# Failures of the plane, not of the request: another attempt (on another or a restarted replica,
# or once the queue drains) can succeed. A reward's own error (RayTaskError) is deterministic and
# is not retried.
TRANSIENT_ERRORS = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError,
                    TimeoutError)
MAX_BACKOFF_S = 30.0


class RewardPlaneError(UserError, RuntimeError):
    """The reward plane could not answer (app missing, retries exhausted); names the reward."""


@dataclass
class RewardResult:
    """Rewards of B objects x V views from every configured term.

    terms: {name: RewardOutput} each term's own answer, unweighted: values (B, V), grads
    (B, V, 3, H, W) of the sum of its values (None when not asked for), extra_grads.
    The properties are the weighted sums over terms; `finite` (B, V) is False where any term was
    NaN/Inf (those views have zero gradient and must not be trained on).
    """

    terms: dict[str, RewardOutput]
    weights: dict[str, float]

    @property
    def per_term(self) -> dict[str, torch.Tensor]:
        return {name: out.values for name, out in self.terms.items()}

    @property
    def values(self) -> torch.Tensor:
        return sum(self.weights[n] * out.values for n, out in self.terms.items())

    @property
    def grads(self) -> torch.Tensor | None:
        if any(out.grads is None for out in self.terms.values()):
            return None
        return sum(self.weights[n] * out.grads for n, out in self.terms.items())

    @property
    def extra_grads(self) -> dict[str, torch.Tensor]:
        summed: dict[str, torch.Tensor] = {}
        for name, out in self.terms.items():
            for key, grad in out.extra_grads.items():
                summed[key] = summed[key] + self.weights[name] * grad if key in summed else self.weights[name] * grad
        return summed

    @property
    def finite(self) -> torch.Tensor:
        return torch.stack([out.finite for out in self.terms.values()]).all(0)


def _decode(part: dict, grad_dtype: str, device: torch.device) -> RewardOutput:
    """One term's answer in the wire format of `RewardServer.score` -> a RewardOutput on ``device``
    (the images' device: the answers arrive as numpy arrays, on the CPU)."""
    grads = None if part["grads"] is None else decode_grad(part["grads"], grad_dtype).to(device)
    return RewardOutput(torch.from_numpy(np.array(part["values"], dtype=np.float32)).to(device), grads,
                        {k: decode_grad(a, grad_dtype).to(device) for k, a in part["extra_grads"].items()},
                        finite=torch.from_numpy(np.array(part["finite"], dtype=bool)).to(device))


class PendingRewards:
    """Requests in flight; `result()` waits for them, re-sending any whose replica failed.

    attempts: {term name: number of times its request was sent} once `result()` returned.
    """

    def __init__(self, client: ServedRewards, args: tuple, responses: dict, device: torch.device):
        self._client, self._args, self._responses, self._device = client, args, responses, device
        self.attempts = {name: 1 for name in responses}
        self._sent = time.monotonic()

    def result(self) -> RewardResult:
        client = self._client
        parts = {}
        for name, response in self._responses.items():
            while True:
                try:
                    parts[name] = response.result(timeout_s=client.timeout_s)
                    break
                except TRANSIENT_ERRORS as err:
                    if isinstance(err, TimeoutError):
                        response.cancel()  # not left running beside its replacement
                    # Full jitter: ranks that lost the same replica do not come back in step.
                    wait = random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, client.backoff_s * 2 ** (self.attempts[name] - 1))
                    if time.monotonic() + wait - self._sent > client.retry_budget_s:
                        raise RewardPlaneError(
                            f"reward {name!r} of app {client.app_name!r} did not answer within its retry budget of "
                            f"{client.retry_budget_s:g} s ({self.attempts[name]} attempts of at most "
                            f"{client.timeout_s:g} s each; rewards.request_timeout_s, rewards.retry_budget_s); "
                            f"last error: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                        ) from err
                    time.sleep(wait)
                    self.attempts[name] += 1
                    response = client.handles[name].score.remote(*self._args)
                except RayTaskError as err:
                    reason = str(err).strip().splitlines()[-1]  # the replica's traceback ends with the reason
                    if isinstance(err, ValueError):  # the request itself is bad: retrying cannot help
                        raise ValueError(f"reward {name!r}: {reason}") from None
                    raise RewardPlaneError(f"reward {name!r} of app {client.app_name!r} failed: {reason}") from err
        return RewardResult({name: _decode(part, self._args[-1], self._device) for name, part in parts.items()},
                            client.weights)


class ServedRewards:
    """Client of the reward Serve app. terms: (deployment name, weight) pairs.

    timeout_s bounds each attempt; a failed attempt is re-sent after about backoff_s, 2·backoff_s,
    4·backoff_s, ... seconds (at most 30, jittered) while retry_budget_s since the request was
    first sent lasts. grad_dtype is what gradients travel as.
    """

    def __init__(self, app_name: str, terms: list[tuple[str, float]], timeout_s: float = 300.0,
                 retry_budget_s: float = 900.0, backoff_s: float = 1.0, grad_dtype: str = "float32"):
        from ray import serve

        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype {grad_dtype!r} is not one of {GRAD_DTYPES}")
        if not terms:
            raise ValueError("terms is empty; give at least one (deployment name, weight) pair")
        self.app_name, self.timeout_s, self.retry_budget_s, self.backoff_s = app_name, timeout_s, retry_budget_s, backoff_s
        self.grad_dtype = grad_dtype
        self.weights = {name: float(weight) for name, weight in terms}
        self._anchor = object_store_anchor()
        try:
            self.handles = {name: serve.get_deployment_handle(name, app_name=app_name) for name in self.weights}
        except (RayServeException, KeyError) as err:  # no Serve running; no such app or deployment
            raise RewardPlaneError(
                f"cannot reach the reward deployments {sorted(self.weights)} of Serve app {app_name!r} ({err}); "
                "deploy it first, e.g. `r2d3ray serve --config configs/rewards_toy.yaml`"
            ) from None

    def submit(self, images: torch.Tensor, prompts: list[str], extras: dict[str, torch.Tensor] | None = None,
               with_grad: bool = True) -> PendingRewards:
        """images (B, V, 3, H, W) in [0, 1]; put once in the object store and sent to every term. The
        answers come back on the images' device."""
        import ray

        images_ref = ray.put(images.detach().float().cpu().contiguous().numpy())
        extras = {k: v.detach().float().cpu().contiguous().numpy() for k, v in (extras or {}).items()}
        extras_ref = ray.put(extras) if extras else {}  # nothing to share: no object-store round trip
        args = (images_ref, list(prompts), extras_ref, with_grad, self.grad_dtype)
        return PendingRewards(self, args, {n: h.score.remote(*args) for n, h in self.handles.items()}, images.device)


class _Done:
    def __init__(self, result: RewardResult):
        self._result = result

    def result(self) -> RewardResult:
        return self._result


class LocalRewards:
    """The same interface as ServedRewards with the reward models in this process.

    rewards: {name: (RewardModel, weight)}.
    """

    def __init__(self, rewards: dict[str, tuple[object, float]]):
        if not rewards:
            raise ValueError("rewards is empty; give at least one {name: (RewardModel, weight)}")
        self.rewards = rewards
        self.weights = {name: float(weight) for name, (_, weight) in rewards.items()}

    def submit(self, images: torch.Tensor, prompts: list[str], extras: dict[str, torch.Tensor] | None = None,
               with_grad: bool = True) -> _Done:
        terms = {name: model.score(images.detach(), prompts, extras, with_grad=with_grad)
                 for name, (model, _) in self.rewards.items()}
        return _Done(RewardResult(terms, self.weights))


class PendingObjective:
    """A reward request in flight; `result()` waits (timed) and aggregates it into per-object objectives."""

    def __init__(self, plane: RewardPlane, selection, pending, with_grad: bool):
        self._plane, self._selection, self._pending, self._with_grad = plane, selection, pending, with_grad

    def result(self):
        start = time.perf_counter()
        answer = self._pending.result()
        self._plane.wait_seconds += time.perf_counter() - start
        return self._plane.combiner.combine(self._selection, answer.terms, self._with_grad)


class RewardPlane:
    """What a trainer asks: views of B objects in, one objective per object (and its gradient) out.

    The config's view selection (k of V), scoring noise, weights and mean/max over views are the
    `RewardCombiner`'s, the same code in-process rewards use; the terms are scored by `client`
    (`ServedRewards` on the Serve plane, or `LocalRewards`). `wait_seconds` adds up the time the
    trainer spent blocked on the plane (sending, and waiting for answers): for served rewards the
    part of reward compute that did not overlap with training, in-process all of it.
    """

    def __init__(self, client, combiner):
        self.client, self.combiner = client, combiner
        self.wait_seconds = 0.0

    def submit(self, views: dict[str, torch.Tensor], prompts: list[str], with_grad: bool = True) -> PendingObjective:
        """views: images (B, V, 3, H, W) plus the extras the rewards need (alphas, depths, normals)."""
        extras = {k: v for k, v in views.items() if k != "images"}
        selection = self.combiner.select(views["images"].detach(), prompts, {k: v.detach() for k, v in extras.items()})
        start = time.perf_counter()  # in-process rewards compute here; served ones only put and send
        pending = self.client.submit(selection.images, prompts, selection.extras, with_grad=with_grad)
        self.wait_seconds += time.perf_counter() - start
        return PendingObjective(self, selection, pending, with_grad)
