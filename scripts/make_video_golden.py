"""Write golden files for `deepintuit_jax.data.video.preprocess_video` / `preprocess_image`.

Runs transformers' real Qwen2-VL processors (torchvision backend) on deterministic frames and
stores, per case, the grid, a subset of the pixel-value rows and whole-array statistics under
tests/data/golden/ (`np.savez_compressed`, no pickles). Needs torch + torchvision +
transformers, which CI does not install; run it in a throwaway venv:

  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch torchvision \
      transformers==5.24.0 numpy pillow
  /tmp/tvenv/bin/python scripts/make_video_golden.py [--out tests/data/golden]

The frames come from `golden_frames` (a closed formula); tests/parity/test_video_golden.py
regenerates them with the same formula and checks a checksum stored here.
"""
from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

# name: (kind, T, H, W, min_pixels, max_pixels)
CASES = {
    "video_odd_97x131_t4": ("video", 4, 97, 131, 56 * 56, 200704),
    "video_240x320_t5_odd_t": ("video", 5, 240, 320, 56 * 56, 200704),
    "video_tall_400x90_t4": ("video", 4, 400, 90, 56 * 56, 200704),
    "video_upsample_40x50_t4": ("video", 4, 40, 50, 128 * 28 * 28, 200704),
    "video_downscale_480x640_t2": ("video", 2, 480, 640, 56 * 56, 200704),
    "video_small_max_300x500_t6": ("video", 6, 300, 500, 56 * 56, 64 * 28 * 28),
    "video_single_frame_64x72_t1": ("video", 1, 64, 72, 56 * 56, 200704),
    "image_150x199": ("image", 1, 150, 199, 56 * 56, 200704),
}
MAX_ROWS = 64  # pixel-value rows stored per case (evenly spaced, first and last included)


def golden_frames(t: int, h: int, w: int) -> np.ndarray:
  """Deterministic uint8 RGB [t, h, w, 3]: smooth gradients, a hard edge and a texture."""
  y = np.arange(h, dtype=np.int64)[None, :, None, None]
  x = np.arange(w, dtype=np.int64)[None, None, :, None]
  f = np.arange(t, dtype=np.int64)[:, None, None, None]
  c = np.arange(3, dtype=np.int64)[None, None, None, :]
  grad = (x * 255) // max(w - 1, 1) + (y * 128) // max(h - 1, 1)
  edge = np.where((x + 2 * y + 7 * f) % 37 < 18, 60, 0)
  texture = (x * x * 7 + y * 13 + x * y * 3 + f * 31 + c * 67) % 97
  return ((grad + edge + texture + 40 * c) % 256).astype(np.uint8)


def row_subset(n: int, k: int = MAX_ROWS) -> np.ndarray:
  return np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(np.int64))


def frame_checksum(frames: np.ndarray) -> np.ndarray:
  """int64 [3]: sum, weighted sum and sum of squares of the frames (detects formula drift)."""
  v = frames.astype(np.int64).ravel()
  return np.array([v.sum(), (v * (np.arange(v.size) % 1009)).sum(), (v * v).sum()], np.int64)


def stats(a: np.ndarray) -> np.ndarray:
  """float64 [4]: sum, sum of |x|, sum of x^2 and a position-weighted sum of the array."""
  a64 = a.astype(np.float64)
  w = (np.arange(a.shape[0], dtype=np.float64) % 13)[:, None]
  return np.array([a64.sum(), np.abs(a64).sum(), (a64 * a64).sum(), (a64 * w).sum()])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                "data", "golden"))
  args = ap.parse_args()
  warnings.filterwarnings("ignore")
  import torch
  import torchvision
  import transformers
  from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

  os.makedirs(args.out, exist_ok=True)
  total = 0
  for name, (kind, t, h, w, min_px, max_px) in CASES.items():
    frames = golden_frames(t, h, w)
    if kind == "video":
      proc = Qwen2VLVideoProcessor(min_pixels=min_px, max_pixels=max_px)
      out = proc(videos=[frames], return_tensors="np", input_data_format="channels_last",
                 cap_pixels_per_frame=False)
      pv, grid = out["pixel_values_videos"], out["video_grid_thw"][0]
    else:
      proc = Qwen2VLImageProcessor(min_pixels=min_px, max_pixels=max_px)
      out = proc(images=[frames[0]], return_tensors="np", input_data_format="channels_last")
      pv, grid = out["pixel_values"], out["image_grid_thw"][0]
    rows = row_subset(pv.shape[0])
    path = os.path.join(args.out, f"{name}.npz")
    np.savez_compressed(
        path, kind=np.array(kind), shape=np.array([t, h, w], np.int64),
        min_pixels=np.array(min_px, np.int64), max_pixels=np.array(max_px, np.int64),
        frame_checksum=frame_checksum(frames), grid_thw=np.asarray(grid, np.int64),
        num_rows=np.array(pv.shape[0], np.int64), rows=rows,
        pixel_rows=pv[rows].astype(np.float32), stats=stats(pv),
        versions=np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                          f"transformers {transformers.__version__}"))
    size = os.path.getsize(path)
    total += size
    print(f"{name}: grid {[int(g) for g in grid]} rows {pv.shape[0]} -> {size / 1024:.0f} KiB")
  print(f"total {total / 1024:.0f} KiB in {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
