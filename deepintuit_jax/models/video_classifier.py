"""The imitation baseline's model: Qwen2.5-VL's vision tower plus a head that keeps space and
time, classifying a video into one of C labels.

    tower:  pixel_values [Np, patch_dim] (a group's videos, concatenated) -> merged tokens
            [Np/4, D] in the original (t, h/2, w/2) row-major order of each video;
    gather: each row takes its own video's tokens, padded to L: [b, L, D] (`token_index`,
            `num_tokens`, from the host-side `token_layout`);
    head:   RMSNorm + Linear D -> width, plus a position embedding of the token's (t, h, w)
            place in its video (Fourier features of the normalised coordinates, a learned
            projection), a learned [CLS] token in front, `depth` pre-norm transformer blocks
            (padding keys masked), RMSNorm, Linear width -> C on [CLS].

Why this head: the tower has only relative (rotary) positions inside its attention, so a
pooled readout (mean, or attention pooling without positions) of its tokens cannot tell
left from right or before from after, which is what the benchmark's classes are. The
coordinates are normalised to (-1, 1) per video, so "left half" or "last frames" mean the
same for clips of any resolution or frame count. Rows may come from videos of different
grids in one batch: every row is padded to L tokens and attention ignores the padding.

Parameter paths: `visual.*` are the HF keys of the tower (a base checkpoint's tower loads
unchanged), `head.*` the new head.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions, VisionConfig
from deepintuit_jax.models.qwen2_5_vl.layers import INIT_STD, Linear, RMSNorm
from deepintuit_jax.models.qwen2_5_vl.vision import VisionLayout, VisionTower

MIN_TOKENS = 16  # the smallest token bucket L


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """num_classes: C; width: the head's model width; depth: transformer blocks (>= 1: the
  [CLS] token learns about the video only by attending to its tokens); num_heads: attention heads (divides width); mlp_ratio: MLP width / width;
  pos_frequencies: Fourier frequencies per axis (pi/2 * 2^k, k < F) of the coordinates."""
  num_classes: int
  width: int = 64
  depth: int = 1
  num_heads: int = 4
  mlp_ratio: int = 4
  pos_frequencies: int = 6

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes={self.num_classes}: a classifier needs >= 2 classes")
    if self.depth < 1:
      raise ValueError(f"head depth={self.depth} must be >= 1 (the [CLS] token must attend)")
    if self.width < 1 or self.num_heads < 1 or self.width % self.num_heads:
      raise ValueError(f"head width={self.width} must be a positive multiple of "
                       f"num_heads={self.num_heads}")
    if self.mlp_ratio < 1 or self.pos_frequencies < 1:
      raise ValueError(f"mlp_ratio={self.mlp_ratio} and pos_frequencies="
                       f"{self.pos_frequencies} must be >= 1")


# ------------------------------------------------------------------ host side (NumPy)
@flax.struct.dataclass
class TokenLayout:
  """Where each row's tokens are among the group's merged tokens (NumPy; a pytree).

  token_index:  [b, L] int32   index into the group's merged tokens (0 where padding).
  token_coords: [b, L, 3] float32  (t, h, w) of the token, each in (-1, 1): the centre of
                                its cell, (2i + 1) / n - 1 (0 where padding).
  num_tokens:   [b] int32      real tokens of the row (a prefix of its L; 0 = no video).
  """
  token_index: np.ndarray
  token_coords: np.ndarray
  num_tokens: np.ndarray


def merged_grid(grid_thw: np.ndarray, merge: int) -> np.ndarray:
  """[n, 3] patch grids (t, h, w) -> [n, 3] merged-token grids (t, h/merge, w/merge)."""
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  if np.any(g[:, 1:] % merge):
    raise ValueError(f"grids {g.tolist()}: h and w must be multiples of merge={merge}")
  return g // np.array([1, merge, merge])


def token_bucket(n: int) -> int:
  """The token length L a batch whose longest video has `n` merged tokens is padded to."""
  return max(MIN_TOKENS, 1 << (max(int(n), 1) - 1).bit_length())


def token_layout(grid_thw: np.ndarray, rows: int, merge: int, length: int) -> TokenLayout:
  """Layout of one group: its n videos (`grid_thw [n, 3]`, in the order of the group's
  concatenated pixels) belong to rows 0..n-1, rows n..rows-1 have none (dummy rows).

  Merged tokens of a video come out of the tower in (t, h/merge, w/merge) row-major order
  (vision_layout.rotary_positions: merge blocks are contiguous), so token j of a video of
  merged grid (T, H, W) sits at (j // (H W), (j // W) % H, j % W)."""
  grids = merged_grid(grid_thw, merge)
  if len(grids) > rows:
    raise ValueError(f"{len(grids)} videos for {rows} rows: every row holds one video")
  counts = grids.prod(axis=1)
  if counts.size and counts.max() > length:
    raise ValueError(f"a video has {int(counts.max())} merged tokens, more than length={length}")
  index = np.zeros((rows, length), np.int32)
  coords = np.zeros((rows, length, 3), np.float32)
  num = np.zeros((rows,), np.int32)
  offset = 0
  for r, ((t, h, w), n) in enumerate(zip(grids, counts)):
    j = np.arange(n)
    cells = np.stack([j // (h * w), (j // w) % h, j % w], axis=-1)
    coords[r, :n] = (2 * cells + 1) / np.array([t, h, w], np.float64) - 1
    index[r, :n] = offset + j
    num[r] = n
    offset += int(n)
  return TokenLayout(token_index=index, token_coords=coords, num_tokens=num)


# ------------------------------------------------------------------ device side (NNX)
def fourier_features(coords: jax.Array, num_frequencies: int) -> jax.Array:
  """coords [..., A] in (-1, 1) -> [..., A * 2F] float32: sin and cos of pi/2 * 2^k * x.

  The lowest frequency is monotonic over (-1, 1) (left vs right is one feature's sign)."""
  freqs = (math.pi / 2) * 2.0 ** jnp.arange(num_frequencies, dtype=jnp.float32)
  angles = coords.astype(jnp.float32)[..., None] * freqs  # [..., A, F]
  feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return feats.reshape(coords.shape[:-1] + (-1,))


class HeadBlock(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)) (padding keys masked); x + mlp(norm(x))."""

  def __init__(self, cfg: HeadConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    w = cfg.width
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    norm = dict(axes=(None,), dtype=opts.dtype, param_dtype=opts.param_dtype)
    self.num_heads, self.attention_impl = cfg.num_heads, opts.attention_impl
    self.norm1, self.norm2 = RMSNorm(w, **norm), RMSNorm(w, **norm)
    self.qkv = Linear(w, 3 * w, use_bias=True, axes=(None, None), **kw)
    self.proj = Linear(w, w, use_bias=True, axes=(None, None), **kw)
    self.fc1 = Linear(w, cfg.mlp_ratio * w, use_bias=True, axes=(None, None), **kw)
    self.fc2 = Linear(cfg.mlp_ratio * w, w, use_bias=True, axes=(None, None), **kw)

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    """x [b, S, w]; lengths [b] int32: keys [0, lengths) are real. -> [b, S, w]."""
    b, s, w = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, s, 3, self.num_heads, w // self.num_heads)
    att = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       key_value_seq_lengths=lengths,
                                       implementation=self.attention_impl)
    x = x + self.proj(att.reshape(b, s, w))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class ClassifierHead(nnx.Module):
  """Tokens [b, L, D] at coordinates [b, L, 3] -> logits [b, C] float32 (see module doc)."""

  def __init__(self, in_features: int, cfg: HeadConfig, opts: RuntimeOptions, *,
               rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, opts.dtype
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    norm = dict(dtype=opts.dtype, param_dtype=opts.param_dtype)
    self.in_norm = RMSNorm(in_features, axes=("embed",), **norm)
    self.proj = Linear(in_features, cfg.width, use_bias=True, axes=("embed", None), **kw)
    self.pos = Linear(6 * cfg.pos_frequencies, cfg.width, use_bias=False, axes=(None, None),
                      **kw)
    self.cls = nnx.Param((INIT_STD * jax.random.normal(rngs.params(), (cfg.width,))
                          ).astype(opts.param_dtype), logical_axes=(None,))
    self.blocks = nnx.List([HeadBlock(cfg, opts, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = RMSNorm(cfg.width, axes=(None,), **norm)
    self.out = Linear(cfg.width, cfg.num_classes, use_bias=True, axes=(None, None), **kw)

  def __call__(self, tokens: jax.Array, coords: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """tokens [b, L, D]; coords [b, L, 3] in (-1, 1); num_tokens [b] int32 (real prefix).
    Returns logits [b, C] float32."""
    x = self.proj(self.in_norm(tokens))
    x = x + self.pos(fourier_features(coords, self.cfg.pos_frequencies))
    cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
    x = jnp.concatenate([cls, x.astype(self.dtype)], axis=1)  # [b, 1 + L, w]
    lengths = 1 + num_tokens.astype(jnp.int32)  # [CLS] is always a key: no empty softmax
    for block in self.blocks:
      x = block(x, lengths)
    return self.out(self.norm(x[:, 0])).astype(jnp.float32)


class VideoClassifier(nnx.Module):
  """`visual` (Qwen2.5-VL's VisionTower) + `head` (ClassifierHead).

  tower: an existing VisionTower (e.g. a base checkpoint's `model.visual`); None = a fresh
  random one of `vision_config` (from scratch)."""

  def __init__(self, vision_config: VisionConfig, head_config: HeadConfig,
               opts: RuntimeOptions = RuntimeOptions(), *, rngs: nnx.Rngs,
               tower: VisionTower | None = None):
    if tower is not None and tower.config != vision_config:
      raise ValueError("the given tower's VisionConfig differs from vision_config")
    self.vision_config, self.head_config = vision_config, head_config
    # The head draws its init first: for one seed it is the same whatever the tower.
    self.head = ClassifierHead(vision_config.out_hidden_size, head_config, opts, rngs=rngs)
    self.visual = tower if tower is not None else VisionTower(vision_config, opts, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout, token_index: jax.Array,
               token_coords: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """One group: pixel_values [Np, patch_dim] and its `layout` (`vision_layout(...,
    pad_to=Np)`), the rows' `TokenLayout` arrays (token_index [b, L], token_coords
    [b, L, 3], num_tokens [b]). Returns logits [b, C] float32."""
    merged = self.visual(pixel_values, layout)  # [Np / 4, D]
    tokens = jnp.take(merged, token_index, axis=0)  # [b, L, D]
    return self.head(tokens, token_coords, num_tokens)
