"""The tiny prior's procedural world: vocabulary, parsing, splits and exact ground truth."""

import pytest
import torch

from r2d3ray.models import world
from r2d3ray.models.world import (
    COLORS,
    ObjectSpec,
    all_prompts,
    parse_prompt,
    prompt_for,
    render_ground_truth,
    sample_prompts,
    silhouette,
    split_prompts,
)
from r2d3ray.render.cameras import default_rig
from r2d3ray.render.rasterize import render_splats
from r2d3ray.splats import decode_splatter_images



def test_parse_prompt_roles_any_order_and_case():
    assert parse_prompt("A small RED cube.") == ObjectSpec(color="red", shape="cube", size="small")
    assert parse_prompt("the tall blue cylinder") == ObjectSpec("blue", "cylinder", "", "tall")
    assert parse_prompt("a medium red cube") == ObjectSpec("red", "cube")
    assert parse_prompt("cone green flat large") == ObjectSpec("green", "cone", "large", "flat")


def test_parse_prompt_refuses_unknown_words_and_lists_the_vocabulary():
    with pytest.raises(ValueError) as err:
        parse_prompt("a shiny red cube")
    message = str(err.value)
    assert "'shiny'" in message
    for word in [*COLORS, *world.SHAPES, "small", "large", "tall", "flat"]:
        assert word in message
    with pytest.raises(ValueError, match="no shape"):
        parse_prompt("a red")
    with pytest.raises(ValueError, match="more than one color"):
        parse_prompt("a red blue cube")


def test_prompts_round_trip_and_split_is_deterministic_and_disjoint():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == len(COLORS) * len(world.SHAPES) * len(world.SIZES) * len(world.ATTRIBUTES)
    assert all(prompt_for(parse_prompt(p)) == p for p in prompts)
    train, held_out = split_prompts("train"), split_prompts("held_out")
    assert len(held_out) == 64 and not set(train) & set(held_out)
    assert sorted(train + held_out) == prompts
    assert split_prompts("held_out") == held_out  # stable across calls
    # every word is seen in training, so held-out prompts are new combinations only
    train_words = {w for p in train for w in p.split()}
    assert {w for p in held_out for w in p.split()} <= train_words

    drawn = sample_prompts(50, torch.Generator().manual_seed(3), split="held_out")
    assert drawn == sample_prompts(50, torch.Generator().manual_seed(3), split="held_out")
    assert set(drawn) <= set(held_out)
    with pytest.raises(ValueError, match="split"):
        sample_prompts(2, split="test")


def _canonical_distance(spec: ObjectSpec, points: torch.Tensor) -> torch.Tensor:
    """World-unit distance bound of points to the object's surface (exact up to the stretch)."""
    rot = world._object_rotation(spec)
    half = torch.tensor(spec.half_extents)
    return world._canonical_sdf(spec.shape, (points @ rot) / half).abs() * half.max()


@pytest.mark.parametrize("prompt", ["a red cube", "a small blue sphere", "a large tall green cone",
                                    "a flat yellow cylinder", "a purple torus"])
def test_ground_truth_gaussians_lie_on_the_surface_with_normal_aligned_discs(prompt):
    spec = parse_prompt(prompt)
    rig = default_rig(4)
    gt = render_ground_truth(spec, rig, 32)  # (V, 12, 32, 32)
    assert gt.shape == (4, 12, 32, 32) and gt.abs().max() <= 1
    splats = decode_splatter_images(gt[None], rig.c2w)
    visible = splats.opacities[0] > 0.5
    assert visible.any() and ((splats.opacities[0] < 0.5) == (splats.opacities[0] == 0)).all()
    points = splats.means[0][visible]
    assert _canonical_distance(spec, points).max() < 1e-3  # on the surface (world units)

    # The shortest axis of each disc is the analytic surface normal (up to sign).
    q = torch.nn.functional.normalize(splats.quats[0][visible], dim=-1)
    w, x, y, z = q.unbind(-1)
    axis_z = torch.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)  # R[:, 2]
    assert (splats.scales[0][visible].argmin(-1) == 2).all()
    # the analytic normal: the SDF gradient at the point, mapped to the world
    rot, half = world._object_rotation(spec), torch.tensor(spec.half_extents)
    p = ((points @ rot) / half).requires_grad_(True)
    (grad,) = torch.autograd.grad(world._canonical_sdf(spec.shape, p).sum(), p)
    normals = torch.nn.functional.normalize((grad / half) @ rot.T, dim=-1)
    cosine = (axis_z * normals).sum(-1).abs()
    assert cosine.median() > 0.999 and (cosine > 0.9).float().mean() > 0.97  # edges of cube/cylinder aside
    # flat prompted colour
    assert torch.allclose(splats.colors[0][visible], torch.tensor(COLORS[spec.color]), atol=1e-5)


def test_decoded_ground_truth_renders_the_analytic_silhouette_in_the_right_colour():
    prompts = ["a red cube", "a blue sphere", "a green cone", "a yellow cylinder", "a purple torus"]
    specs = [parse_prompt(p) for p in prompts]
    gt = render_ground_truth(specs, default_rig(4), 32)  # (5, V, 12, 32, 32), batched
    assert torch.equal(gt[4], render_ground_truth(prompts[4], default_rig(4), 32))
    cameras = default_rig(4, size=128)
    out = render_splats(decode_splatter_images(gt, default_rig(4).c2w), cameras)
    for k, spec in enumerate(specs):
        mask = silhouette(spec, cameras)  # (V, 1, H, W)
        rendered = out.alphas[k] > 0.5
        iou = (rendered & mask).sum() / (rendered | mask).sum()
        assert iou > 0.9, (spec, iou)
        inside = out.images[k].permute(0, 2, 3, 1)[mask[:, 0]]  # (n, 3) pixels of the object
        assert torch.allclose(inside.median(0).values, torch.tensor(COLORS[spec.color]), atol=0.03), spec


def test_silhouette_matches_the_sphere_projection():
    # A sphere of radius r at distance D subtends a disc of radius f·r/sqrt(D² − r²) pixels.
    spec = parse_prompt("a large blue sphere")
    cameras = default_rig(1, size=64)
    mask = silhouette(spec, cameras)[0, 0]
    r, D, f = spec.half_extents[0], 1.4, 1.3889 * 64
    expected_area = torch.pi * (f * r / (D**2 - r**2) ** 0.5) ** 2
    assert abs(mask.sum().item() - expected_area) / expected_area < 0.03


def test_render_ground_truth_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown word"):
        render_ground_truth("a red pyramid", default_rig(4), 16)
    with pytest.raises(ValueError, match="size"):
        render_ground_truth("a red cube", default_rig(4), 1)
