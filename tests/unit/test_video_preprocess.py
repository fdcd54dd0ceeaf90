"""Qwen2-VL preprocessing in NumPy: smart_resize, the antialiased bicubic kernel, patch order."""
import numpy as np
import pytest

from deepintuit_jax.data.video import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VideoClip,
                                       preprocess_image, preprocess_video, resize_bicubic_aa,
                                       second_per_grid, smart_resize)


@pytest.mark.parametrize("hw,kw,want", [
    ((97, 131), {}, (84, 140)),                          # round(3.46)=3, round(4.68)=5
    ((400, 90), {"max_pixels": 200704}, (392, 84)),
    ((500, 700), {"max_pixels": 200704}, (364, 504)),    # beta 1.3206: 13.52->13, 18.93->18
    ((480, 640), {"max_pixels": 200704}, (364, 504)),    # beta 1.2372: 13.86->13, 18.48->18
    ((40, 50), {"min_pixels": 100352, "max_pixels": 200704}, (308, 364)),  # 10.1->11, 12.6->13
    ((28, 28), {}, (56, 56)),                            # 784 < 3136: beta 2
    ((10, 1999), {}, (28, 812)),   # aspect 199.9 allowed; h rounds to 0 -> min_pixels path:
                                   # beta .396: ceil(.14)=1 -> 28, ceil(28.3)=29 -> 812
])
def test_smart_resize(hw, kw, want):
  assert smart_resize(*hw, **kw) == want


def test_smart_resize_aspect_error():
  with pytest.raises(ValueError, match="aspect ratio"):
    smart_resize(10, 2001)


def test_resize_hand_computed_downscale():
  # 4 -> 2 pixels, scale 2, support 4: Keys(a=-0.5) taps at (j - c + .5)/2, normalised:
  # out0 = [.4587, .4587, .1198, -.0372] . [0, 100, 200, 50] = 67.97 -> 68; out1 = 126.65 -> 127.
  x = np.zeros((1, 1, 4, 3), np.uint8)
  x[0, 0, :, 0] = [0, 100, 200, 50]
  x[0, 0, :, 1] = 255
  out = resize_bicubic_aa(x, 1, 2)
  np.testing.assert_array_equal(out[0, 0, :, 0], [68, 127])
  np.testing.assert_array_equal(out[0, 0, :, 1], [255, 255])  # constant stays constant
  np.testing.assert_array_equal(out[0, 0, :, 2], [0, 0])


def test_resize_identity_and_constant():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
  np.testing.assert_array_equal(resize_bicubic_aa(x, 17, 23), x)
  c = np.full((1, 37, 41, 3), 173, np.uint8)
  for hw in [(12, 9), (80, 100), (37, 90)]:
    np.testing.assert_array_equal(resize_bicubic_aa(c, *hw), np.full((1, *hw, 3), 173))


def _unnormalise(pv):
  mean = np.repeat(np.float32(255) * np.asarray(OPENAI_CLIP_MEAN, np.float32), 2 * 14 * 14)
  std = np.repeat(np.float32(255) * np.asarray(OPENAI_CLIP_STD, np.float32), 2 * 14 * 14)
  u = pv * std + mean
  np.testing.assert_allclose(u, np.round(u), atol=1e-3)
  return np.round(u).astype(np.int64)


def test_patch_order_and_temporal_padding():
  t_, y_, x_, c_ = np.meshgrid(np.arange(3), np.arange(56), np.arange(56), np.arange(3),
                               indexing="ij")
  frames = ((t_ * 60 + y_ * 3 + x_ * 5 + c_ * 101) % 256).astype(np.uint8)  # 56x56: no resize
  pv, grid = preprocess_video(frames, min_pixels=56 * 56, max_pixels=56 * 56)
  np.testing.assert_array_equal(grid, [2, 4, 4])
  assert pv.shape == (32, 1176) and pv.dtype == np.float32
  u = _unnormalise(pv)
  for r in range(32):  # row = ((gt*2 + bh)*2 + bw)*4 + mh*2 + mw
    gt, bh, bw, mh, mw = r // 16, (r // 8) % 2, (r // 4) % 2, (r // 2) % 2, r % 2
    for col in range(0, 1176, 7):  # col = ((c*2 + tp)*14 + py)*14 + px
      c, tp, py, px = col // 392, (col // 196) % 2, (col // 14) % 14, col % 14
      t = min(gt * 2 + tp, 2)  # frame 3 is a repeat of frame 2
      y, x = (bh * 2 + mh) * 14 + py, (bw * 2 + mw) * 14 + px
      assert u[r, col] == frames[t, y, x, c], (r, col)


def test_image_is_one_frame_repeated():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
  pv, grid = preprocess_image(img, min_pixels=56 * 56, max_pixels=200704)
  pv2, grid2 = preprocess_video(np.stack([img, img]), min_pixels=56 * 56, max_pixels=200704)
  # smart_resize(70, 90) = (56, 84): Python rounds 70/28 = 2.5 half to even -> 2
  np.testing.assert_array_equal(grid, [1, 4, 6])
  np.testing.assert_array_equal(pv, pv2)
  halves = pv.reshape(-1, 3, 2, 196)
  np.testing.assert_array_equal(halves[:, :, 0], halves[:, :, 1])


def test_second_per_grid_and_errors():
  clip = VideoClip(np.zeros((2, 4, 4, 3), np.uint8), 4.0, 10, np.array([0, 5]))
  assert second_per_grid(clip) == 0.5
  assert second_per_grid(VideoClip(clip.frames, None, 2, np.array([0, 1]))) == 1.0
  with pytest.raises(ValueError, match="uint8"):
    preprocess_video(np.zeros((2, 8, 8, 3), np.float32), min_pixels=3136, max_pixels=200704)


def test_float_band_path_equals_int_path(monkeypatch):
  from deepintuit_jax.data import video_preprocess as vp
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (2, 45, 300, 3), dtype=np.uint8)
  cases = [(45, 121), (20, 28), (90, 700), (45, 12)]  # down, down, up, heavy down
  fast = [vp.resize_bicubic_aa(x, *hw) for hw in cases]
  monkeypatch.setattr(vp, "_aa_bands", lambda a, b: None)  # force the int32 path
  for hw, f in zip(cases, fast):
    np.testing.assert_array_equal(vp.resize_bicubic_aa(x, *hw), f)
