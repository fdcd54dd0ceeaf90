"""The Qwen2.5-VL vision tower (HF `visual.*`) in Flax NNX.

Patch embedding (a matmul on flattened patches) -> window permutation -> `depth` blocks
(RMSNorm, attention with 2D rotary embedding, RMSNorm, SwiGLU MLP) where blocks in
`fullatt_block_indexes` attend within each frame and the others within windows -> patch
merger (RMSNorm, 2x2 concat, Linear, GELU, Linear) -> un-permute.

All grid-dependent indexing comes from a host-side `VisionLayout` (see vision_layout.py);
attention runs on `[S, L, heads, head_dim]` blocks with per-entry segment ids (attention.py:
blockwise on CPU / GPU, splash on TPU), never on an `[N, N]` or `[L, L]` mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.models.qwen2_5_vl import attention as attn_lib
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions, VisionConfig
from deepintuit_jax.models.qwen2_5_vl.layers import Linear, RMSNorm, maybe_remat
from deepintuit_jax.models.qwen2_5_vl.vision_layout import (  # noqa: F401  (re-exported)
    BlockLayout, VisionLayout, vision_layout)

__all__ = ["VisionTower", "VisionLayout", "BlockLayout", "vision_layout", "vision_rotary"]


def vision_rotary(rotary_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """2D rotary tables: rotary_pos [N, 2] (h, w) -> cos, sin [N, head_dim] float32.

  As HF: head_dim/4 frequencies over head_dim/2; the h angles fill the first quarter, the w
  angles the second, and the half is repeated for rotate-half rotation.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
  angles = rotary_pos.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, hd/4]
  angles = angles.reshape(angles.shape[0], -1)  # [N, hd/2] = (h freqs, w freqs)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half rotary on x [N, H, hd] in float32 (as HF), returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockLayout,
                    impl: str, block: int | None = None) -> jax.Array:
  """Segment-local attention: q, k, v [N, H, hd] (permuted order) -> [N, H*hd].

  Tokens are gathered into [S, L, H, hd] blocks and attend within their segment
  (`blocks.segment`, -1 for empty entries, which attend each other); the result is
  scattered back and padding tokens (scatter index S*L) get zeros. impl: a resolved
  attention backend (attention.resolve_impl).
  """
  gather = jnp.asarray(blocks.gather)
  s, l = gather.shape
  seg = jnp.asarray(blocks.segment, jnp.int32)
  out = attn_lib.attention(q[gather], k[gather], v[gather], seg, seg, causal=False, impl=impl,
                           block=block)  # [S, L, H, hd]
  out = out.reshape(s * l, -1)
  return jnp.take(out, jnp.asarray(blocks.scatter), axis=0, mode="fill", fill_value=0)


