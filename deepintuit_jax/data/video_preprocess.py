"""Qwen2-VL image/video preprocessing in NumPy, matching transformers' processors.

transformers' `Qwen2VLVideoProcessor` / `Qwen2VLImageProcessor` (torchvision backend) do:
smart resize -> torchvision `resize(uint8, BICUBIC, antialias=True)` -> (x - 255 mean) / (255 std)
in float32 -> repeat the last frame to a multiple of the temporal patch -> flatten patches as
[grid_t, h/m, w/m, m, m | C, tp, p, p].

torchvision resizes uint8 CPU tensors with torch's native uint8 antialiased kernel (Pillow's
scheme): per axis, Keys cubic weights (a = -0.5, support scaled by the downscale factor),
normalised in float64, quantised to int16 at a precision chosen from the largest weight;
integer dot products plus half an LSB, shifted and clamped to uint8; the width pass first, the
height pass on its uint8 output. `resize_bicubic_aa` reproduces that arithmetic exactly.
"""
from __future__ import annotations

import functools
import math

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Qwen's target size: multiples of `factor`, pixel count within [min_pixels, max_pixels],
  aspect ratio kept as closely as possible. Raises ValueError for aspect ratios over 200."""
  if min(height, width) <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if max(height, width) / min(height, width) > 200:
    raise ValueError("absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """One axis of the antialiased bicubic resize.

  Returns (index int64 [out, K] source positions, weights int32 [out, K] fixed point,
  precision bits). Taps past the source's range have weight 0 (their index is clipped).
  """
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  kmax = int(math.ceil(support)) * 2 + 1
  center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  xsize = np.clip(xsize, 0, kmax)
  j = np.arange(kmax, dtype=np.int64)
  pos = xmin[:, None] + j[None, :]
  w = _keys_cubic(((pos - center[:, None]) + 0.5) * invscale)
  w = np.where(j[None, :] < xsize[:, None], w, 0.0)
  total = np.zeros(out_size)
  for k in range(kmax):  # sequential sum, as the C++ loop does
    total = total + w[:, k]
  w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
  wt_max = float(w.max())
  precision = 0
  while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  v = w * (1 << precision)
  wi = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int32)
  return np.clip(pos, 0, in_size - 1), wi, precision


@functools.lru_cache(maxsize=64)
def _aa_bands(in_size: int, out_size: int, block: int = 32):
  """The taps of `_aa_taps` as dense float32 blocks of the banded weight matrix.

  Returns (blocks: list of (o0, o1, lo, hi, W float32 [o1-o0, hi-lo])) or None when float32
  sums of integer products could be inexact (255 * sum|w| >= 2**24): then the int32 path runs.
  """
  idx, wi, prec = _aa_taps(in_size, out_size)
  if 255 * int(np.abs(wi).sum(1).max()) >= (1 << 24):
    return None
  scale = 1.0 / (1 << prec)  # w_int / 2**p is exact in float32, and so are the sums
  blocks = []
  for o0 in range(0, out_size, block):
    o1 = min(o0 + block, out_size)
    live = wi[o0:o1] != 0
    lo, hi = int(idx[o0:o1][live].min()), int(idx[o0:o1][live].max()) + 1
    w = np.zeros((o1 - o0, hi - lo), np.float32)
    rows = np.broadcast_to(np.arange(o1 - o0)[:, None], live.shape)
    np.add.at(w, (rows[live], idx[o0:o1][live] - lo), wi[o0:o1][live] * scale)
    blocks.append((o0, o1, lo, hi, w))
  return blocks


def _resize_axis0(x: np.ndarray, out_size: int) -> np.ndarray:
  """Antialiased bicubic along axis 0 of a uint8 array [N, ...] -> uint8 [out_size, ...].

  Integer arithmetic as torch's: sum(w_int * x) + 2**(p-1), shifted right by p, clamped.
  Where every partial sum is an integer below 2**24 this runs as exact float32 block matmuls
  over the band (BLAS); otherwise in int32.
  """
  idx, wi, prec = _aa_taps(x.shape[0], out_size)
  half = float(1 << (prec - 1)) if prec else 0.0
  bands = _aa_bands(x.shape[0], out_size)
  if bands is not None:
    xf = x.reshape(x.shape[0], -1).astype(np.float32)
    acc = np.empty((out_size, xf.shape[1]), np.float32)
    for o0, o1, lo, hi, w in bands:
      np.matmul(w, xf[lo:hi], out=acc[o0:o1])
    acc += np.float32(0.5)  # (sum + 2**(p-1)) >> p  ==  floor(sum / 2**p + 0.5)
    np.clip(acc, 0, 255, out=acc)
    return acc.astype(np.uint8).reshape((out_size,) + x.shape[1:])  # truncation = floor here
  acc = np.full((out_size,) + x.shape[1:], int(half), np.int32)
  bshape = (out_size,) + (1,) * (x.ndim - 1)
  for k in range(idx.shape[1]):
    wk = wi[:, k]
    if wk.any():
      acc += wk.reshape(bshape) * np.take(x, idx[:, k], axis=0)
  acc >>= prec
  return np.clip(acc, 0, 255).astype(np.uint8)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """torchvision's `resize(uint8, BICUBIC, antialias=True)` on CPU, bit for bit.

  frames: uint8 [T, H, W, C] -> uint8 [T, height, width, C]. Width first, then height.
  """
  if frames.dtype != np.uint8 or frames.ndim != 4:
    raise ValueError(f"frames must be uint8 [T, H, W, C], got {frames.dtype} {frames.shape}")
  x = frames
  if x.shape[2] != width:
    x = _resize_axis0(np.ascontiguousarray(x.transpose(2, 0, 1, 3)), width)  # [w, T, H, C]
    x = x.transpose(1, 2, 0, 3)
  if x.shape[1] != height:
    x = _resize_axis0(np.ascontiguousarray(x.transpose(1, 0, 2, 3)), height)  # [h, T, w, C]
    x = x.transpose(1, 0, 2, 3)
  return np.ascontiguousarray(x)


@functools.lru_cache(maxsize=8)
def _norm_vectors(channels: int, per_channel: int) -> tuple[np.ndarray, np.ndarray]:
  """255*mean and 255*std (float32, as transformers fuses them) per flattened patch column."""
  mean = np.float32(255.0) * np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.float32(255.0) * np.asarray(OPENAI_CLIP_STD, np.float32)
  if channels != 3:
    raise ValueError(f"expected 3 colour channels, got {channels}")
  return np.repeat(mean, per_channel), np.repeat(std, per_channel)


def preprocess_video(frames: np.ndarray, *, min_pixels: int, max_pixels: int,
                     patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Qwen2-VL video preprocessing, identical to transformers' `Qwen2VLVideoProcessor`.

  frames: uint8 RGB [T, H, W, 3].
  Returns (pixel_values_videos float32 [grid_t*grid_h*grid_w, 3*tp*p*p],
           video_grid_thw int64 [3] = (grid_t, grid_h, grid_w)).
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f"frames must be uint8 RGB [T, H, W, 3] with T >= 1, got "
                     f"{frames.dtype} {frames.shape}")
  t, h, w, c = frames.shape
  p, tp, m = patch_size, temporal_patch_size, merge_size
  rh, rw = smart_resize(h, w, factor=p * m, min_pixels=min_pixels, max_pixels=max_pixels)
  x = resize_bicubic_aa(frames, rh, rw)
  if pad := -t % tp:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
  gt, gh, gw = x.shape[0] // tp, rh // p, rw // p
  # [gt, tp, gh/m, m, p, gw/m, m, p, C] -> [gt, gh/m, gw/m, m, m, C, tp, p, p]; uint8 moves
  # are cheap, so normalise after flattening.
  x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(gt * gh * gw, c * tp * p * p)
  mean, std = _norm_vectors(c, tp * p * p)
  out = (x.astype(np.float32) - mean) / std
  return out, np.array([gt, gh, gw], np.int64)


def preprocess_image(image: np.ndarray, *, min_pixels: int, max_pixels: int,
                     patch_size: int = 14, temporal_patch_size: int = 2,
                     merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Qwen2-VL image preprocessing (as `Qwen2VLImageProcessor`): the image as one frame,
  repeated to the temporal patch. image uint8 RGB [H, W, 3] ->
  (pixel_values float32 [grid_h*grid_w, 3*tp*p*p], image_grid_thw int64 [3] = (1, gh, gw))."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"image must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
  return preprocess_video(image[None], min_pixels=min_pixels, max_pixels=max_pixels,
                          patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                          merge_size=merge_size)


def second_per_grid(clip, temporal_patch_size: int = 2, default_fps: float = 2.0) -> float:
  """Seconds covered by one temporal grid step: temporal_patch_size / (clip.fps or default)."""
  return temporal_patch_size / (clip.fps or default_fps)
