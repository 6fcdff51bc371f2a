"""The external rewards against small scoring servers on loopback, started here: a plain scorer and an
OpenAI-compatible chat judge that score each PNG by its mean brightness, and the ways a server goes
wrong (garbage, the wrong count, not JSON, 500 then 200, 401, too slow, not listening). Then one
round trip through a Ray Serve deployment, and the launch check that keeps them from gradient runs."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from r2d3ray.config import RewardAppConfig, RewardDeploymentConfig, build_config, load_reward_app_config
from r2d3ray.errors import UserError
from r2d3ray.rewards.external import ExternalJudgeReward, ExternalRewardConfigError, ExternalRewardError
from r2d3ray.rewards.registry import build_reward, reward_class
from r2d3ray.train.launch import LaunchError, _check_reward_app

ROOT = Path(__file__).resolve().parents[1]
# Deadlines no answer misses even on a loaded machine, with quick retries.
DEADLINES = {"timeout_s": 10.0, "retry_budget_s": 20.0, "backoff_s": 0.05}
# Deadlines for a server that does not answer: the budget runs out within a second.
SHORT_DEADLINES = {"timeout_s": 0.3, "retry_budget_s": 1.0, "backoff_s": 0.05}
SLOW_ANSWER_S = 1.0  # the `slow` behaviour: past SHORT_DEADLINES' timeout
TEMPLATE = 'Rate "{prompt}" from 0 to 10.'


def brightness(png: str) -> float:
    """Mean pixel of a base64 PNG, in [0, 1]: the test servers' score."""
    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))).mean() / 255)


