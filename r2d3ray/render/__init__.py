"""Cameras, differentiable splat rendering (gsplat on CUDA, torch on CPU), normals and pictures."""
from r2d3ray.render.cameras import Cameras, default_rig, jittered_rig, orbit_cameras, pixel_rays, plucker_rays
from r2d3ray.render.normals import depth_normal_consistency, depth_to_normals, gaussian_normals, rendered_normals
from r2d3ray.render.pictures import save_grid_png, save_turntable_gif
from r2d3ray.render.rasterize import RenderOutput, rasterization, render_splats

__all__ = [
    "Cameras", "default_rig", "jittered_rig", "orbit_cameras", "pixel_rays", "plucker_rays",
    "RenderOutput", "rasterization", "render_splats",
    "depth_to_normals", "gaussian_normals", "rendered_normals", "depth_normal_consistency",
    "save_grid_png", "save_turntable_gif",
]
