"""The algorithms' collect/update (r2d3ray/train/updates.py) on one process: no Ray, no DeepSpeed.

A `TrainingRun` is built by hand around a tiny untrained generator and in-process rewards; its
`step` is a plain backward, so the order of reward requests, answers and backward passes can be
logged and checked.
"""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from r2d3ray.algorithms.nft import optimality_probability
from r2d3ray.config import load_config
from r2d3ray.models.loading import load_generator
from r2d3ray.models.lora import adapter_parameters
from r2d3ray.models.pipeline import SplatPipeline
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.train.adapters import add_adapters, restore_adapters, save_adapters
from r2d3ray.train.run import TrainingRun, connect_rewards, reward_needs
from r2d3ray.train.updates import ALGORITHMS, NablaUpdates, NFTUpdates, worker_optimality


def local_run(tmp_path, *overrides: str) -> tuple[TrainingRun, list[str]]:
    """A run on one process whose reward submits, answers and backward passes append to `events`.
    By default one micro-batch of the 2 sampled trajectories per optimizer step; overrides go after."""
    model = tmp_path / "tiny"
    TinySplatGenerator.from_config({"resolution": 16, "num_layers": 1, "attention_head_dim": 16}).save_pretrained(model)
    cfg = load_config("configs/toy.yaml", [f"model.path={model}", "sampling.num_steps=5", "sampling.batch_size=2",
                                           "render.size=16", "algorithm.nabla.trajectories=fresh", "lora.rank=4",
                                           "training.gradient_accumulation_steps=2", "training.micro_batch_size=2",
                                           "rewards.terms=[{name: color_match, weight: 1.0}]", *overrides])
    generator = load_generator(cfg)  # frozen, as the trainer loads it
    add_adapters(generator, cfg)
    needs = reward_needs(cfg)
    run = TrainingRun(cfg, SplatPipeline(generator, cfg.sampling.num_steps, guidance_scale=cfg.sampling.guidance_scale),
                      connect_rewards(cfg, needs, rank=0, served=False), engine=None, tracker=None,
                      prompt_pool=["a red cube", "a large blue sphere"], needs=needs)

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


@pytest.mark.parametrize("algorithm", ["nabla", "nft", "grpo", "reward_backprop"])
def test_an_epoch_trains_micro_batches_and_steps_once_per_accumulation(tmp_path, algorithm):
    # 2 sampling batches of 2 trajectories (NFT: 1 prompt x 2), 2 trajectories per optimizer step in micro-batches of 1.
    run, events = local_run(tmp_path, f"algorithm.name={algorithm}", "sampling.num_batches_per_epoch=2",
                            "algorithm.nft.group_size=2", "algorithm.grpo.group_size=2",
                            "training.gradient_accumulation_steps=2",
                            "training.micro_batch_size=1")
    updates = ALGORITHMS[algorithm](run)
    sizes = []
    for batch in updates.batches(updates.collect()):
        sizes.append(len(batch))
        updates.update(batch)

    assert run.cfg.samples_per_epoch() == 4 and run.cfg.optimizer_steps_per_epoch() == 2
    assert sizes == [1, 1, 1, 1]
    # DeepSpeed steps the optimizer every micro_steps_per_update backward passes: twice in this epoch.
    assert events.count("backward") == 2 * ALGORITHMS[algorithm].micro_steps_per_update(run.cfg)


def test_lookahead_x0_reads_alpha_bar_one_solver_step_nearer_zero(tmp_path):
    run, _ = local_run(tmp_path, "algorithm.nabla.x0_alpha_one_step_ahead=true")
    sampler = run.pipeline.sampler
    assert sampler.timesteps.tolist() == [999, 799, 599, 400, 200] and sampler.dt == 200
    seen = []

    def predict(x, t, embeds, guidance_scale=1.0):
        seen.append(torch.as_tensor(t).clone())
        return torch.full_like(x, 0.5)  # ε = 0.5

    run.pipeline.generator.predict = predict
    x = torch.ones(2, *run.pipeline.generator.latent_shape)
    t_prev = torch.tensor([0, 300])  # the final transition's target, and a state between solver steps
    x0 = NablaUpdates(run).policy_x0(x, t_prev, cond=None)

    assert seen[0].tolist() == [0, 300]  # the network sees t_prev itself
    # ᾱ at clamp(t_prev − 200, min=1) = [1, 100], by hand from the tiny prior's scaled-linear betas.
    betas = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(101)]
    for row, s in enumerate([1, 100]):
        alpha_bar = math.prod(1 - b for b in betas[:s + 1])
        expected = (1 - math.sqrt(1 - alpha_bar) * 0.5) / math.sqrt(alpha_bar)
        torch.testing.assert_close(x0[row], torch.full_like(x0[row], expected), rtol=1e-5, atol=0)
    # Off (the default), x̂0 reads ᾱ at t_prev: at t_prev = 0 that is ᾱ_0 = 1 − β_0.
    run.cfg.algorithm.nabla.x0_alpha_one_step_ahead = False
    consistent = NablaUpdates(run).policy_x0(x, t_prev, cond=None)
    alpha_bar_0 = 1 - betas[0]
    torch.testing.assert_close(consistent[0], torch.full_like(x0[0], (1 - math.sqrt(1 - alpha_bar_0) * 0.5)
                                                               / math.sqrt(alpha_bar_0)), rtol=1e-5, atol=0)


