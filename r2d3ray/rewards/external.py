"""Rewards scored by an HTTP service outside the reward plane: values only, no gradient.

Two common shapes of scoring service, each a registered reward:

``external_scorer``: a plain scorer endpoint. One POST per chunk of views (all B·V views by default)::

    POST <url>    {"prompts": ["a red cube", ...], "images": ["<base64 PNG>", ...]}
    200           {"scores": [0.73, ...]}                  one number per image, in the same order

Views go object-major (object 0's views first); each view carries its object's prompt. The three
field names are kwargs (``prompts_field``, ``images_field``, ``scores_field``).

``external_judge``: an OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, OpenAI, ...) judging each
view. One request per view, ``max_concurrency`` of them in flight::

    POST <base_url>/chat/completions
    {"model": <model>, "temperature": 0,
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": <prompt_template.format(prompt=<object's prompt>)>},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

The score is the first match of ``score_pattern`` (its first group, if it has one) in
``choices[0].message.content``, divided by ``max_score`` when given (a 1-10 judge becomes 0.1-1).

Both are value-only (``differentiable = False``): DiffusionNFT trains on them; Nabla-R2D3 and
reward backprop refuse them before a run starts. An API key is read from the environment variable
named by ``api_key_env`` where the reward runs (a Serve replica inherits the job's
``runtime_env`` env_vars) and sent as ``Authorization: Bearer <key>``; a config holds only the name.

Failures follow the reward plane's client (r2d3ray/serve/client.py): each attempt has a timeout
(``timeout_s``, httpx's connect/read/write limit); a transient failure (timeout, refused or dropped
connection, HTTP 408, 429 or 5xx) is re-sent after a jittered exponential backoff (``backoff_s``,
2·``backoff_s``, ... at most 30 s, or the server's Retry-After if longer) while ``retry_budget_s``
since the first attempt lasts. Any other 4xx and every bad answer (not JSON, a missing field, a
non-numeric score, the wrong number of scores) fail at once, as does an exhausted budget, with
``ExternalRewardError`` naming the reward, the server's URL and what was wrong. A judge answer with
no number in it can instead become NaN (``unparsable: nan``): that view is then flagged non-finite
and never trained on, as for any reward. Scores that are NaN/inf in a scorer's answer are kept and
flagged the same way.

The replica's health check scores one 16x16 probe view every ``health_check_period_s``, which is one
request to the service; set that period (and ``health_check_timeout_s`` above the retry budget)
in the reward app config.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx
import torch
from PIL import Image

from r2d3ray.errors import UserError
from r2d3ray.retry import backoff_s
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import register_reward

RETRIED_STATUS = frozenset({408, 429})  # and every 5xx: the server's state, not the request, is at fault
ERROR_BODY_CHARS = 300  # how much of a bad answer an error message quotes

DEFAULT_JUDGE_TEMPLATE = (
    'How well does this image show "{prompt}", and how good is it as a picture of a 3D object? '
    "Rate it from 1 (not at all) to 10 (perfectly). Answer with the number only."
)
DEFAULT_SCORE_PATTERN = r"[-+]?\d+(?:\.\d+)?"  # the first number in the answer


class ExternalRewardError(UserError, RuntimeError):
    """An external reward server gave no usable answer; the message names the reward and the server's URL."""


class ExternalRewardConfigError(UserError, ValueError):
    """An external reward's kwargs are wrong (URL, template, pattern, missing API key)."""


class _Transient(Exception):
    """A failure another attempt may not have (timeout, dropped connection, 5xx)."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Stopped(Exception):
    """Another request of the same batch failed for good: this one gives up too."""


def views_to_png(images: torch.Tensor) -> list[str]:
    """images (B, V, 3, H, W) in [0, 1] -> B·V base64 PNGs, object-major (object 0's views first)."""
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, V, 3, H, W)
    pixels = pixels.flatten(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B·V, H, W, 3), PIL's layout
    encoded = []
    for view in pixels:
        buffer = io.BytesIO()
        Image.fromarray(view).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def _check_url(reward: str, key: str, url: str) -> str:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ExternalRewardConfigError(
            f"{reward}: {key}={url!r} is not an http(s) URL; give the server's address, e.g. http://judge-host:8000"
            + ("/v1" if key == "base_url" else "/score"))
    return url


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + "...")


