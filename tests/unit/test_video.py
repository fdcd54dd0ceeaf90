"""Video decoding and frame sampling: hand-computed indices, seeking, frame sources, bad input."""
import os
import zipfile

import cv2
import numpy as np
import pytest

from deepintuit_jax.data import errors, video_decode
from deepintuit_jax.data.errors import BadSample
from deepintuit_jax.data.video import (UNSUPPORTED_FORMAT, load_video, natural_key,
                                       preprocess_video, sample_indices_fps,
                                       sample_indices_release)


def colour(i: int) -> np.ndarray:
  """RGB colour that encodes frame number i (neighbours differ by >= 37 per channel)."""
  return np.array([(i * 37) % 256, (i * 91) % 256, (i * 53) % 256], np.uint8)


def write_mp4(path, n, size=(64, 48), fps=25.0, fourcc="mp4v"):
  w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
  for i in range(n):
    w.write(np.broadcast_to(colour(i)[::-1], (size[1], size[0], 3)).copy())  # BGR
  w.release()
  return str(path)


def jpg(rgb: np.ndarray) -> bytes:
  return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def frame_numbers(frames: np.ndarray, candidates: int) -> np.ndarray:
  """Decode the frame number of each frame from its mean colour (nearest of `candidates`)."""
  means = frames.reshape(len(frames), -1, 3).mean(1)
  table = np.stack([colour(i) for i in range(candidates)]).astype(np.float64)
  return np.abs(means[:, None, :] - table[None]).sum(-1).argmin(1)


# ---------------------------------------------------------------- sampling rules

@pytest.mark.parametrize("n,max_frames,want", [
    (100, 4, [0, 33, 66, 99]),       # linspace(0, 99, 4) = 0, 33, 66, 99
    (10, 4, [0, 3, 6, 9]),
    (7, 4, [0, 2, 4, 6]),
    (11, 3, [0, 5, 10]),
    (9, 4, [0, 2, 5, 8]),            # 0, 2.67, 5.33, 8 floored
    (5, 32, [0, 1, 2, 3, 4]),        # odd count: all (preprocessing repeats the last)
    (6, 32, [0, 1, 2, 3, 4, 5]),
    (32, 32, list(range(32))),
    (1, 32, [0]),
])
def test_release_rule(n, max_frames, want):
  np.testing.assert_array_equal(sample_indices_release(n, max_frames), want)


def test_release_rule_32_of_1000():
  idx = sample_indices_release(1000, 32)
  assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 999
  assert idx[1] == 32 and idx[2] == 64  # 999/31 = 32.23 -> 32, 64.45 -> 64


@pytest.mark.parametrize("n,vfps,kw,want", [
    (300, 25.0, {}, [13 * i for i in range(24)]),       # 12 s * 2 fps = 24, step 299/23 = 13
    (30, 30.0, {}, [0, 10, 19, 29]),                     # 1 s -> 2 -> min 4; 9.67 -> 10
    (3, 30.0, {}, [0, 2]),                               # max floor2(3) = 2
    (5, 1.0, {}, [0, 1, 3, 4]),                          # 10 -> capped to 4
    (100, 10.0, {"min_frames": 5, "fps": 0.2}, [0, 20, 40, 59, 79, 99]),  # 2 -> ceil2(5)=6
    (100, 10.0, {"max_frames": 7}, [0, 20, 40, 59, 79, 99]),  # 20 -> max floor2(7)=6
    (100, 10.0, {"fps": 0.5}, [0, 33, 66, 99]),          # 10 s * 0.5 = 5 -> floor2 = 4
    (1, 10.0, {}, [0, 0]),
])
def test_fps_rule(n, vfps, kw, want):
  np.testing.assert_array_equal(sample_indices_fps(n, vfps, **kw), want)


def test_natural_sort():
  names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "Frame_3.jpg"]
  assert sorted(names, key=natural_key) == ["frame_1.jpg", "frame_2.jpg", "Frame_3.jpg",
                                            "frame_10.jpg"]


# ---------------------------------------------------------------- video files

@pytest.fixture(scope="module")
def long_mp4(tmp_path_factory):
  return write_mp4(tmp_path_factory.mktemp("v") / "long.mp4", 250, fps=25.0)


def test_mp4_seek_returns_right_frames(long_mp4, monkeypatch):
  def no_sequential(path):
    raise AssertionError("fell back to sequential decoding")
  monkeypatch.setattr(video_decode, "_read_all", no_sequential)
  clip = load_video(long_mp4, max_frames=8)  # gaps of ~35 frames > _GRAB_GAP: seeks
  want = [0, 35, 71, 106, 142, 177, 213, 249]  # floor(k * 249 / 7)
  np.testing.assert_array_equal(clip.indices, want)
  np.testing.assert_array_equal(frame_numbers(clip.frames, 250), want)
  assert clip.frames.shape == (8, 48, 64, 3) and clip.frames.dtype == np.uint8
  assert clip.num_source_frames == 250
  assert clip.fps == pytest.approx(8 / 250 * 25.0)


