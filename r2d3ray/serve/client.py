"""What a trainer uses to ask for rewards and reward gradients: the reward plane's client side.

    plane = ServedRewards("rewards", RewardCombiner({"hps": 1.0, "dnc": 0.5}, needs=...))
    pending = plane.submit(views, prompts, with_grad=True)   # returns at once; requests are in flight
    ...                                                      # the trainer keeps computing
    answer = pending.result()                                # RewardAnswer: rewards, finite, grads, ...

`views` holds the images (B, V, 3, H, W) and the extras the rewards need. The combiner picks the
views to score (and adds the scoring noise) before anything is sent; one `ray.put` of them goes,
by reference, to every reward's deployment, and the per-view values and gradients that come back
are weighted and aggregated by the same combiner, on the images' device. A request whose replica
dies, that times out (it is cancelled first), or that a full queue turns away (back-pressure) is
re-sent after an exponential backoff with jitter, for as long as the retry budget lasts, which
should outlast a GPU reward replica's restart; past it the attempt ends with RewardPlaneError
naming the reward and its deadlines, and Ray Train's restart takes over. A request the reward
rejects (bad input) fails at once with ValueError.

`LocalRewards` is the same plane with the rewards in this process (for tests, benchmarks, and a
single-machine run without Serve): its requests have their answers before `submit` returns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)

from r2d3ray.errors import UserError
from r2d3ray.retry import backoff_s
from r2d3ray.rewards.base import RewardOutput
from r2d3ray.rewards.combiner import CombinedReward, RewardAnswer, RewardCombiner, ViewSelection
from r2d3ray.serve.wire import GRAD_DTYPES, decode_answer, encode_views, object_store_anchor

# Failures of the plane, not of the request: another attempt (on another or a restarted replica,
# or once the queue drains) can succeed. A reward's own error (RayTaskError) is deterministic and
# is not retried.
TRANSIENT_ERRORS = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError,
                    TimeoutError)


class RewardPlaneError(UserError, RuntimeError):
    """The reward plane could not answer (app missing, retries exhausted); names the reward."""


class PendingRewards:
    """One reward request for B objects; `result()` waits for every reward's answer and combines
    them into a `RewardAnswer` (computed once: later calls return the same answer).

    attempts: {reward name: number of times its request was sent} (in-process: 1 each).
    """

    def __init__(self, plane: ServedRewards | LocalRewards, selection: ViewSelection, with_grad: bool,
                 outputs: Mapping[str, RewardOutput] | None = None, responses: Mapping | None = None,
                 args: tuple = ()):
        self._plane, self._selection, self._with_grad = plane, selection, with_grad
        self._outputs = dict(outputs or {})  # {reward: RewardOutput} answered so far
        self._responses = dict(responses or {})  # {reward: DeploymentResponse} still awaited
        self._args = args  # the handle call's arguments, to re-send a failed attempt
        self.attempts = {name: 1 for name in plane.combiner.weights}
        self._sent = time.monotonic()
        self._answer: RewardAnswer | None = None

    def result(self) -> RewardAnswer:
        if self._answer is None:
            start = time.perf_counter()
            device = self._selection.images.device
            for name, response in list(self._responses.items()):
                self._outputs[name] = decode_answer(self._await(name, response), self._args[-1], device)
                del self._responses[name]
            outputs = {name: self._outputs[name] for name in self._plane.combiner.weights}  # the config's order
            self._answer = self._plane.combiner.combine(self._selection, outputs, self._with_grad)
            self._outputs, self._args = {}, ()  # the received buffers and the request go now
            self._plane.wait_seconds += time.perf_counter() - start
        return self._answer

    def _await(self, name: str, response) -> dict:
        """One reward's wire answer, re-sending its request after transient failures."""
        plane = self._plane
        while True:
            try:
                return response.result(timeout_s=plane.timeout_s)
            except TRANSIENT_ERRORS as err:
                if isinstance(err, TimeoutError):
                    response.cancel()  # not left running beside its replacement
                wait = backoff_s(plane.backoff_s, self.attempts[name])  # jittered: ranks that lost a replica spread out
                if time.monotonic() + wait - self._sent > plane.retry_budget_s:
                    last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
                    raise RewardPlaneError(
                        f"reward {name!r} of app {plane.app_name!r} did not answer within its retry budget of "
                        f"{plane.retry_budget_s:g} s ({self.attempts[name]} attempts of at most "
                        f"{plane.timeout_s:g} s each; rewards.request_timeout_s, rewards.retry_budget_s); "
                        f"last error: {type(err).__name__}: {last}"
                    ) from err
                time.sleep(wait)
                self.attempts[name] += 1
                response = plane.handles[name].score.remote(*self._args)
            except RayTaskError as err:
                reason = str(err).strip().splitlines()[-1]  # the replica's traceback ends with the reason
                if isinstance(err, ValueError):  # the request itself is bad: retrying cannot help
                    raise ValueError(f"reward {name!r}: {reason}") from None
                raise RewardPlaneError(f"reward {name!r} of app {plane.app_name!r} failed: {reason}") from err