class PatchEmbed(nnx.Module):
  """HF's Conv3d with stride = kernel, as a matmul on flattened patches `[N, C*T*P*P]`."""

  def __init__(self, config: VisionConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    self.proj = Linear(config.patch_dim, config.hidden_size, use_bias=False,
                       axes=("patch", "vision_embed"), dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, patch_dim] -> [N, Dv]."""
    return self.proj(x)


class VisionAttention(nnx.Module):
  """Multi-head self-attention with fused qkv (bias), 2D rotary and an output projection."""

  def __init__(self, config: VisionConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads, self.head_dim = config.num_heads, config.head_dim
    self.impl = attn_lib.resolve_impl(opts.attention_impl, dtype=opts.dtype,
                                      head_dim=config.head_dim, causal_text=False)
    self.block = opts.attention_block
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    # qkv's output dim is [3, heads, hd]: sharding it over heads would cut across q/k/v.
    self.qkv = Linear(d, 3 * d, use_bias=True, axes=("vision_embed", "qkv"), **kw)
    self.proj = Linear(d, d, use_bias=True, axes=("vision_heads", "vision_embed"), **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, blocks: BlockLayout
               ) -> jax.Array:
    """x [N, Dv] (permuted order) -> [N, Dv]."""
    n = x.shape[0]
    qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return self.proj(block_attention(q, k, v, blocks, self.impl, self.block))


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: VisionConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=True, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.gate_proj = Linear(d, f, axes=("vision_embed", "vision_mlp"), **kw)
    self.up_proj = Linear(d, f, axes=("vision_embed", "vision_mlp"), **kw)
    self.down_proj = Linear(f, d, axes=("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
  """Pre-norm residual block: x + attn(norm1(x)); x + mlp(norm2(x))."""

  def __init__(self, config: VisionConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    kw = dict(eps=config.rms_norm_eps, axes=("vision_embed",), dtype=opts.dtype,
              param_dtype=opts.param_dtype)
    self.norm1 = RMSNorm(config.hidden_size, **kw)
    self.norm2 = RMSNorm(config.hidden_size, **kw)
    self.attn = VisionAttention(config, opts, rngs=rngs)
    self.mlp = VisionMLP(config, opts, rngs=rngs)

  def __call__(self, x, cos, sin, blocks: BlockLayout):
    """x [N, Dv] -> [N, Dv]."""
    x = x + self.attn(self.norm1(x), cos, sin, blocks)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, concat each merge x merge group of patches, Linear, GELU (erf), Linear.

  `mlp` is a list [Linear, None, Linear] so that the parameter paths are HF's
  `merger.mlp.0.*` / `merger.mlp.2.*` (index 1 is HF's parameter-free nn.GELU).
  """

  def __init__(self, config: VisionConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    self.unit = config.spatial_merge_size ** 2
    wide = config.hidden_size * self.unit
    kw = dict(use_bias=True, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.ln_q = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axes=("vision_embed",),
                        dtype=opts.dtype, param_dtype=opts.param_dtype)
    self.mlp = nnx.List([
        Linear(wide, wide, axes=("vision_embed", "vision_mlp"), **kw),
        None,
        Linear(wide, config.out_hidden_size, axes=("vision_mlp", "embed"), **kw),
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [N, Dv] -> [N / merge**2, D_out]."""
    x = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
    return self.mlp[2](jax.nn.gelu(self.mlp[0](x), approximate=False))


def _call_block(block: VisionBlock, x, cos, sin, blocks: BlockLayout):
  return block(x, cos, sin, blocks)


class VisionTower(nnx.Module):
  """Qwen2.5-VL's vision transformer; parameter paths mirror HF's `visual.*` keys."""

  def __init__(self, config: VisionConfig, opts: RuntimeOptions = RuntimeOptions(), *,
               rngs: nnx.Rngs):
    self.config, self.opts = config, opts
    self.patch_embed = PatchEmbed(config, opts, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(config, opts, rngs=rngs) for _ in range(config.depth)])
    self.merger = PatchMerger(config, opts, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """Encodes all images / videos of one call.

    Args:
      pixel_values: [N, patch_dim] flattened patches of every grid, concatenated (HF's
        `pixel_values` / `pixel_values_videos`), padded to `layout.num_patches`.
      layout: `vision_layout(grid_thw, config, ...)` (NumPy or device arrays).
    Returns:
      [N / merge**2, out_hidden_size] in `opts.dtype`, merged tokens in the original order
      (HF's output); with `pad_to`, the padding rows come last (`layout.merged_valid`).
    """
    n = layout.window_perm.shape[0]
    if pixel_values.ndim != 2 or pixel_values.shape != (n, self.config.patch_dim):
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the layout expects "
                       f"[{n}, {self.config.patch_dim}] (patches, C*T*P*P)")
    x = jnp.asarray(pixel_values)[jnp.asarray(layout.window_perm)]
    x = self.patch_embed(x.astype(self.opts.dtype))
    cos, sin = vision_rotary(jnp.asarray(layout.rotary_pos), self.config.head_dim,
                             self.config.rope_theta)
    call = maybe_remat(_call_block, self.opts.remat)
    for i, block in enumerate(self.blocks):
      full = i in self.config.fullatt_block_indexes
      x = call(block, x, cos, sin, layout.full if full else layout.windowed)
    merged = self.merger(x)
    return merged[jnp.asarray(layout.merge_inverse)]

  def encode(self, pixel_values, grid_thw: np.ndarray) -> jax.Array:
    """Convenience for concrete grids: builds the layout, then `__call__` ->
    [sum(t*h*w) / merge**2, out_hidden_size]."""
    layout = vision_layout(np.asarray(grid_thw), self.config)
    return self(jnp.asarray(pixel_values), layout)
