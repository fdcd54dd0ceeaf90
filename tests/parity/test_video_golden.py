"""preprocess_video / preprocess_image against transformers' Qwen2-VL processors.

Golden files were written by scripts/make_video_golden.py from transformers' real processors
(torchvision backend). The frames are regenerated with that script's closed formula (checked by
a stored checksum). A live comparison runs too when torchvision is importable.
"""
import glob
import os

import numpy as np
import pytest

from deepintuit_jax.data.video import preprocess_image, preprocess_video
from tests.scripts import load_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_DIR = os.path.join(ROOT, "tests", "data", "golden")
FILES = sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.npz")))


def _golden_script():
  """scripts/make_video_golden.py (NumPy only at import): the frame formula and the summary
  statistics the golden files were written with; its stored checksum detects drift."""
  return load_script("scripts", "make_video_golden.py")


_SCRIPT = _golden_script()
golden_frames, frame_checksum, stats = (_SCRIPT.golden_frames, _SCRIPT.frame_checksum,
                                        _SCRIPT.stats)


def run_ours(kind, frames, min_px, max_px):
  if kind == "video":
    return preprocess_video(frames, min_pixels=min_px, max_pixels=max_px)
  return preprocess_image(frames[0], min_pixels=min_px, max_pixels=max_px)


def test_golden_files_present():
  assert len(FILES) >= 8, f"golden files missing under {GOLDEN_DIR}"
  assert sum(os.path.getsize(f) for f in FILES) < 2 * 1024 * 1024


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f)[:-4] for f in FILES])
def test_matches_golden(path):
  with np.load(path, allow_pickle=False) as z:
    g = {k: z[k] for k in z.files}
  t, h, w = (int(v) for v in g["shape"])
  frames = golden_frames(t, h, w)
  np.testing.assert_array_equal(frame_checksum(frames), g["frame_checksum"])
  pv, grid = run_ours(str(g["kind"]), frames, int(g["min_pixels"]), int(g["max_pixels"]))
  np.testing.assert_array_equal(grid, g["grid_thw"])           # same grid exactly
  assert grid.dtype == np.int64 and pv.dtype == np.float32
  assert pv.shape == (int(g["num_rows"]), 3 * 2 * 14 * 14)
  diff = np.abs(pv[g["rows"]] - g["pixel_rows"])
  print(f"{os.path.basename(path)}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}")
  assert diff.mean() < 1e-3 and diff.max() < 0.05  # measured: 0 (bit-exact resize)
  np.testing.assert_allclose(stats(pv), g["stats"], rtol=1e-5)


def test_odd_frame_folder_gives_the_processors_pixels(tmp_path):
  """One source, the same pixels: a folder of 5 lossless frames goes through our sampling
  (every frame of an odd count is kept) and preprocessing and must give what transformers'
  video processor made of all 5 frames (the golden file; it repeats the last frame to fill
  the temporal patch, giving 3 temporal steps)."""
  import cv2

  from deepintuit_jax.data.video import load_video
  with np.load(os.path.join(GOLDEN_DIR, "video_240x320_t5_odd_t.npz"), allow_pickle=False) as z:
    g = {k: z[k] for k in z.files}
  frames = golden_frames(5, 240, 320)
  for i, f in enumerate(frames):
    cv2.imwrite(str(tmp_path / f"frame_{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  clip = load_video(str(tmp_path), max_frames=32)
  np.testing.assert_array_equal(clip.frames, frames)
  pv, grid = preprocess_video(clip.frames, min_pixels=int(g["min_pixels"]),
                              max_pixels=int(g["max_pixels"]))
  np.testing.assert_array_equal(grid, g["grid_thw"])
  assert grid[0] == 3
  np.testing.assert_array_equal(pv[g["rows"]], g["pixel_rows"])


@pytest.mark.torchvision
def test_live_processor_random_frames():
  pytest.importorskip("torchvision")
  transformers = pytest.importorskip("transformers")
  rng = np.random.default_rng(3)
  vp = transformers.Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=200704)
  ip = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=200704)
  for t, h, w in [(3, 123, 77), (4, 333, 517), (2, 30, 900)]:
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    ref = vp(videos=[frames], return_tensors="np", input_data_format="channels_last",
             cap_pixels_per_frame=False)
    pv, grid = preprocess_video(frames, min_pixels=56 * 56, max_pixels=200704)
    np.testing.assert_array_equal(grid, ref["video_grid_thw"][0])
    assert np.abs(pv - ref["pixel_values_videos"]).mean() < 1e-3
    ref = ip(images=[frames[0]], return_tensors="np", input_data_format="channels_last")
    pv, grid = preprocess_image(frames[0], min_pixels=56 * 56, max_pixels=200704)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert np.abs(pv - ref["pixel_values"]).mean() < 1e-3
