"""Video decoding and frame sampling (OpenCV), for video files, frame folders and frame zips.

Public entry: `load_video(path, sampling=..., ...) -> VideoClip` (re-exported by `video.py`).
Only the sampled frames are decoded where the source allows it: zips and folders decode just
those images; video files seek (checked) or skip with `grab()` (no colour conversion).
Every failure raises `BadSample` naming the item, the file and the reason.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
import zlib

import cv2
import numpy as np

from deepintuit_jax.data import errors
from deepintuit_jax.data.errors import BadSample

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAMPLING = ("release", "fps")
# Kind for a path whose type we cannot read (not a video, zip or folder). errors.py allows
# readers to add kinds.
UNSUPPORTED_FORMAT = "unsupported_format"

# A gap of at most this many frames between two wanted frames is skipped with grab()
# (decode, no conversion); larger gaps seek.
_GRAB_GAP = 16
# Hard bound on sequential reads, so a file whose frame count is wrong or absent cannot loop.
_MAX_SEQUENTIAL_FRAMES = 200_000


@dataclasses.dataclass(frozen=True)
class VideoClip:
  """Sampled frames of one video.

  frames: uint8 RGB [T, H, W, 3].
  fps: frames per second of the *sampled* clip (None when unknown, e.g. frame zips/folders).
  num_source_frames: number of frames in the source.
  indices: int64 [T], source frame index of each sampled frame.
  """
  frames: np.ndarray
  fps: float | None
  num_source_frames: int
  indices: np.ndarray


def natural_key(name: str) -> list:
  """Sort key where digit runs compare as numbers: frame_2.jpg < frame_10.jpg."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower())
          for t in re.split(r"(\d+)", name) if t]


def sample_indices_release(num_frames: int, max_frames: int = 32) -> np.ndarray:
  """The DeepIntuit release's rule, with Qwen's for odd counts -> int64 [k] source indices.

  More than `max_frames`: floor(linspace(0, n-1, max_frames)). Otherwise every frame, an odd
  count included: preprocessing then repeats the last frame to fill the temporal patch, as
  transformers' Qwen2-VL video processor (which vLLM runs) does with the frames it is given,
  so one video gives the same frames and positions here, in transformers and in vLLM. (The
  release dropped the last of an odd count and duplicated a single frame; the sampled clip's
  rate, and with it the rope's seconds per grid, then differed from what a server computes.)
  """
  if num_frames <= 0:
    raise ValueError(f"num_frames must be positive, got {num_frames}")
  if max_frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  if num_frames > max_frames:
    return np.floor(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64)
  return np.arange(num_frames, dtype=np.int64)


def sample_indices_fps(num_frames: int, video_fps: float, *, fps: float = 2.0,
                       min_frames: int = 4, max_frames: int = 32,
                       frame_factor: int = 2) -> np.ndarray:
  """Qwen's fps rule (qwen-vl-utils `smart_nframes` + linspace) -> int64 [k] source indices.

  k = duration * fps clamped to [ceil2(min_frames), floor2(min(max_frames, n))] and to n,
  then floored to a multiple of `frame_factor`; indices round(linspace(0, n-1, k)).
  Fewer than `frame_factor` source frames: the frames are repeated up to `frame_factor`.
  """
  if num_frames <= 0:
    raise ValueError(f"num_frames must be positive, got {num_frames}")
  if not video_fps or video_fps <= 0:
    raise ValueError(f"video_fps must be positive, got {video_fps}")
  if num_frames < frame_factor:
    return np.arange(frame_factor, dtype=np.int64) * num_frames // frame_factor
  lo = math.ceil(min_frames / frame_factor) * frame_factor
  hi = math.floor(min(max_frames, num_frames) / frame_factor) * frame_factor
  k = num_frames / video_fps * fps
  k = min(max(k, lo), hi, num_frames)
  k = max(frame_factor, math.floor(k / frame_factor) * frame_factor)
  return np.round(np.linspace(0, num_frames - 1, k)).astype(np.int64)


def _sample(n: int, source_fps: float | None, sampling: str, max_frames: int, fps: float,
            min_frames: int) -> tuple[np.ndarray, float | None]:
  """Indices and the sampled clip's fps (k / n * source fps, as qwen-vl-utils reports it)."""
  if sampling == "release":
    idx = sample_indices_release(n, max_frames)
  else:  # "fps": an unknown source rate is taken as the target rate (every frame a sample)
    idx = sample_indices_fps(n, source_fps or fps, fps=fps, min_frames=min_frames,
                             max_frames=max_frames)
  clip_fps = None if not source_fps else len(idx) / n * float(source_fps)
  return idx, clip_fps


