"""The reward plane on a real local Ray with Serve on loopback: handles, HTTP, Train workers, faults.

One module-scoped app is deployed once: the embedded default's rewards (configs/rewards_toy.yaml)
plus `probe`, a test-only reward registered below (NaN on chosen views, a little compute time so
requests stay in flight), with 2 replicas for the fault test. Every answer is compared with the
same reward computed in this process.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import ray
from ray import serve
from r2d3ray.config import RewardDeploymentConfig, load_reward_app_config
from r2d3ray.models.world import all_prompts
from r2d3ray.rewards import (CombinedReward, RewardCombiner, RewardModel, available_rewards, build_reward,
                             register_reward)
from r2d3ray.rewards.registry import reward_class
from r2d3ray.serve.client import LocalRewards, RewardPlaneError, ServedRewards
from r2d3ray.serve.deployments import app_status, deploy_rewards
from r2d3ray.serve.http import encode_npy
from scripts import load_script

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOY_TERMS = [("color_match", 1.0), ("colorfulness", 0.5), ("dnc", 2.0)]
PROBE_NAN_VIEWS = [1]


@register_reward("serve_probe")
class ProbeReward(RewardModel):
    """Test-only: mean brightness of each view, NaN on `nan_views`; `delay_s` keeps a request in flight."""

    name = "serve_probe"

    def __init__(self, nan_views: list[int] = (), delay_s: float = 0.0):
        super().__init__()
        self.nan_views, self.delay_s = list(nan_views), delay_s

    def forward(self, images, prompts, extras):
        time.sleep(self.delay_s)  # stands in for a model's compute time; no compute is measured here
        scale = torch.ones(images.shape[1], dtype=images.dtype)
        scale[[v for v in self.nan_views if v < len(scale)]] = float("nan")
        return images.mean((2, 3, 4)) * scale  # (B, V)


@register_reward("serve_batch_size")
class BatchSizeReward(RewardModel):
    """Test-only: every view scores the number of objects in the forward that scored it."""

    name = "serve_batch_size"

    def __init__(self, delay_s: float = 0.0):
        super().__init__()
        self.delay_s = delay_s

    def forward(self, images, prompts, extras):
        time.sleep(self.delay_s)
        return images.new_full(images.shape[:2], float(images.shape[0])) + 0 * images.mean((2, 3, 4))  # (B, V)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_batch(b: int = 2, v: int = 3, size: int = 32, seed: int = 0):
    """Images (B, V, 3, H, W) in [0, 1], world prompts, and the render extras DNC needs."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, v, 3, size, size, generator=g)
    extras = {
        "alphas": torch.rand(b, v, 1, size, size, generator=g),
        "depths": 1.2 + 0.3 * torch.rand(b, v, 1, size, size, generator=g),
        "normals": torch.nn.functional.normalize(torch.randn(b, v, 3, size, size, generator=g), dim=2),
    }
    return images, all_prompts()[:b], extras


def local_rewards(terms, **combining) -> LocalRewards:
    """In-process rewards of `terms` [(registered name, weight)]; `combining` goes to CombinedReward."""
    return LocalRewards(CombinedReward({name: build_reward(name) for name, _ in terms}, dict(terms), **combining))


def served_rewards(plane, terms, combining: dict | None = None, **options) -> ServedRewards:
    """The trainer's client of `terms` [(deployment name, weight)] of the test app, as the trainer
    builds it (the combiner reads the extras the deployments' rewards need); `options` go to ServedRewards."""
    rewards = {d.name: d.reward for d in plane.cfg.deployments}
    needs = frozenset().union(*(reward_class(rewards[name]).needs for name, _ in terms))
    return ServedRewards(plane.cfg.app_name, RewardCombiner(dict(terms), needs=needs, **(combining or {})), **options)