class ExternalReward(RewardModel):
    """Common part of the HTTP rewards: PNG encoding, the API key, bounded concurrency, retries.

    timeout_s: limit of each attempt (connect, each read, each write); retry_budget_s: how long
    after a request's first attempt it may still be re-sent; backoff_s: first wait between attempts;
    api_key_env: name of the environment variable holding the API key (None: no key sent);
    max_concurrency: requests in flight at once; headers: extra HTTP headers (no secrets: they
    go into the app's fingerprint).
    """

    differentiable = False

    def __init__(self, timeout_s: float = 60.0, retry_budget_s: float = 300.0, backoff_s: float = 1.0,
                 api_key_env: str | None = None, max_concurrency: int = 8, headers: dict[str, str] | None = None):
        super().__init__()
        for key, value in (("timeout_s", timeout_s), ("retry_budget_s", retry_budget_s), ("backoff_s", backoff_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ExternalRewardConfigError(f"{self.name}: {key}={value!r}; expected a number of seconds > 0")
        if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
            raise ExternalRewardConfigError(f"{self.name}: max_concurrency={max_concurrency!r}; expected an int >= 1")
        self.timeout_s, self.retry_budget_s, self.backoff_s = float(timeout_s), float(retry_budget_s), float(backoff_s)
        self.max_concurrency = max_concurrency
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ExternalRewardConfigError(
                    f"{self.name}: api_key_env names ${api_key_env}, which is not set where the reward runs; "
                    "export it there (for a Serve replica: the job's runtime_env env_vars), never in the config")
            self._headers["Authorization"] = f"Bearer {key}"
        self._client: httpx.Client | None = None  # made on first use; kept for its open connections
        self._client_lock = threading.Lock()

    def __getstate__(self):
        # A copy or pickle of the reward opens connections of its own.
        state = super().__getstate__()
        state["_client"], state["_client_lock"] = None, None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._client_lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        """The HTTP client every request of this reward goes through (thread-safe; making one costs
        about 10 ms for its TLS context, and keeping it keeps connections to the server open)."""
        with self._client_lock:
            if self._client is None:
                limits = httpx.Limits(max_connections=self.max_concurrency,
                                      max_keepalive_connections=self.max_concurrency)
                self._client = httpx.Client(timeout=self.timeout_s, headers=self._headers, limits=limits)
            return self._client

    def _score_requests(self, url: str, payloads: Sequence[dict],
                        read: Callable[[Any, int], list[float]]) -> list[float]:
        """POST every payload to ``url`` (``max_concurrency`` at once, each with retries) and return the
        scores ``read(answer JSON, payload index)`` gives, concatenated in payload order. The first
        request that fails for good stops the others and its error is raised."""
        stop = threading.Event()

        def scores(client: httpx.Client, index: int) -> list[float]:
            try:
                return read(self._post(client, url, payloads[index], stop), index)
            except Exception:
                # Set here, before the pool hands this thread the next request: requests waiting on
                # a backoff give up, and those not sent yet are not.
                stop.set()
                raise

        client = self.client
        if len(payloads) == 1:  # the scorer's usual case: no thread needed
            return scores(client, 0)
        with ThreadPoolExecutor(min(self.max_concurrency, len(payloads))) as pool:
            futures = [pool.submit(scores, client, i) for i in range(len(payloads))]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()  # not started yet: never sent
            wait(futures)
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            if errors:  # the request that failed for good, not one that stopped because of it
                raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return [score for future in futures for score in future.result()]

    def _post(self, client: httpx.Client, url: str, payload: dict, stop: threading.Event) -> Any:
        """One request with its retries -> the answer's JSON."""
        first_sent, attempt = time.monotonic(), 1
        while True:
            if stop.is_set():
                raise _Stopped()
            try:
                return self._attempt(client, url, payload)
            except _Transient as err:
                wait_s = backoff_s(self.backoff_s, attempt)  # as the reward plane's client
                wait_s = max(wait_s, err.retry_after_s or 0.0)
                if time.monotonic() + wait_s - first_sent > self.retry_budget_s:
                    raise ExternalRewardError(
                        f"{self.name}: server {url} did not answer within the retry budget of "
                        f"{self.retry_budget_s:g} s ({attempt} attempts, each limited to {self.timeout_s:g} s; "
                        "kwargs timeout_s, retry_budget_s); "
                        f"last error: {err}") from None
                if stop.wait(wait_s):
                    raise _Stopped() from None
                attempt += 1

    def _attempt(self, client: httpx.Client, url: str, payload: dict) -> Any:
        try:
            response = client.post(url, json=payload)
        except httpx.TimeoutException as err:
            raise _Transient(f"no answer within {self.timeout_s:g} s ({type(err).__name__})") from None
        except httpx.TransportError as err:  # refused, reset, dropped mid-answer
            raise _Transient(f"{type(err).__name__}: {err}") from None
        status = response.status_code
        if status in RETRIED_STATUS or status >= 500:
            try:
                retry_after = float(response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = None
            raise _Transient(f"HTTP {status} {response.reason_phrase}: {_quote(response.text)}", retry_after)
        if status >= 400:
            hint = "check the API key (kwargs api_key_env)" if status in (401, 403) else "check the URL and the kwargs"
            raise ExternalRewardError(
                f"{self.name}: server {url} refused the request with HTTP {status} {response.reason_phrase}: "
                f"{_quote(response.text)}; not retried (a 4xx is the request's fault): {hint}")
        try:
            return response.json()
        except ValueError:
            raise ExternalRewardError(
                f"{self.name}: server {url} answered HTTP {status} with something other than JSON: "
                f"{_quote(response.text)}") from None

    def _bad_answer(self, url: str, what: str, answer: Any) -> ExternalRewardError:
        quoted = _quote(json.dumps(answer, default=str))
        return ExternalRewardError(f"{self.name}: server {url} {what}; its answer: {quoted}")


@register_reward("external_scorer")
class ExternalScorerReward(ExternalReward):
    """Each view's score from a plain scorer endpoint (the shape in the module docstring), (B, V).

    url: the endpoint POSTed to; max_images_per_request: views per request (None = all B·V in one);
    prompts_field, images_field, scores_field: the JSON field names; the rest: ``ExternalReward``.
    """

    name = "external_scorer"

    def __init__(self, url: str, max_images_per_request: int | None = None, prompts_field: str = "prompts",
                 images_field: str = "images", scores_field: str = "scores", **http):
        super().__init__(**http)
        self.url = _check_url(self.name, "url", url)
        if max_images_per_request is not None and (not isinstance(max_images_per_request, int)
                                                   or max_images_per_request < 1):
            raise ExternalRewardConfigError(
                f"{self.name}: max_images_per_request={max_images_per_request!r}; "
                "expected an int >= 1, or null for all")
        self.max_images_per_request = max_images_per_request
        self.fields = {"prompts": prompts_field, "images": images_field, "scores": scores_field}

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        pngs = views_to_png(images)  # B·V, object-major
        view_prompts = [prompt for prompt in prompts for _ in range(V)]
        size = self.max_images_per_request or len(pngs)
        starts = range(0, len(pngs), size)
        payloads = [{self.fields["prompts"]: view_prompts[s:s + size], self.fields["images"]: pngs[s:s + size]}
                    for s in starts]

        def read(answer: Any, index: int) -> list[float]:
            expected = len(payloads[index][self.fields["images"]])
            key = self.fields["scores"]
            scores = answer.get(key) if isinstance(answer, dict) else None
            if not isinstance(scores, list):
                raise self._bad_answer(self.url, f"answered without a list {key!r} of scores", answer)
            if len(scores) != expected:
                raise self._bad_answer(self.url, f"answered {len(scores)} scores for {expected} images", answer)
            bad = [s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float))]
            if bad:
                raise self._bad_answer(self.url, f"answered non-numeric scores such as {bad[0]!r}", answer)
            return [float(s) for s in scores]

        scores = self._score_requests(self.url, payloads, read)
        return torch.tensor(scores, dtype=images.dtype, device=images.device).view(B, V)


@register_reward("external_judge")
class ExternalJudgeReward(ExternalReward):
    """Each view judged by a vision-language model behind an OpenAI-compatible chat endpoint, (B, V).

    base_url: the API root, ``/chat/completions`` is appended (e.g. http://judge-host:8000/v1);
    model: the served model's name; prompt_template: the question, ``{prompt}`` is the object's
    prompt; score_pattern: regular expression finding the score in the answer (its first group, if
    any); max_score: scores are divided by it (None: raw); max_tokens: the answer's limit (None:
    the server's default); extra_body: more request fields (e.g. vLLM's sampling options);
    unparsable: "error" (an answer without a score stops the batch) or "nan" (that view is
    flagged non-finite and not trained on); the rest: ``ExternalReward``.
    """

    name = "external_judge"

    def __init__(self, base_url: str, model: str, prompt_template: str = DEFAULT_JUDGE_TEMPLATE,
                 score_pattern: str = DEFAULT_SCORE_PATTERN, max_score: float | None = None,
                 max_tokens: int | None = None, extra_body: dict[str, Any] | None = None, unparsable: str = "error",
                 **http):
        super().__init__(**http)
        self.url = _check_url(self.name, "base_url", base_url).rstrip("/") + "/chat/completions"
        if not isinstance(model, str) or not model:
            raise ExternalRewardConfigError(f"{self.name}: model={model!r}; give the served model's name")
        try:
            prompt_template.format(prompt="a red cube")
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ExternalRewardConfigError(
                f"{self.name}: prompt_template cannot be filled ({type(err).__name__}: {err}); its only placeholder "
                "is {prompt}, and literal braces are written {{ }}") from None
        try:
            self.score_pattern = re.compile(score_pattern)
        except (re.error, TypeError) as err:
            raise ExternalRewardConfigError(f"{self.name}: score_pattern {score_pattern!r} is not a regular "
                                            f"expression ({err})") from None
        if max_score is not None and (isinstance(max_score, bool) or not isinstance(max_score, (int, float))
                                      or not max_score > 0):
            raise ExternalRewardConfigError(f"{self.name}: max_score={max_score!r}; expected a number > 0, or null")
        if unparsable not in ("error", "nan"):
            raise ExternalRewardConfigError(f"{self.name}: unparsable={unparsable!r}; expected 'error' or 'nan'")
        self.model, self.prompt_template, self.max_score = model, prompt_template, max_score
        self.max_tokens, self.extra_body, self.unparsable = max_tokens, dict(extra_body or {}), unparsable

    def request(self, prompt: str, png: str) -> dict:
        """The chat request judging one view (a base64 PNG) against its object's prompt."""
        body = {
            **self.extra_body,
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": self.prompt_template.format(prompt=prompt)},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            ]}],
        }  # fmt: skip
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def parse_score(self, content: str) -> float | None:
        """The score in an answer's text (divided by max_score), or None if it holds none."""
        match = self.score_pattern.search(content)
        if match is None:
            return None
        try:
            score = float(match.group(1) if self.score_pattern.groups else match.group(0))
        except (TypeError, ValueError):
            return None
        return score / self.max_score if self.max_score else score

    def forward(self, images, prompts, extras):
        B, V = images.shape[:2]
        pngs = views_to_png(images)  # B·V, object-major
        payloads = [self.request(prompts[i // V], png) for i, png in enumerate(pngs)]

        def read(answer: Any, index: int) -> list[float]:
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise self._bad_answer(self.url, "answered without choices[0].message.content", answer) from None
            if isinstance(content, list):  # content parts, as some servers answer
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            score = self.parse_score(content) if isinstance(content, str) else None
            if score is None:
                if self.unparsable == "nan":
                    return [math.nan]
                raise ExternalRewardError(
                    f"{self.name}: server {self.url} answered {_quote(str(content))} for object {index // V}, view "
                    f"{index % V}, in which score_pattern {self.score_pattern.pattern!r} finds no number; fix "
                    "prompt_template or score_pattern, or set unparsable: nan to skip such views")
            return [score]

        scores = self._score_requests(self.url, payloads, read)
        return torch.tensor(scores, dtype=images.dtype, device=images.device).view(B, V)