def _select(combiner: RewardCombiner, views: Mapping[str, torch.Tensor], prompts: list[str]) -> ViewSelection:
    """views: images (B, V, 3, H, W) plus the extras the rewards need (alphas, depths, normals)."""
    extras = {k: v.detach() for k, v in views.items() if k != "images"}
    return combiner.select(views["images"].detach(), list(prompts), extras)


class ServedRewards:
    """The reward plane on the Serve app `app_name`: one deployment per name in `combiner.weights`.

    timeout_s bounds each attempt; a failed attempt is re-sent after about backoff_s, 2·backoff_s,
    4·backoff_s, ... seconds (at most 30, jittered) while retry_budget_s since the request was
    first sent lasts. grad_dtype is what gradients travel as. `wait_seconds` adds up the time the
    trainer spent blocked on the plane (sending, and waiting for answers): the part of reward
    compute that did not overlap with training.
    """

    def __init__(self, app_name: str, combiner: RewardCombiner, timeout_s: float = 300.0,
                 retry_budget_s: float = 900.0, backoff_s: float = 1.0, grad_dtype: str = "float32"):
        from ray import serve

        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype {grad_dtype!r} is not one of {GRAD_DTYPES}")
        self.app_name, self.combiner = app_name, combiner
        self.timeout_s, self.retry_budget_s, self.backoff_s = timeout_s, retry_budget_s, backoff_s
        self.grad_dtype = grad_dtype
        self.wait_seconds = 0.0
        self._anchor = object_store_anchor()
        try:
            # By reference: the images' ObjectRef reaches each replica as it is, which reads the one
            # stored copy in place (by value, Serve would fetch and re-send the images per reward).
            self.handles = {name: serve.get_deployment_handle(name, app_name=app_name).options(_by_reference=True)
                            for name in combiner.weights}
        except (RayServeException, KeyError) as err:  # no Serve running; no such app or deployment
            raise RewardPlaneError(
                f"cannot reach the reward deployments {sorted(combiner.weights)} of Serve app {app_name!r} ({err}); "
                "deploy it first, e.g. `r2d3ray serve --config configs/rewards_toy.yaml`"
            ) from None

    def submit(self, views: Mapping[str, torch.Tensor], prompts: list[str], with_grad: bool = True) -> PendingRewards:
        """views: images (B, V, 3, H, W) in [0, 1] plus the extras the rewards need. The selected views
        are put in the object store once and sent to every reward; the answer is on the images' device."""
        import ray

        start = time.perf_counter()
        selection = _select(self.combiner, views, prompts)
        images_ref = ray.put(encode_views(selection.images))
        extras = {k: encode_views(v) for k, v in selection.extras.items()}
        extras_ref = ray.put(extras) if extras else {}  # nothing to share: no object-store round trip
        args = (images_ref, list(prompts), extras_ref, with_grad, self.grad_dtype)
        responses = {name: handle.score.remote(*args) for name, handle in self.handles.items()}
        self.wait_seconds += time.perf_counter() - start
        return PendingRewards(self, selection, with_grad, responses=responses, args=args)


class LocalRewards:
    """The reward plane in this process: `reward`'s models score in `submit`, whose request then has
    its answer; the same interface and answers as `ServedRewards`. `wait_seconds`: all of it."""

    def __init__(self, reward: CombinedReward):
        self.reward, self.combiner = reward, reward.combiner
        self.wait_seconds = 0.0

    def submit(self, views: Mapping[str, torch.Tensor], prompts: list[str], with_grad: bool = True) -> PendingRewards:
        """views: images (B, V, 3, H, W) in [0, 1] plus the extras the rewards need."""
        start = time.perf_counter()
        selection = _select(self.combiner, views, prompts)
        outputs = self.reward.score_selection(selection, list(prompts), with_grad)
        self.wait_seconds += time.perf_counter() - start
        return PendingRewards(self, selection, with_grad, outputs=outputs)