@pytest.fixture(scope="module")
def plane():
    # Workers import this module (for `serve_probe` and the Train loop) and the package from here.
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    port = free_port()
    overrides = [f"http.port={port}", "http.max_batch=4", "http.max_views=4", "http.max_image_size=64",
                 "http.max_body_mb=1"]
    cfg = load_reward_app_config(ROOT / "configs/rewards_toy.yaml", overrides)
    probe = RewardDeploymentConfig(
        name="probe", reward="test_serve:serve_probe", kwargs={"nan_views": PROBE_NAN_VIEWS, "delay_s": 0.1},
        num_replicas=2, num_cpus=0, max_batch_size=1,
    )
    batch_size = RewardDeploymentConfig(
        name="batch_size", reward="test_serve:serve_batch_size", kwargs={"delay_s": 0.5},
        num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.0,
    )
    cfg = cfg.model_copy(update={"deployments": [*cfg.deployments, probe, batch_size]})
    assert deploy_rewards(cfg) is True
    yield SimpleNamespace(cfg=cfg, overrides=overrides, url=f"http://127.0.0.1:{port}")
    serve.shutdown()  # also forgets this process's Serve client, so later modules start clean
    ray.shutdown()


def test_reward_app_configs_name_registered_rewards():
    for path in ("configs/rewards_toy.yaml", "configs/rewards_diffsplat.yaml"):
        cfg = load_reward_app_config(ROOT / path)
        assert {d.reward for d in cfg.deployments} <= set(available_rewards()), path
    diffsplat = load_reward_app_config(ROOT / "configs/rewards_diffsplat.yaml")
    assert all(d.num_gpus == 1 for d in diffsplat.deployments if d.reward in ("hps", "aesthetic", "normal"))


