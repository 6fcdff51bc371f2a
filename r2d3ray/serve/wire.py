"""The wire format of the reward plane: what a trainer and a reward deployment exchange.

Handle calls carry numpy only, never torch, so arrays travel zero-copy through the object store
on one node:

    score(images, prompts, extras, with_grad, grad_dtype) -> dict
      images      (B, V, 3, H, W) float32 in [0, 1]   (usually an ObjectRef from one ray.put)
      prompts     list of B strings
      extras      {"alphas" | "depths" | "normals": (B, V, C, H, W) float32}, may be empty
      with_grad   bool; grad_dtype "float32" | "float16" | "bfloat16"
      returns     {"values": (B, V) float32 (raw, NaN where the reward is), "finite": (B, V) bool,
                   "grads": (B, V, 3, H, W) or None, "extra_grads": {name: array}}
    Gradients of non-finite views are zero. bfloat16 has no numpy dtype: such gradients travel
    as uint16 bit patterns (see `encode_grad`). bfloat16 keeps float32's range; float16 loses
    relative precision below 6e-5 and flushes |g| < 6e-8 to zero, so prefer bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch

GRAD_DTYPES = ("float32", "float16", "bfloat16")


def object_store_anchor():
    """A 1 MiB object to hold for a process's lifetime, so the object store stays mapped in it.

    Ray's object-store client unmaps the store from a process when none of its objects is in
    use there, and maps it anew for the next one: every page of every request's images and
    gradients is then page-faulted in again (measured: a 12.6 MB put takes 16 ms instead of 5).
    """
    import ray

    return ray.put(np.zeros(2**18, np.float32))


def encode_grad(grad: torch.Tensor, dtype: str) -> np.ndarray:
    """A float32 CPU gradient as the numpy array sent over the wire in `dtype`."""
    if dtype == "bfloat16":
        return grad.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return grad.to(getattr(torch, dtype)).numpy()


def decode_grad(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `encode_grad`: a float32 tensor that owns writable memory.

    Arrays read from the object store are read-only views of shared memory; the caller may
    modify the gradient in place, so float32 arrays are copied when they are not writable.
    """
    if dtype == "bfloat16":
        # bfloat16 is the upper half of a float32: shift the bits back into place.
        return torch.from_numpy((np.asarray(array, dtype=np.uint32) << 16).view(np.float32))
    if array.dtype != np.float32 or not array.flags.writeable:
        array = array.astype(np.float32)
    return torch.from_numpy(array)
