"""Every tensor of a run on one device: the generator moves whole (rig included), a run refuses a
generator with a tensor left elsewhere, and reward answers come back on the images' device.

No GPU here: the "meta" device stands in for a second device."""
import numpy as np
import pytest
import torch
from torch import nn

from r2d3ray.config import build_config
from r2d3ray.models.loading import check_on_device, load_generator, resolve_device
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.serve.wire import decode_answer

SMALL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, resolution=16, caption_channels=16)


def test_a_tensor_off_the_device_is_named():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    check_on_device(module, "cpu")
    module[1].bias = nn.Parameter(torch.empty(2, device="meta"))
    with pytest.raises(RuntimeError, match=r"generator tensor '1.bias' is on meta, not on the run's device cpu"):
        check_on_device(module, "cpu")


def test_moving_a_generator_moves_its_rig_and_plucker_rays():
    generator = TinySplatGenerator.from_config(SMALL)
    rig = generator.rig
    generator.to("meta")
    check_on_device(generator, "meta")  # weights, prompt encoder, rig cameras, Plücker rays, ᾱ table
    assert generator.rig_viewmats.device.type == "meta" and generator.plucker.device.type == "meta"

    generator.to_empty(device="cpu")
    generator.rig_viewmats.copy_(rig.viewmats)
    generator.rig_Ks.copy_(rig.Ks)
    assert torch.equal(generator.rig.c2w, rig.c2w)  # the rig property rebuilds the same cameras

    generator.rig_viewmats = rig.viewmats.to("meta")  # a buffer left behind
    with pytest.raises(RuntimeError, match="'rig_viewmats' is on meta"):
        check_on_device(generator, "cpu")


def test_load_generator_puts_the_model_on_the_requested_device(tmp_path):
    TinySplatGenerator.from_config(SMALL).save_pretrained(tmp_path)
    cfg = build_config({}, [f"model.path={tmp_path}"])
    assert load_generator(cfg).device == torch.device("cpu")  # model.device "auto" without CUDA
    check_on_device(load_generator(cfg, "meta"), "meta")


def test_model_device_names():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_reward_answers_come_back_on_the_images_device():
    answer = {"values": np.ones((2, 4), np.float32), "grads": np.zeros((2, 4, 3, 8, 8), np.float32),
              "extra_grads": {"depths": np.zeros((2, 4, 1, 8, 8), np.float32)}, "finite": np.ones((2, 4), bool)}
    out = decode_answer(answer, "float32", torch.device("meta"))
    assert {t.device.type for t in (out.values, out.grads, out.extra_grads["depths"], out.finite)} == {"meta"}
