"""The algorithms' collect/update (r2d3ray/train/updates.py) on one process: no Ray, no DeepSpeed.

A `TrainingRun` is built by hand around a tiny untrained generator and in-process rewards; its
`step` is a plain backward, so the order of reward requests, answers and backward passes can be
logged and checked.
"""

from __future__ import annotations

import torch

from r2d3ray.config import load_config
from r2d3ray.models.loading import load_generator
from r2d3ray.models.lora import add_lora_adapter, use_adapter
from r2d3ray.models.pipeline import SplatPipeline
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.train.run import TrainingRun, reward_needs
from r2d3ray.train.updates import NablaUpdates


def local_run(tmp_path, *overrides: str) -> tuple[TrainingRun, list[str]]:
    """A run on one process whose reward submits, answers and backward passes append to `events`."""
    model = tmp_path / "tiny"
    TinySplatGenerator.from_config({"resolution": 16, "num_layers": 1, "attention_head_dim": 16}).save_pretrained(model)
    cfg = load_config("configs/toy.yaml", [f"model.path={model}", "sampling.num_steps=5", "sampling.batch_size=2",
                                           "render.size=16", "algorithm.nabla.trajectories=fresh", *overrides])
    run = TrainingRun(cfg, rank=0, world_size=1)
    generator = load_generator(cfg)  # frozen, as the trainer loads it
    add_lora_adapter(generator.denoiser, "policy", rank=4, init="gaussian")
    use_adapter(generator.denoiser, "policy")
    run.pipeline = SplatPipeline(generator, cfg.sampling.num_steps, guidance_scale=cfg.sampling.guidance_scale)
    run.needs = reward_needs(cfg)
    run.rewards = run._connect_rewards(served=False)
    run.prompt_pool = ["a red cube", "a large blue sphere"]

    events: list[str] = []
    submit = run.rewards.submit

    def logged_submit(views, prompts, with_grad=True):
        pending = submit(views, prompts, with_grad)
        n = sum(e.startswith("submit") for e in events)
        events.append(f"submit {n}")
        result = pending.result

        def logged_result():
            events.append(f"result {n}")
            return result()

        pending.result = logged_result
        return pending

    def step(loss):
        assert torch.isfinite(loss)
        loss.backward()
        events.append("backward")

    run.rewards.submit, run.step = logged_submit, step
    return run, events


def test_nabla_sends_the_next_transitions_request_before_this_ones_backward(tmp_path):
    run, events = local_run(tmp_path, "algorithm.nabla.timestep_fraction=0.6")  # 3 transitions of 5 steps
    updates = NablaUpdates(run)
    batch = updates.collect()
    events.clear()  # collect's sample scoring
    params = [p for p in run.pipeline.generator.denoiser.parameters() if p.requires_grad]

    updates.update(batch)

    assert updates.n_transitions == 3
    # Request k+1 is in flight during transition k's backward; each answer is read after its request.
    assert events == ["submit 0", "result 0", "submit 1", "backward",
                      "result 1", "submit 2", "backward",
                      "result 2", "backward"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