class ScoringHandler(BaseHTTPRequestHandler):
    """Behaviour by the path's first segment: ok, garbage, short, notjson, flaky (500 once, then as
    ok), unauthorized (401), slow (answers after SLOW_ANSWER_S), switch (the server's `switch` attribute).
    `/<behaviour>/score` is the scorer; `/<behaviour>/v1/chat/completions` the judge."""

    server: ScoringServer

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        behaviour = self.path.strip("/").split("/")[0]
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            if behaviour == "switch":
                behaviour = self.server.switch
            if behaviour == "flaky":
                self.server.flaky_failures += 1
                behaviour = "fail" if self.server.flaky_failures == 1 else "ok"
        if behaviour == "slow":
            time.sleep(SLOW_ANSWER_S)
        if behaviour == "fail":
            return self.answer(500, {"error": "model worker restarting"})
        if behaviour == "unauthorized":
            return self.answer(401, {"error": {"message": "invalid api key"}})
        if behaviour == "notjson":
            return self.answer(200, b"<html>502 Bad Gateway</html>")
        if self.path.endswith("/chat/completions"):
            png = body["messages"][0]["content"][1]["image_url"]["url"].removeprefix("data:image/png;base64,")
            text = "I cannot rate this picture." if behaviour == "garbage" else f"Score: {10 * brightness(png):.6f}"
            return self.answer(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
        fields = self.server.fields
        scores = [brightness(png) for png in body[fields["images"]]]
        if behaviour == "garbage":
            scores = ["high"] * len(scores)
        if behaviour == "short":
            scores = scores[:-1]
        return self.answer(200, {fields["scores"]: scores})

    def answer(self, status: int, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # a `slow` answer the client stopped waiting for
            pass

    def log_message(self, *args):  # quiet: pytest shows failures, not access logs
        pass


class ScoringServer(ThreadingHTTPServer):
    daemon_threads = True  # a `slow` answer still sleeping does not hold up shutdown

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScoringHandler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.flaky_failures = 0
        self.switch = "ok"
        self.fields = {"images": "images", "scores": "scores"}

    def url(self, behaviour: str, endpoint: str = "score") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{behaviour}/{endpoint}"


@pytest.fixture(scope="module")
def module_server():
    server = ScoringServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(module_server):
    """The module's server with its record and behaviour reset for this test."""
    module_server.requests.clear()
    module_server.flaky_failures, module_server.switch = 0, "ok"
    module_server.fields = {"images": "images", "scores": "scores"}
    return module_server


def sample_views(b: int = 2, v: int = 2, size: int = 8, seed: int = 0):
    images = torch.rand(b, v, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, V, 3, H, W)
    return images, ["a red cube", "a blue sphere"][:b]


def png_brightness(images: torch.Tensor) -> torch.Tensor:
    """(B, V) what the servers score: each view's mean after 8-bit quantisation."""
    return ((images * 255).round() / 255).mean((2, 3, 4))


def judge(server, behaviour: str = "ok", **kwargs) -> ExternalJudgeReward:
    kwargs = {"base_url": server.url(behaviour, "v1"), "model": "judge-vl", "prompt_template": TEMPLATE,
              "max_score": 10, **DEADLINES, **kwargs}
    return build_reward("external_judge", **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scorer_scores_every_view_with_its_object_prompt(server):
    images, prompts = sample_views()
    server.fields = {"images": "pngs", "scores": "rewards"}
    reward = build_reward("external_scorer", url=server.url("ok"), max_images_per_request=3, images_field="pngs",
                          prompts_field="captions", scores_field="rewards", **DEADLINES)
    values = reward.score(images, prompts).values
    torch.testing.assert_close(values, png_brightness(images), rtol=0, atol=1e-6)
    # 4 views in chunks of 3 and 1 (sent concurrently), object-major, each view with its object's prompt.
    chunks = sorted((r["body"] for r in server.requests), key=lambda body: -len(body["pngs"]))
    assert [len(body["pngs"]) for body in chunks] == [3, 1]
    assert [p for body in chunks for p in body["captions"]] == ["a red cube", "a red cube", "a blue sphere",
                                                               "a blue sphere"]
    assert not reward.differentiable
    with pytest.raises(ValueError, match="has values only"):
        reward.score(images, prompts, with_grad=True)


def test_judge_sends_one_chat_request_per_view_and_parses_its_score(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    images, prompts = sample_views(seed=1)
    reward = judge(server, api_key_env="TEST_JUDGE_KEY", score_pattern=r"Score: (\d+\.\d+)", max_tokens=4,
                   extra_body={"top_k": 1})
    values = reward.score(images, prompts).values
    torch.testing.assert_close(values, png_brightness(images), rtol=0, atol=1e-6)  # 0-10 divided by max_score
    assert len(server.requests) == 4 and all(r["path"] == "/ok/v1/chat/completions" for r in server.requests)
    texts = sorted(r["body"]["messages"][0]["content"][0]["text"] for r in server.requests)
    assert texts == sorted(TEMPLATE.format(prompt=p) for p in prompts for _ in range(2))
    first = server.requests[0]
    assert first["headers"]["Authorization"] == "Bearer sk-test-123"
    assert {k: first["body"][k] for k in ("model", "temperature", "max_tokens", "top_k")} == {
        "model": "judge-vl", "temperature": 0, "max_tokens": 4, "top_k": 1}
    assert first["body"]["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("shape, behaviour, message", [
    ("scorer", "garbage", "answered non-numeric scores such as 'high'"),
    ("scorer", "short", "answered 3 scores for 4 images"),
    ("scorer", "notjson", "answered HTTP 200 with something other than JSON"),
    ("judge", "garbage", "answered 'I cannot rate this picture.' for object 0, view 0, in which score_pattern"),
    ("judge", "notjson", "answered HTTP 200 with something other than JSON"),
])  # fmt: skip
def test_a_bad_answer_is_an_error_naming_the_server(server, shape, behaviour, message):
    images, prompts = sample_views()
    if shape == "scorer":
        reward, url = build_reward("external_scorer", url=server.url(behaviour), **DEADLINES), server.url(behaviour)
    else:
        reward, url = judge(server, behaviour, max_concurrency=1), server.url(behaviour, "v1/chat/completions")
    with pytest.raises(ExternalRewardError) as info:
        reward.score(images, prompts)
    assert isinstance(info.value, UserError)
    assert str(info.value).startswith(f"{reward.name}: server {url} ") and message in str(info.value)
    assert len(server.requests) == 1  # a bad answer is not retried, and it stops the other views' requests


def test_a_judge_answer_without_a_score_can_flag_the_view_instead(server):
    images, prompts = sample_views()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = judge(server, "garbage", unparsable="nan").score(images, prompts)
    assert torch.isnan(out.values).all() and not out.finite.any()


@pytest.mark.parametrize("shape", ["scorer", "judge"])
def test_a_server_error_is_retried_and_the_answer_kept(server, shape):
    images, prompts = sample_views(b=1, v=1)
    reward = (build_reward("external_scorer", url=server.url("flaky"), **DEADLINES) if shape == "scorer"
              else judge(server, "flaky"))
    values = reward.score(images, prompts).values
    torch.testing.assert_close(values, png_brightness(images), rtol=0, atol=1e-6)
    assert len(server.requests) == 2  # 500, then the retry's 200


def test_a_401_is_not_retried_and_names_the_server(server):
    images, prompts = sample_views()
    with pytest.raises(ExternalRewardError) as info:
        build_reward("external_scorer", url=server.url("unauthorized"), **DEADLINES).score(images, prompts)
    message = str(info.value)
    assert f"server {server.url('unauthorized')} refused the request with HTTP 401" in message
    assert "invalid api key" in message and "not retried" in message and "api_key_env" in message
    assert len(server.requests) == 1


@pytest.mark.parametrize("behaviour", ["slow", "not_listening"])
def test_a_server_that_does_not_answer_fails_when_the_retry_budget_ends(server, behaviour):
    images, prompts = sample_views(b=1, v=1)
    url = server.url("slow") if behaviour == "slow" else f"http://127.0.0.1:{free_port()}/score"
    start = time.monotonic()
    with pytest.raises(ExternalRewardError) as info:
        build_reward("external_scorer", url=url, **SHORT_DEADLINES).score(images, prompts)
    elapsed = time.monotonic() - start
    message = str(info.value)
    attempts = int(re.search(r"\((\d+) attempts", message).group(1))
    assert f"server {url} did not answer within the retry budget of 1 s" in message and attempts >= 2
    assert ("no answer within 0.3 s" if behaviour == "slow" else "ConnectError") in message
    # The budget bounds the wait: no backoff ends past it, and the last attempt's timeout follows.
    assert elapsed < SHORT_DEADLINES["retry_budget_s"] + SHORT_DEADLINES["timeout_s"] + 1.0


def test_bad_kwargs_are_refused_with_what_to_do(server, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    cases = [
        (dict(api_key_env="TEST_JUDGE_KEY"), "api_key_env names $TEST_JUDGE_KEY, which is not set"),
        (dict(prompt_template="Rate {object}"), "prompt_template cannot be filled (KeyError: 'object')"),
        (dict(score_pattern="(\\d+"), "score_pattern '(\\\\d+' is not a regular expression"),
        (dict(base_url="judge-host:8000/v1"), "base_url='judge-host:8000/v1' is not an http(s) URL"),
        (dict(unparsable="zero"), "unparsable='zero'; expected 'error' or 'nan'"),
        (dict(timeout_s=0), "timeout_s=0; expected a number of seconds > 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExternalRewardConfigError) as info:
            judge(server, **kwargs)
        assert isinstance(info.value, UserError) and message in str(info.value), kwargs


def run_config(app_config: Path, algorithm: str, terms: str):
    overrides = [f"rewards.app_config={app_config}", f"algorithm.name={algorithm}", f"rewards.terms={terms}"]
    return build_config({}, overrides)


def test_gradient_algorithms_refuse_the_external_rewards_and_nft_takes_them(tmp_path):
    app = {"app_name": "rewards", "deployments": [
        {"name": "color_match", "reward": "color_match", "num_cpus": 0},
        {"name": "scorer", "reward": "external_scorer", "kwargs": {"url": "http://127.0.0.1:1/score"}},
    ]}  # fmt: skip
    app_config = tmp_path / "rewards.yaml"
    app_config.write_text(yaml.safe_dump(app))
    with pytest.raises(LaunchError) as info:
        _check_reward_app(run_config(app_config, "nabla", "[{name: color_match}, {name: scorer}]"))
    assert "algorithm 'nabla' trains on reward gradients, but reward term 'scorer' (reward 'external_scorer') " \
           "has values only" in str(info.value)
    _check_reward_app(run_config(app_config, "nft", "[{name: color_match}, {name: scorer}]"))

    # The shipped example: a value-only judge, taken by DiffusionNFT, refused by Nabla-R2D3.
    shipped = ROOT / "configs/rewards_external.yaml"
    assert [(d.name, d.reward) for d in load_reward_app_config(shipped).deployments] == [("judge", "external_judge")]
    assert not reward_class("external_judge").differentiable and not reward_class("external_scorer").differentiable
    _check_reward_app(run_config(shipped, "nft", "[{name: judge}]"))
    with pytest.raises(LaunchError, match="reward term 'judge' \\(reward 'external_judge'\\) has values only"):
        _check_reward_app(run_config(shipped, "nabla", "[{name: judge}]"))


@pytest.mark.slow
def test_a_served_judge_round_trips_and_names_the_server_on_failure(server):
    # One deployment (a replica starts in 10-20 s on 2 busy cores); the scorer shares its code path.
    import ray
    from ray import serve

    from r2d3ray.rewards.combiner import RewardCombiner
    from r2d3ray.serve.client import RewardPlaneError, ServedRewards
    from r2d3ray.serve.deployments import deploy_rewards

    judge_deployment = RewardDeploymentConfig(
        name="judge", reward="external_judge", num_cpus=0, health_check_period_s=60,
        kwargs={"base_url": server.url("switch", "v1"), "model": "judge-vl", "max_score": 10,
                "prompt_template": TEMPLATE, **DEADLINES},
    )
    cfg = RewardAppConfig(app_name="external_rewards", deployments=[judge_deployment],
                          http={"enabled": False, "port": free_port()})
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        deploy_rewards(cfg)
        images, prompts = sample_views(b=2, v=3, size=16, seed=2)
        plane = ServedRewards(cfg.app_name, RewardCombiner({"judge": 2.0}), timeout_s=30, retry_budget_s=30)
        answer = plane.submit({"images": images}, prompts, with_grad=False).result()
        torch.testing.assert_close(answer.components["judge"], png_brightness(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(answer.rewards, 2 * png_brightness(images).mean(1), rtol=0, atol=2e-6)
        assert answer.grads is None and answer.finite.all()

        server.switch = "unauthorized"
        with pytest.raises(RewardPlaneError) as info:
            plane.submit({"images": images}, prompts, with_grad=False).result()
        url = server.url("switch", "v1/chat/completions")
        assert f"server {url} refused the request with HTTP 401" in str(info.value)
    finally:
        serve.shutdown()
        ray.shutdown()