def test_handle_round_trip_matches_in_process(plane):
    images, prompts, extras = sample_batch()
    views = {"images": images, **extras}
    served = served_rewards(plane, TOY_TERMS).submit(views, prompts).result()
    local = local_rewards(TOY_TERMS).submit(views, prompts).result()
    for name, _ in TOY_TERMS:
        torch.testing.assert_close(served.components[name], local.components[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(served.rewards, local.rewards, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(served.grads, local.grads, rtol=1e-5, atol=1e-9)
    assert sorted(served.extra_grads) == ["depths", "normals"]
    for key in served.extra_grads:
        torch.testing.assert_close(served.extra_grads[key], local.extra_grads[key], rtol=1e-5, atol=1e-9)
    assert served.finite.all() and served.grads.abs().sum() > 0

    # Two random views of three per object, drawn by the trainer's combiner: only those travel, and
    # the answer scatters back to all three as in-process.
    combining = {"views_per_sample": 2, "seed": 5}
    served = served_rewards(plane, TOY_TERMS, combining).submit(views, prompts).result()
    local = local_rewards(TOY_TERMS, **combining).submit(views, prompts).result()
    assert torch.equal(served.scored, local.scored) and served.scored.sum(1).tolist() == [2, 2]
    torch.testing.assert_close(served.rewards, local.rewards, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(served.grads, local.grads, rtol=1e-5, atol=1e-9)
    assert (served.grads[~served.scored] == 0).all()


@pytest.mark.parametrize(
    "grad_dtype, wire_dtype, rel", [("float16", np.float16, 2**-11), ("bfloat16", np.uint16, 2**-8)]
)
def test_reduced_precision_gradients_round_trip(plane, grad_dtype, wire_dtype, rel):
    images, prompts, _ = sample_batch(seed=1)
    handle = serve.get_deployment_handle("color_match", app_name=plane.cfg.app_name)
    wire = handle.score.remote(images.numpy(), prompts, {}, True, grad_dtype).result()
    assert wire["grads"].dtype == wire_dtype and wire["grads"].shape == images.shape

    served = served_rewards(plane, [("color_match", 1.0)], grad_dtype=grad_dtype)
    got = served.submit({"images": images}, prompts).result().grads
    want = local_rewards([("color_match", 1.0)]).submit({"images": images}, prompts).result().grads
    assert got.dtype == torch.float32
    # Rounding to the nearest representable value; float16 also flushes below its subnormals.
    assert ((got - want).abs() <= rel * want.abs() + 2**-24).all()
    assert not torch.equal(got, want)


def _train_loop(config):
    import tempfile

    import ray.train

    from r2d3ray.rewards.combiner import RewardCombiner
    from r2d3ray.serve.client import ServedRewards

    images = torch.tensor(config["images"])
    plane = ServedRewards(config["app_name"], RewardCombiner({"color_match": 1.0}))
    answer = plane.submit({"images": images}, config["prompts"]).result()
    metrics = {"values": answer.components["color_match"].tolist(), "rewards": answer.rewards.tolist(),
               "grad_sum": float(answer.grads.double().sum())}
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint (Result.metrics).
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def test_handle_round_trip_from_a_train_worker(plane, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    images, prompts, _ = sample_batch(seed=2)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"app_name": plane.cfg.app_name, "images": images.tolist(), "prompts": prompts},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        run_config=RunConfig(name="serve_from_train", storage_path=str(tmp_path)),
    )
    metrics = trainer.fit().metrics
    want = build_reward("color_match").score(images, prompts, with_grad=True)
    torch.testing.assert_close(torch.tensor(metrics["values"]), want.values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(metrics["rewards"]), want.values.mean(1), rtol=1e-5, atol=1e-7)
    views = images.shape[1]  # the objective is the mean over views
    assert metrics["grad_sum"] == pytest.approx(float(want.grads.double().sum()) / views, rel=1e-5)


def _png(image: np.ndarray) -> str:
    """(3, H, W) uint8 -> base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_http_round_trip_npy_and_png(plane):
    images, prompts, _ = sample_batch(v=2, seed=3)
    want = build_reward("color_match").score(images, prompts, with_grad=True)
    with httpx.Client(base_url=plane.url, timeout=60) as http:
        body = {"prompts": prompts, "images_npy": encode_npy(images.numpy()), "with_grad": True}
        answer = http.post("/rewards/color_match", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        torch.testing.assert_close(torch.tensor(got["values"]), want.values, rtol=1e-5, atol=1e-7)
        grads = np.load(io.BytesIO(base64.b64decode(got["grad_npy"])), allow_pickle=False)
        torch.testing.assert_close(torch.from_numpy(grads), want.grads, rtol=1e-5, atol=1e-9)
        assert got["mean"] == pytest.approx(float(want.values.mean()), rel=1e-5)

        # PNG: 8-bit views; the server must see exactly the quantised images.
        quantised = (images * 255).round().to(torch.uint8)
        body = {"prompts": prompts, "images_png": [[_png(view.numpy()) for view in obj] for obj in quantised]}
        answer = http.post("/rewards/color_match", json=body)
        assert answer.status_code == 200, answer.text
        want_png = build_reward("color_match").score(quantised.float() / 255, prompts).values
        torch.testing.assert_close(torch.tensor(answer.json()["values"]), want_png, rtol=1e-5, atol=1e-7)
        assert "grad_npy" not in answer.json() or answer.json()["grad_npy"] is None

        assert http.get("/rewards").json() == {"rewards": sorted(d.name for d in plane.cfg.deployments)}
        schema = http.get("/openapi.json").json()
        post = schema["paths"]["/rewards/{name}"]["post"]
        assert "images_npy" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]


class _Canary:
    """Unpickling this creates a file: proof that the server never unpickles what it is sent."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _npy_b64(array: np.ndarray, allow_pickle: bool = False) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return base64.b64encode(buffer.getvalue()).decode()


def _bad_requests(canary: str) -> list[tuple[str, str, dict, int, str]]:
    """(case, reward, body, expected status, word the error must contain)."""
    images, prompts, _ = sample_batch(v=2, size=16, seed=4)
    good = {"prompts": prompts, "images_npy": encode_npy(images.numpy())}
    corrupt_png = _png(np.zeros((3, 16, 16), np.uint8))[:60]
    return [
        ("unknown reward", "nope", good, 404, "unknown reward"),
        ("int npy", "color_match", {**good, "images_npy": _npy_b64(images.numpy().astype(np.int32))}, 422, "dtype"),
        ("wrong shape", "color_match", {**good, "images_npy": _npy_b64(images.numpy()[:, :, 0])}, 422, "shape"),
        ("corrupt png", "color_match", {"prompts": prompts, "images_png": [[corrupt_png]] * 2}, 400, "PNG"),
        ("pickled object", "color_match",
         {**good, "images_npy": base64.b64encode(pickle.dumps(_Canary(canary))).decode()}, 400, "pickle"),
        ("object npy", "color_match",
         {**good, "images_npy": _npy_b64(np.array([_Canary(canary)], dtype=object), allow_pickle=True)}, 400, "pickle"),
        ("oversized body", "color_match", {**good, "prompts": ["x" * 2**20, "y"]}, 413, "limit"),
        ("missing prompts", "color_match", {"images_npy": good["images_npy"]}, 422, "prompts"),
        ("prompt count", "color_match", {**good, "prompts": prompts[:1]}, 422, "prompts"),
        ("too many views", "color_match", {**good, "images_npy": encode_npy(np.zeros((1, 5, 3, 8, 8), np.float32)),
                                           "prompts": prompts[:1]}, 413, "views"),
        ("too large image", "color_match", {**good, "images_npy": encode_npy(np.zeros((2, 1, 3, 65, 65), np.float32))},
         413, "pixels"),
        ("out of range", "color_match", {**good, "images_npy": encode_npy(images.numpy() * 255)}, 422, "[0, 1]"),
        ("reward rejects prompt", "color_match", {**good, "prompts": ["a red spaceship", prompts[1]]}, 422,
         "spaceship"),
    ]


def test_http_bad_inputs_get_4xx_and_the_server_keeps_serving(plane, tmp_path):
    canary = tmp_path / "unpickled"
    images, prompts, _ = sample_batch(v=2, size=16, seed=4)
    good = {"prompts": prompts, "images_npy": encode_npy(images.numpy())}
    want = build_reward("color_match").score(images, prompts).values
    with httpx.Client(base_url=plane.url, timeout=60) as http:
        for case, reward, body, status, word in _bad_requests(str(canary)):
            answer = http.post(f"/rewards/{reward}", json=body)
            assert answer.status_code == status, (case, answer.text)
            assert word in answer.json()["error"], (case, answer.json())
            served = http.post("/rewards/color_match", json=good)
            assert served.status_code == 200, (case, served.text)
            torch.testing.assert_close(torch.tensor(served.json()["values"]), want, rtol=1e-5, atol=1e-7)
    assert not canary.exists()


def test_requests_that_queue_behind_a_forward_are_merged_into_the_next(plane):
    client = served_rewards(plane, [("batch_size", 1.0)])
    images, prompts, _ = sample_batch(b=1, v=2, size=8)
    first = client.submit({"images": images}, prompts, with_grad=False)
    time.sleep(0.2)  # the replica is in the middle of the first request's 0.5 s forward
    queued = [client.submit({"images": images}, prompts, with_grad=False) for _ in range(3)]
    assert first.result().components["batch_size"].flatten().tolist() == [1.0, 1.0]
    for pending in queued:  # one forward of the three objects waiting, not three forwards of one
        assert pending.result().components["batch_size"].flatten().tolist() == [3.0, 3.0]


def test_merged_requests_keep_their_own_answers(plane):
    """Requests merged into one forward (rows of one batch on the reward's device) each get their own
    values, and gradients in their own dtype, as if scored alone. Arrays come from the object store
    (read-only), as a replica receives them."""
    from r2d3ray.serve.deployments import RewardServer
    from r2d3ray.serve.wire import decode_grad

    server = RewardServer("color_match", {}, max_batch_size=8, batch_wait_timeout_s=0.0)
    requests = [sample_batch(b=b, v=2, size=8, seed=20 + b) for b in (1, 2, 1)]
    images = [ray.get(ray.put(batch[0].numpy())) for batch in requests]
    assert not images[0].flags.writeable
    dtypes = ["float32", "bfloat16", "float32"]
    answers = server._score_group(images, [batch[1] for batch in requests], [{}, {}, {}], [True, True, False], dtypes)
    for (batch_images, prompts, _), answer, dtype, with_grad in zip(requests, answers, dtypes, [True, True, False]):
        want = build_reward("color_match").score(batch_images, prompts, with_grad=True)
        torch.testing.assert_close(torch.from_numpy(answer["values"]), want.values, rtol=1e-5, atol=1e-7)
        if not with_grad:
            assert answer["grads"] is None
            continue
        rel = 2**-8 if dtype == "bfloat16" else 1e-5
        got = decode_grad(answer["grads"], dtype)
        assert got.shape == batch_images.shape and ((got - want.grads).abs() <= rel * want.grads.abs() + 1e-12).all()


def test_gradients_are_decoded_without_a_host_copy(plane):
    """A float32 gradient read from the object store is used in place (read-only shared memory, which
    the combiner only reads); bfloat16 bit patterns are reinterpreted, then widened exactly."""
    import warnings

    from r2d3ray.serve.wire import decode_grad, encode_grad

    grad = torch.randn(2, 3, 3, 8, 8)
    received = ray.get(ray.put(encode_grad(grad, "float32")))
    assert not received.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's not-writable warning is expected and silenced
        decoded = decode_grad(received, "float32")
    assert decoded.data_ptr() == received.ctypes.data and torch.equal(decoded, grad)
    as_bf16 = grad.to(torch.bfloat16)
    decoded = decode_grad(ray.get(ray.put(encode_grad(grad, "bfloat16"))), "bfloat16")
    assert decoded.dtype == torch.float32 and torch.equal(decoded, as_bf16.float())


def test_non_finite_rewards_are_flagged_with_zero_gradient(plane):
    images, prompts, _ = sample_batch(seed=5)
    want = ProbeReward(PROBE_NAN_VIEWS).score(images, prompts, with_grad=True)
    nan = torch.zeros(images.shape[1], dtype=torch.bool)
    nan[PROBE_NAN_VIEWS] = True
    # The deployment's own answer: per view, flagged and with zero gradient where NaN.
    handle = serve.get_deployment_handle("probe", app_name=plane.cfg.app_name)
    wire = handle.score.remote(images.numpy(), prompts, {}, True, "float32").result()
    assert torch.equal(torch.from_numpy(wire["finite"]), ~nan.expand(images.shape[0], -1))
    values, grads = torch.from_numpy(wire["values"]), torch.from_numpy(wire["grads"].copy())
    assert values[:, nan].isnan().all()
    torch.testing.assert_close(values[:, ~nan], want.values[:, ~nan])
    assert (grads[:, nan] == 0).all() and (grads[:, ~nan] != 0).all()
    torch.testing.assert_close(grads, want.grads)
    # The trainer's answer: every object has a NaN view, so none is trusted and none has a gradient.
    answer = served_rewards(plane, [("probe", 1.0)]).submit({"images": images}, prompts).result()
    assert not answer.finite.any() and (answer.grads == 0).all()
    assert answer.components["probe"][:, nan].isnan().all()
    torch.testing.assert_close(answer.components["probe"][:, ~nan], want.values[:, ~nan])

    with httpx.Client(base_url=plane.url, timeout=60) as http:
        body = {"prompts": prompts, "images_npy": encode_npy(images[:, :2].numpy()), "with_grad": True}
        got = http.post("/rewards/probe", json=body).json()
    assert [row[1] for row in got["values"]] == [None, None]
    assert [row[1] for row in got["finite"]] == [False, False]
    assert got["mean"] == pytest.approx(float(want.values[:, 0].mean()), rel=1e-5)


def test_bad_requests_fail_fast_and_missing_apps_are_named(plane):
    images, prompts, _ = sample_batch()
    client = served_rewards(plane, [("color_match", 1.0)])
    with pytest.raises(ValueError, match="prompts must be a list of B=2"):  # checked before sending
        client.submit({"images": images}, prompts[:1])
    pending = client.submit({"images": images}, ["a red spaceship", prompts[1]])  # the reward rejects it
    with pytest.raises(ValueError, match="reward 'color_match': .*spaceship"):
        pending.result()
    assert pending.attempts == {"color_match": 1}
    with pytest.raises(RewardPlaneError, match="no_such_app"):
        ServedRewards("no_such_app", RewardCombiner({"color_match": 1.0}))


def test_serve_main_and_job_reuse_the_running_app(plane, capsys):
    from r2d3ray.serve.launch import serve_main

    assert serve_main(str(ROOT / "configs/rewards_toy.yaml"), plane.overrides, address="auto") == 0
    assert "already running, reused" in capsys.readouterr().out
    job = load_script("jobs/serve_rewards.py", "serve_rewards_job")
    args = ["--config", str(ROOT / "configs/rewards_toy.yaml")] + [x for o in plane.overrides for x in ("--set", o)]
    assert job.main(args) == 0
    assert "already running, reused" in capsys.readouterr().out
    assert job.main(["--config", str(ROOT / "configs/rewards_toy.yaml"), "--set", "http.port=0"]) == 2
    assert app_status(plane.cfg.app_name) == "RUNNING"


def test_http_beyond_loopback_needs_a_token_from_env_or_file(tmp_path, monkeypatch):
    from r2d3ray.serve.http import http_token

    http = {"host": "0.0.0.0", "token_env": "TEST_REWARDS_TOKEN", "token_file": ""}
    monkeypatch.delenv("TEST_REWARDS_TOKEN", raising=False)
    with pytest.raises(ValueError, match="beyond loopback.*TEST_REWARDS_TOKEN"):
        http_token(http)
    assert http_token({**http, "host": "127.0.0.1"}) is None  # loopback stays open by default
    monkeypatch.setenv("TEST_REWARDS_TOKEN", "s3cret")
    assert http_token(http) == "s3cret"
    (tmp_path / "token").write_text("from-file\n")
    assert http_token({**http, "token_file": str(tmp_path / "token")}) == "from-file"
    with pytest.raises(ValueError, match="does not exist"):
        http_token({**http, "token_file": str(tmp_path / "missing")})


def test_a_token_guards_every_route_but_health(plane, monkeypatch):
    """A second app on the same HTTP proxy, deployed with a token: no, wrong and right token."""
    monkeypatch.setenv("TEST_REWARDS_TOKEN", "s3cret")
    cfg = load_reward_app_config(ROOT / "configs/rewards_toy.yaml", [
        "app_name=secured", "http.route_prefix=/secured", "http.token_env=TEST_REWARDS_TOKEN",
        "deployments=[{name: color_match, reward: color_match, num_cpus: 0}]"])
    assert deploy_rewards(cfg) is True
    images, prompts, _ = sample_batch()
    body = {"prompts": prompts, "images_npy": encode_npy(images.numpy())}
    try:
        with httpx.Client(base_url=plane.url + "/secured", timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.post("/rewards/color_match", json=body).status_code == 401
            assert http.get("/rewards", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/docs").status_code == 401
            good = {"Authorization": "Bearer s3cret"}
            assert http.get("/rewards", headers=good).json() == {"rewards": ["color_match"]}
            answer = http.post("/rewards/color_match", json=body, headers=good)
            assert answer.status_code == 200 and len(answer.json()["values"]) == 2
    finally:
        serve.delete("secured")


def test_a_running_app_is_attached_only_when_it_serves_the_same_thing(plane):
    """A job finding the app with other kwargs stops naming the difference; its owner updates it;
    two jobs finding no app at once deploy it once."""
    import threading

    from r2d3ray.serve.deployments import RewardAppMismatch

    def app(nan_views):
        base = load_reward_app_config(ROOT / "configs/rewards_toy.yaml", ["app_name=owned", "http.route_prefix=/owned"])
        probe = RewardDeploymentConfig(name="probe", reward="test_serve:serve_probe", kwargs={"nan_views": nan_views},
                                       num_cpus=0, max_batch_size=1)
        return base.model_copy(update={"deployments": [probe]})

    results = []
    racers = [threading.Thread(target=lambda: results.append(deploy_rewards(app([0])))) for _ in range(2)]
    try:
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=120)
        assert sorted(results) == [False, True]  # one deployed, the other waited and attached
        with pytest.raises(RewardAppMismatch, match=r"deployment 'probe': kwargs \{'nan_views': \[0\]\} running"):
            deploy_rewards(app([1]))
        assert deploy_rewards(app([1]), owner=True) is True  # `r2d3ray serve` owns the app and updates it
        assert deploy_rewards(app([1])) is False
    finally:
        serve.delete("owned")


def test_serve_start_is_repeated_while_a_slow_proxy_is_replaced(monkeypatch):
    """On a loaded node Serve's controller replaces a proxy that missed its readiness checks, and the
    serve.start call waiting for it fails: the deploy starts Serve again until its deadline."""
    from r2d3ray.serve import deployments

    calls = []

    def flaky_start(http_options):
        calls.append(http_options)
        if len(calls) < 3:
            raise ray.exceptions.GetTimeoutError("proxies not ready")

    monkeypatch.setattr(deployments.serve, "start", flaky_start)
    monkeypatch.setattr(deployments, "backoff_s", lambda base_s, attempt: 0.01)
    cfg = load_reward_app_config(ROOT / "configs/rewards_toy.yaml")
    deployments._start_serve(cfg, deadline=time.monotonic() + 60)
    assert len(calls) == 3 and calls[-1] == {"host": cfg.http.host, "port": cfg.http.port}

    calls.clear()
    with pytest.raises(ray.exceptions.GetTimeoutError):  # past the deadline the error is the caller's
        deployments._start_serve(cfg, deadline=time.monotonic())
    assert len(calls) == 1


def test_a_request_past_its_deadline_is_retried_until_the_budget_ends(plane):
    """The `batch_size` reward takes 0.5 s; with a 0.1 s deadline every attempt times out, is
    cancelled and re-sent, and once the 1 s budget is spent the error names the reward and deadlines."""
    client = served_rewards(plane, [("batch_size", 1.0)], timeout_s=0.1, retry_budget_s=1.0, backoff_s=0.05)
    images, prompts, _ = sample_batch(b=1, v=1, size=8)
    pending = client.submit({"images": images}, prompts, with_grad=False)
    started = time.monotonic()
    with pytest.raises(RewardPlaneError, match="reward 'batch_size'.*retry budget of 1 s.*at most 0.1 s each"):
        pending.result()
    assert pending.attempts["batch_size"] >= 3 and time.monotonic() - started < 5.0


def test_a_replica_killed_mid_stream_loses_no_request(plane):
    """Runs last: it kills one of the two `probe` replicas while 12 requests are in flight."""
    client = served_rewards(plane, [("probe", 1.0)], timeout_s=60, retry_budget_s=120, backoff_s=0.2)
    batches = [sample_batch(b=1, v=2, size=8, seed=10 + i) for i in range(12)]
    pending = [client.submit({"images": images}, prompts) for images, prompts, _ in batches]
    time.sleep(0.3)  # the stream is under way: each replica answers one request per 0.1 s
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{plane.cfg.app_name}#probe#")]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    results = [p.result() for p in pending]
    for (images, prompts, _), result in zip(batches, results):
        want = ProbeReward(PROBE_NAN_VIEWS).score(images, prompts).values
        torch.testing.assert_close(result.components["probe"], want, equal_nan=True)
    assert sum(p.attempts["probe"] > 1 for p in pending) >= 1  # some requests were on the killed replica