def test_nft_old_and_ema_start_as_the_policy_follow_it_and_are_checkpointed(tmp_path):
    run, _ = local_run(tmp_path, "algorithm.name=nft", "algorithm.nft.group_size=2", "algorithm.nft.ema_decay=0.9")
    denoiser = run.pipeline.generator.denoiser
    policy = adapter_parameters(denoiser, "policy")
    assert any(p.abs().sum() > 0 for p in policy.values())  # Gaussian init draws A at random: equal means copied
    for copy in ("old", "ema"):
        params = adapter_parameters(denoiser, copy)
        assert params.keys() == policy.keys() and all(torch.equal(params[k], policy[k]) for k in policy)
    assert denoiser.active_adapters() == ["policy"]

    # After optimizer step 1 the EMA keeps min((1 + 1)/(10 + 1), 0.9) = 2/11 of itself.
    with torch.no_grad():
        for p in policy.values():
            p.add_(torch.randn_like(p))
    ema_before = {k: v.detach().clone() for k, v in adapter_parameters(denoiser, "ema").items()}
    run.global_step = 1
    NFTUpdates(run).ema_follows_policy()
    ema = adapter_parameters(denoiser, "ema")
    for k in policy:
        torch.testing.assert_close(ema[k], 2 / 11 * ema_before[k] + 9 / 11 * policy[k])
    assert run.metric_sums["ema_decay"] == [2 / 11]

    # A checkpoint's lora/ is the EMA (what eval and infer load); the policy and old policy sit beside it.
    save_adapters(run.pipeline.generator, run.cfg, tmp_path / "ckpt")
    lora_file = tmp_path / "ckpt" / "lora" / "pytorch_lora_weights.safetensors"
    saved = {k.removeprefix("transformer."): v for k, v in safetensors.torch.load_file(lora_file).items()}
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert (tmp_path / "ckpt" / "lora_policy").is_dir() and (tmp_path / "ckpt" / "lora_old").is_dir()
    expected = {name: {k: v.detach().clone() for k, v in adapter_parameters(denoiser, name).items()}
                for name in ("policy", "old", "ema")}
    with torch.no_grad():
        for name in expected:
            for p in adapter_parameters(denoiser, name).values():
                p.zero_()
    restore_adapters(run.pipeline.generator, run.cfg, tmp_path / "ckpt")
    for name, params in expected.items():
        restored = adapter_parameters(denoiser, name)
        assert all(torch.equal(restored[k], params[k]) for k in params), name
    assert denoiser.active_adapters() == ["policy"]


def test_nft_advantages_from_all_workers_rewards_each_worker_takes_its_rows():
    rewards = [torch.tensor([1.0, 2.0, 0.5, float("nan")]), torch.tensor([3.0, 0.0, 4.0, 1.0])]
    prompts = [["a", "a", "b", "b"], ["a", "a", "c", "c"]]  # prompt "a" has samples on both workers

    def two_rank_gather(rank):
        """all_gather_object of a 2-rank group as rank `rank` sees it."""
        def gather(mine):
            everyone = [(rewards[other].tolist(), prompts[other]) for other in (0, 1)]
            everyone[rank] = mine  # what this rank sent, beside what the other rank sent
            return everyone
        return gather

    everyone = torch.cat(rewards)
    filled = torch.where(torch.isfinite(everyone), everyone, everyone.nanmean())  # NaN counts as the finite mean
    expected = optimality_probability(filled, prompts[0] + prompts[1], 5.0)[0]
    for rank in (0, 1):
        r = worker_optimality(rewards[rank], prompts[rank], 5.0, two_rank_gather(rank), rank)
        torch.testing.assert_close(r, expected[4 * rank:4 * rank + 4])
    alone = worker_optimality(rewards[0], prompts[0], 5.0)
    assert not torch.allclose(alone, expected[:4])  # per-worker statistics differ
    torch.testing.assert_close(alone, optimality_probability(torch.tensor([1.0, 2.0, 0.5, 7 / 6]), prompts[0], 5.0)[0])


def test_stale_trajectories_add_one_sampling_only_epoch_before_the_trained_ones(tmp_path):
    run, _ = local_run(tmp_path, "training.epochs=3")
    assert run.remaining_epochs(sampling_only_first=True) == range(-1, 3)
    assert run.remaining_epochs(sampling_only_first=False) == range(0, 3)
    # Resumed after 2 trained epochs with the last epoch's trajectories: neither redone nor skipped.
    run.epoch, run.stale = 2, object()
    assert run.remaining_epochs(sampling_only_first=True) == range(2, 3)


def test_grpo_recorded_log_probs_are_the_policys_own_so_the_first_ratio_is_one(tmp_path):
    # One micro-batch of a group of 2 samples, trained before any optimizer step: θ = θ_old.
    run, _ = local_run(tmp_path, "algorithm.name=grpo", "algorithm.grpo.group_size=2",
                       "algorithm.grpo.timestep_fraction=1.0")
    updates = ALGORITHMS["grpo"](run)
    batch = updates.collect()
    assert batch.old_log_probs.shape == (2, run.cfg.sampling.num_steps)
    assert torch.isfinite(batch.old_log_probs).all()
    # Group-relative advantages of a group of two: ±1 (std 1/2 of the difference), each sample the other's negative.
    torch.testing.assert_close(batch.targets[0], -batch.targets[1])
    updates.update(batch)
    torch.testing.assert_close(torch.tensor(run.metric_sums["ratio_mean"]), torch.ones(5), rtol=0, atol=1e-4)
    assert run.metric_sums["clip_fraction"] == [0.0] * 5
