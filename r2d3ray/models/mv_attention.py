"""Multi-view attention for diffusers' PixArt transformer (DiffSplat's cross-view mechanism).

The V views of an object travel through the transformer as V separate images, stacked on the
batch axis: hidden states are ``(B·V, n, d)`` with n tokens per view. In *self*-attention the
views must see each other, so :class:`MVAttnProcessor` regroups the tokens ``(B·V, n, d) ->
(B, V·n, d)`` before attention and splits them back afterwards (as DiffSplat's `mv_attention_processor.py`);
*cross*-attention to the prompt tokens stays per view. The number of views reaches the processor
through ``cross_attention_kwargs={"num_views": V}``: diffusers' ``Attention`` hands a processor
only the kwargs its ``__call__`` names, so every attention module of the blocks gets this
processor (a standard processor would log a warning about ``num_views`` on every call).

``upcast_softmax=True`` is Nabla-R2D3's mixed-precision trick (its ``Transformer_FP32_Softmax``)
for bf16 weights: *self*-attention's product and softmax run in float32 (the scores of 1024
jointly attending tokens lose too much in bf16), and so do the LayerNorms ``norm2`` of every block
(before the feed-forward) and the model's ``norm_out``; cross-attention to the prompt stays in the
weights' dtype, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention
from torch import nn


class PixArtTransformerMV2DModel(PixArtTransformer2DModel, PeftAdapterMixin):
    """diffusers' PixArt transformer with the PEFT adapter API (``add_adapter``, ``set_adapter``,
    ``load_lora_adapter``, ...), which diffusers does not mix into the PixArt class itself.

    Same weights and config as :class:`~diffusers.PixArtTransformer2DModel` (and as DiffSplat's
    class of this name, whose checkpoints it loads). Call :func:`set_mv_attention` to make the
    views attend jointly; the generators do so on construction.
    """


class MVAttnProcessor:
    """Attention processor: self-attention over the tokens of all views of an object.

    Self-attention (no ``encoder_hidden_states``) with ``num_views = V`` attends over the
    ``V·n`` tokens of each object; cross-attention and ``num_views = 1`` are plain attention.
    ``upcast_softmax`` computes self-attention (only) in float32.
    """

    def __init__(self, upcast_softmax: bool = False):
        self.upcast_softmax = upcast_softmax

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B·V, n, d)
        encoder_hidden_states: torch.Tensor | None = None,  # (B·V, L, d_text) for cross-attention
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_views: int = 1,
    ) -> torch.Tensor:
        joint_views = encoder_hidden_states is None and num_views > 1
        if joint_views:
            if attention_mask is not None:
                raise ValueError("MVAttnProcessor: an attention_mask is not supported in multi-view self-attention")
            batch_views, n, d = hidden_states.shape
            if batch_views % num_views:
                raise ValueError(
                    f"MVAttnProcessor: num_views={num_views} does not divide the batch of {batch_views} views"
                )
            hidden_states = hidden_states.reshape(batch_views // num_views, num_views * n, d)  # (B, V·n, d)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        if attention_mask is not None:  # (batch, 1, L) bias -> (batch, heads, 1, L)
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(x):  # (batch, len, heads·hd) -> (batch, heads, len, hd)
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        if self.upcast_softmax and encoder_hidden_states is None:
            query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None:
            attention_mask = attention_mask.to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(hidden_states.dtype)  # (batch, len, heads·hd)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if joint_views:
            out = out.reshape(batch_views, n, d)
        return out


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 whatever its input's dtype; the output has the input's dtype.

    Swapped in as the class of an existing ``nn.LayerNorm`` (:func:`set_float32_norms`) rather than
    wrapped by forward hooks: a pre-hook could cast the input up, but the post-hook no longer sees
    the input's dtype to cast the output back, and a subclass keeps the module's name and state
    dict, so checkpoints and LoRA target names are unchanged.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        normed = F.layer_norm(hidden_states.float(), self.normalized_shape, weight, bias, self.eps)
        return normed.to(hidden_states.dtype)


def set_float32_norms(transformer: PixArtTransformer2DModel, enabled: bool = True) -> PixArtTransformer2DModel:
    """Run the LayerNorms Nabla-R2D3 upcasts (every block's ``norm2``, the model's ``norm_out``) in
    float32 (``enabled``) or in the weights' dtype again; returns ``transformer``."""
    norms = [block.norm2 for block in transformer.transformer_blocks] + [transformer.norm_out]
    for norm in norms:
        if type(norm) not in (nn.LayerNorm, Float32LayerNorm):
            raise ValueError(f"set_float32_norms: expected LayerNorms, got {type(norm).__name__}")
        norm.__class__ = Float32LayerNorm if enabled else nn.LayerNorm
    return transformer


def set_mv_attention(transformer: PixArtTransformer2DModel, upcast_softmax: bool = False) -> PixArtTransformer2DModel:
    """Install :class:`MVAttnProcessor` on every attention module of ``transformer``'s blocks, and
    with ``upcast_softmax`` the float32 LayerNorms of :func:`set_float32_norms` (module docstring).

    The processor implements exactly the attention PixArt uses; a module with extra features
    (group/spatial/QK norms, residual, output rescaling) is refused rather than silently mishandled.
    Returns ``transformer``.
    """
    processor = MVAttnProcessor(upcast_softmax=upcast_softmax)
    attentions = [m for m in transformer.transformer_blocks.modules() if isinstance(m, Attention)]
    if not attentions:
        raise ValueError(f"set_mv_attention: {type(transformer).__name__} has no Attention modules in its blocks")
    for attn in attentions:
        extras = {
            "spatial_norm": attn.spatial_norm is not None,
            "group_norm": attn.group_norm is not None,
            "norm_q/norm_k": attn.norm_q is not None or attn.norm_k is not None,
            "norm_cross": attn.norm_cross is not None,
            "residual_connection": attn.residual_connection,
            "rescale_output_factor": attn.rescale_output_factor != 1.0,
            "custom scale": abs(attn.scale - (attn.inner_dim // attn.heads) ** -0.5) > 1e-12,
        }
        unsupported = [name for name, present in extras.items() if present]
        if unsupported:
            raise ValueError(f"set_mv_attention: attention features {unsupported} are not supported by MVAttnProcessor")
        attn.set_processor(processor)
    return set_float32_norms(transformer, enabled=upcast_softmax)