def _unify_sizes(frames: list[np.ndarray]) -> np.ndarray:
  """Stack RGB frames, resizing any of another size to the first's (bilinear) -> [T, H, W, 3]."""
  h, w = frames[0].shape[:2]
  out = [f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)
         for f in frames]
  return np.ascontiguousarray(np.stack(out))


def _decode_image(data: bytes, what: str, kind: str, item_id, path) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB [H, W, 3]."""
  img = None
  if data:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None or img.size == 0:
    raise BadSample(f"cannot decode image {what!r}", kind=kind, item_id=item_id, path=path)
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _is_image_name(name: str) -> bool:
  base = os.path.basename(name)
  return (not base.startswith(".") and not name.startswith("__MACOSX/")
          and base.lower().endswith(IMAGE_EXTENSIONS))


def _load_zip(path, item_id, pick) -> VideoClip:
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise BadSample(f"unreadable zip: {e}", kind=errors.BAD_ZIP, item_id=item_id,
                    path=path) from e
  with zf:
    names = sorted((i.filename for i in zf.infolist()
                    if not i.is_dir() and _is_image_name(i.filename)), key=natural_key)
    if not names:
      raise BadSample("zip holds no image frames", kind=errors.NO_FRAMES, item_id=item_id,
                      path=path)
    idx, clip_fps = pick(len(names), None)
    cache: dict[int, np.ndarray] = {}
    for i in np.unique(idx):
      try:
        data = zf.read(names[i])
      except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise BadSample(f"cannot read {names[i]!r} from zip: {e}", kind=errors.BAD_ZIP,
                        item_id=item_id, path=path) from e
      cache[int(i)] = _decode_image(data, names[i], errors.BAD_ZIP, item_id, path)
  frames = _unify_sizes([cache[int(i)] for i in idx])
  return VideoClip(frames, clip_fps, len(names), idx)


def _load_folder(path, item_id, pick) -> VideoClip:
  names = sorted((n for n in os.listdir(path) if _is_image_name(n)
                  and os.path.isfile(os.path.join(path, n))), key=natural_key)
  if not names:
    raise BadSample("folder holds no image frames", kind=errors.NO_FRAMES, item_id=item_id,
                    path=path)
  idx, clip_fps = pick(len(names), None)
  cache: dict[int, np.ndarray] = {}
  for i in np.unique(idx):
    fname = os.path.join(path, names[i])
    try:
      with open(fname, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadSample(f"cannot read frame {names[i]!r}: {e}", kind=errors.MISSING_FILE,
                      item_id=item_id, path=path) from e
    cache[int(i)] = _decode_image(data, names[i], errors.CORRUPT_VIDEO, item_id, path)
  frames = _unify_sizes([cache[int(i)] for i in idx])
  return VideoClip(frames, clip_fps, len(names), idx)


def _read_all(path: str) -> list[np.ndarray]:
  """Every frame, sequentially (bounded), as BGR arrays."""
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  out = []
  try:
    while cap.isOpened() and len(out) < _MAX_SEQUENTIAL_FRAMES:
      ok, frame = cap.read()
      if not ok or frame is None:
        break
      out.append(frame)
  finally:
    cap.release()
  return out


def _seek_is_exact(cap, i: int, back: int = 3) -> bool:
  """True when seeking straight to frame i gives the same pixels as seeking to i-back and
  stepping forward. A container that only seeks to keyframes lands both on the same keyframe
  and fails this (unless the video is static, where the difference does not matter)."""
  cap.set(cv2.CAP_PROP_POS_FRAMES, i)
  ok_a, a = cap.read()
  cap.set(cv2.CAP_PROP_POS_FRAMES, i - back)
  ok_b = all(cap.grab() for _ in range(back))
  ok_b, b = cap.read() if ok_b else (False, None)
  return bool(ok_a and ok_b and a.shape == b.shape and np.array_equal(a, b))


def _read_indices(cap, idx: np.ndarray, seek: bool) -> dict[int, np.ndarray] | None:
  """Decode the frames at sorted unique `idx` from an open capture (BGR).

  Small gaps are skipped with grab(); large ones seek with CAP_PROP_POS_FRAMES when `seek`.
  Returns None when a read fails or a seek lands elsewhere (caller falls back to sequential).
  """
  out: dict[int, np.ndarray] = {}
  pos = 0  # index of the next frame read() would return
  verified = False
  for i in (int(x) for x in idx):
    if seek and i - pos > _GRAB_GAP:
      if not verified:
        if not _seek_is_exact(cap, i):
          return None
        verified = True
      cap.set(cv2.CAP_PROP_POS_FRAMES, i)
      if int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) != i:
        return None
      pos = i
    while pos < i:
      if not cap.grab():
        return None
      pos += 1
    ok, frame = cap.read()
    if not ok or frame is None:
      return None
    pos += 1
    if seek and int(round(cap.get(cv2.CAP_PROP_POS_FRAMES))) != pos:
      return None  # the container's notion of position disagrees: do not trust seeking
    out[i] = frame
  return out


def _load_video_file(path, item_id, pick, seek: bool) -> VideoClip:
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  try:
    if not cap.isOpened():
      raise BadSample("OpenCV cannot open the video (corrupt, truncated or unsupported codec)",
                      kind=errors.CORRUPT_VIDEO, item_id=item_id, path=path)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    src_fps = src_fps if 0 < src_fps < 1000 else None
    got = None
    if n > 0:
      idx, clip_fps = pick(n, src_fps)
      got = _read_indices(cap, np.unique(idx), seek)
  finally:
    cap.release()
  if got is None:
    # Unknown or wrong frame count, failed read or untrustworthy seek: decode sequentially.
    all_frames = _read_all(path)
    header_n, n = n, len(all_frames)
    if n == 0:
      raise BadSample("no decodable frames (corrupt, truncated or empty video)",
                      kind=errors.NO_FRAMES, item_id=item_id, path=path)
    if n >= _MAX_SEQUENTIAL_FRAMES:
      raise BadSample(f"cannot seek in this file and it has over {_MAX_SEQUENTIAL_FRAMES} frames "
                      "(sequential decoding is bounded)", kind=errors.CORRUPT_VIDEO,
                      item_id=item_id, path=path)
    if header_n > 0 and n < 0.9 * header_n - 1:
      # Header counts may be estimates off by a few frames; a large shortfall is truncation.
      raise BadSample(f"truncated or corrupt: the header says {header_n} frames but only {n} "
                      "decode", kind=errors.CORRUPT_VIDEO, item_id=item_id, path=path)
    idx, clip_fps = pick(n, src_fps)
    got = {int(i): all_frames[int(i)] for i in np.unique(idx)}
  frames = _unify_sizes([cv2.cvtColor(got[int(i)], cv2.COLOR_BGR2RGB) for i in idx])
  return VideoClip(frames, clip_fps, n, idx)


def load_video(path: str, *, sampling: str = "release", max_frames: int = 32,
               fps: float = 2.0, min_frames: int = 4, item_id: str | None = None,
               seek: bool = True) -> VideoClip:
  """Decode and sample a video file, a folder of frames or a zip of frames.

  Frames of folders/zips are ordered by natural sort of their names. `sampling` is "release"
  (DeepIntuit's rule, `sample_indices_release`) or "fps" (Qwen's, `sample_indices_fps`; for
  frame folders/zips, whose rate is unknown, every frame counts as one sample at `fps`).
  `seek=False` forces grab()-skipping instead of seeking in video files.
  Returns a VideoClip with frames uint8 RGB [T, H, W, 3] (all of the first frame's size).
  Raises BadSample (kinds missing_file, corrupt_video, no_frames, bad_zip, unsupported_format).
  """
  if sampling not in SAMPLING:
    raise ValueError(f"sampling={sampling!r}: must be one of {SAMPLING}")

  def pick(n: int, source_fps: float | None):
    return _sample(n, source_fps, sampling, max_frames, fps, min_frames)

  path = os.fspath(path)
  if not os.path.exists(path):
    raise BadSample("file does not exist", kind=errors.MISSING_FILE, item_id=item_id, path=path)
  if os.path.isdir(path):
    return _load_folder(path, item_id, pick)
  low = path.lower()
  if low.endswith(".zip"):
    return _load_zip(path, item_id, pick)
  if low.endswith(VIDEO_EXTENSIONS):
    if os.path.getsize(path) == 0:
      raise BadSample("empty video file", kind=errors.CORRUPT_VIDEO, item_id=item_id, path=path)
    return _load_video_file(path, item_id, pick, seek)
  raise BadSample(f"unsupported file type {os.path.splitext(path)[1]!r} (expected one of "
                  f"{VIDEO_EXTENSIONS + ('.zip',)} or a folder of frames)",
                  kind=UNSUPPORTED_FORMAT, item_id=item_id, path=path)