def test_mp4_grab_and_fps_sampling(long_mp4):
  clip = load_video(long_mp4, seek=False, sampling="fps", fps=1.0, max_frames=16)
  want = [0, 28, 55, 83, 111, 138, 166, 194, 221, 249]  # 10 s * 1 fps; round(k * 249 / 9)
  np.testing.assert_array_equal(clip.indices, want)
  np.testing.assert_array_equal(frame_numbers(clip.frames, 250), want)


def test_short_avi_odd_count(tmp_path):
  path = write_mp4(tmp_path / "short.avi", 7, fps=10.0, fourcc="MJPG")
  clip = load_video(path)
  np.testing.assert_array_equal(clip.indices, [0, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(frame_numbers(clip.frames, 7), [0, 1, 2, 3, 4, 5, 6])
  assert clip.fps == pytest.approx(10.0)  # every frame: the source's rate, as a server sees


def test_bad_seek_falls_back_to_sequential(long_mp4, monkeypatch):
  monkeypatch.setattr(video_decode, "_seek_is_exact", lambda cap, i: False)
  clip = load_video(long_mp4, max_frames=8)
  want = [0, 35, 71, 106, 142, 177, 213, 249]
  np.testing.assert_array_equal(frame_numbers(clip.frames, 250), want)


# ---------------------------------------------------------------- frame zips and folders

def test_zip_natural_order_and_size_unification(tmp_path):
  path = tmp_path / "frames.zip"
  order = [5, 0, 11, 2, 1, 10, 3, 4, 9, 6, 8, 7]  # written out of order
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("clip/", "")
    zf.writestr("__MACOSX/clip/._frame_1.png", b"junk")
    for i in order:
      size = (30, 40) if i != 3 else (60, 20)  # frame 3 has another size
      zf.writestr(f"clip/frame_{i}.png", jpg(np.broadcast_to(colour(i), size + (3,)).copy()))
  clip = load_video(str(path), max_frames=4)
  np.testing.assert_array_equal(clip.indices, [0, 3, 7, 11])
  np.testing.assert_array_equal(frame_numbers(clip.frames, 12), [0, 3, 7, 11])
  assert clip.frames.shape == (4, 30, 40, 3) and clip.fps is None
  assert clip.num_source_frames == 12


def test_folder_single_frame_fills_the_temporal_patch(tmp_path):
  (tmp_path / "f").mkdir()
  cv2.imwrite(str(tmp_path / "f" / "img_0001.jpg"), np.full((16, 24, 3), 200, np.uint8))
  clip = load_video(str(tmp_path / "f"))
  assert clip.frames.shape == (1, 16, 24, 3)
  np.testing.assert_array_equal(clip.indices, [0])
  # preprocessing repeats it: the same patches as the frame given twice
  one, grid = preprocess_video(clip.frames, min_pixels=56 * 56, max_pixels=200704)
  two, _ = preprocess_video(clip.frames[[0, 0]], min_pixels=56 * 56, max_pixels=200704)
  assert grid[0] == 1  # one temporal step
  np.testing.assert_array_equal(one, two)


# ---------------------------------------------------------------- bad input

def _raises(path, kind, needle=None):
  with pytest.raises(BadSample) as e:
    load_video(str(path), item_id="item-7")
  assert e.value.kind == kind, str(e.value)
  assert str(path) in str(e.value) and "item-7" in str(e.value)
  if needle:
    assert needle in str(e.value)
  return e.value


def test_bad_inputs(tmp_path, long_mp4):
  _raises(tmp_path / "nope.mp4", errors.MISSING_FILE)
  data = open(long_mp4, "rb").read()
  (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
  _raises(tmp_path / "trunc.mp4", errors.CORRUPT_VIDEO)
  (tmp_path / "garbage.mkv").write_bytes(os.urandom(4000))
  _raises(tmp_path / "garbage.mkv", errors.CORRUPT_VIDEO)
  (tmp_path / "empty.mp4").write_bytes(b"")
  _raises(tmp_path / "empty.mp4", errors.CORRUPT_VIDEO)
  avi = write_mp4(tmp_path / "t.avi", 60, fps=10.0, fourcc="MJPG")
  d = open(avi, "rb").read()
  (tmp_path / "trunc.avi").write_bytes(d[: len(d) // 2])
  _raises(tmp_path / "trunc.avi", errors.CORRUPT_VIDEO, "truncated")
  (tmp_path / "notes.txt").write_text("hi")
  _raises(tmp_path / "notes.txt", UNSUPPORTED_FORMAT, ".txt")
  (tmp_path / "empty_dir").mkdir()
  _raises(tmp_path / "empty_dir", errors.NO_FRAMES)


def test_bad_zips(tmp_path):
  (tmp_path / "notzip.zip").write_bytes(b"this is not a zip file at all")
  _raises(tmp_path / "notzip.zip", errors.BAD_ZIP)
  with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
    pass
  _raises(tmp_path / "empty.zip", errors.NO_FRAMES)
  with zipfile.ZipFile(tmp_path / "corrupt.zip", "w") as zf:
    zf.writestr("f_1.jpg", jpg(np.zeros((8, 8, 3), np.uint8)))
    zf.writestr("f_2.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
  _raises(tmp_path / "corrupt.zip", errors.BAD_ZIP, "f_2.jpg")
