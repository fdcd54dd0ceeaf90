"""Record -> model example (runs in Grain worker processes) and the pipeline options.

`ExampleBuilder(pos, record_index)` resolves the video path, decodes and samples the video,
runs Qwen's preprocessing and tokenises the conversation. It never raises for a bad sample:
a `BadSample` (missing file, corrupt video, no frames, bad zip, bad record, unknown label,
too long) comes back as a small picklable marker `{"pos", "bad": (reason, kind, item, path)}`
so that the main process decides (raise in "error" mode, count in "skip" mode). A
MemoryError comes back as an `"oom"` marker (the main process stops with one line naming the
item). Other exceptions are bugs, not bad data: they come back as an `"error"` marker that
the main process always raises, naming the item. Nothing here imports jax (workers start
fast).
"""
from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepintuit_jax.data import chat, errors
from deepintuit_jax.data.errors import BadSample

SAMPLINGS = ("release", "fps")
DEFAULT_LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """How records become batches.

  Attributes:
    video_root: where relative (or foreign absolute) video paths are looked up.
    sampling / max_frames / fps / min_frames: frame sampling (`video.load_video`).
    min_pixels / max_pixels: per-frame pixel bounds of Qwen's smart resize.
    max_seq_len: longer examples are bad samples of kind `too_long`.
    on_bad_sample: "error" (stop, naming item, path and reason) or "skip" (count by kind).
    length_buckets: token lengths a batch is right-padded to (the smallest that fits);
      clipped to max_seq_len, which is always the last bucket.
    patch_buckets: vision patch counts a batch's videos are padded to (multiples of 4);
      None = powers of two from 256. A batch beyond the largest is padded to a multiple of it.
    max_frame_patches: row length of the full-attention blocks (largest h*w of one frame, in
      patches); None = max_pixels // 14**2, the most smart resize allows.
    labels: when given, a record whose label is not one of them is `unknown_label`.
    num_workers: Grain worker processes decoding videos (0 = in the main process).
    num_threads: decoding threads per worker (or in-process); prefetch_batches: how many
      batches' worth of examples each worker (or the in-process reader) keeps ready.
    seed / shuffle: per-epoch shuffling (a different order each epoch, same for a seed).
    drop_remainder: drop an epoch's last partial batch (else pad it with dummy rows).
    system: the system turn (Qwen's default).
    train_end_of_turn: `<|im_end|>` + newline after the response are loss targets (SFT, as
      the release); False = response tokens only (calibration's single label token).
  """
  video_root: str | None = None
  sampling: str = "release"
  max_frames: int = 32
  fps: float = 2.0
  min_frames: int = 4
  min_pixels: int = 4 * 28 * 28
  max_pixels: int = 256 * 28 * 28
  max_seq_len: int = 8192
  on_bad_sample: str = "error"
  length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
  patch_buckets: tuple[int, ...] | None = None
  max_frame_patches: int | None = None
  labels: tuple[str, ...] | None = None
  num_workers: int = 0
  num_threads: int = 1
  prefetch_batches: int = 2
  seed: int = 0
  shuffle: bool = True
  drop_remainder: bool = True
  system: str = chat.DEFAULT_SYSTEM
  train_end_of_turn: bool = True

  def __post_init__(self):
    errors.check_on_bad_sample(self.on_bad_sample)
    if self.sampling not in SAMPLINGS:
      raise ValueError(f"sampling={self.sampling!r}: must be one of {SAMPLINGS}")
    for name in ("max_frames", "min_frames", "min_pixels", "max_pixels", "max_seq_len",
                 "num_threads", "prefetch_batches"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    if self.fps <= 0:
      raise ValueError(f"fps={self.fps} must be positive")
    if not 0 <= self.seed < 2 ** 32:
      raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
    if self.num_workers < 0:
      raise ValueError(f"num_workers={self.num_workers} must be >= 0")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
    if not self.length_buckets or any(int(b) <= 0 for b in self.length_buckets):
      raise ValueError(f"length_buckets={self.length_buckets}: need positive lengths")
    if self.patch_buckets is not None and (
        not self.patch_buckets or any(int(b) <= 0 or int(b) % 4 for b in self.patch_buckets)):
      raise ValueError(f"patch_buckets={self.patch_buckets}: need positive multiples of 4")
    if self.max_frame_patches is not None and self.max_frame_patches <= 0:
      raise ValueError(f"max_frame_patches={self.max_frame_patches} must be positive")
    object.__setattr__(self, "length_buckets", tuple(sorted({int(b) for b in (
        *self.length_buckets, self.max_seq_len) if int(b) <= self.max_seq_len})))
    if self.patch_buckets is not None:
      object.__setattr__(self, "patch_buckets", tuple(sorted({int(b) for b in self.patch_buckets})))
    if self.labels is not None:
      object.__setattr__(self, "labels", tuple(self.labels))

  def length_bucket(self, n: int, steps: int = 1) -> int:
    """The smallest length bucket >= n (n <= max_seq_len). steps > 1: the smallest length
    >= n on a finer grid, each bucket interval (previous bucket, bucket] (the first from 0)
    cut into `steps` equal steps rounded up to a multiple of 8; so at most `steps` lengths
    per bucket, and never more padding than the bucket's."""
    lo = 0
    for b in self.length_buckets:
      if b >= n:
        if steps <= 1:
          return b
        step = -(-(b - lo) // (8 * steps)) * 8
        return min(b, lo + max(-(-(n - lo) // step), 1) * step)
      lo = b
    raise ValueError(f"sequence of {n} tokens is longer than max_seq_len={self.max_seq_len}")

  def patch_bucket(self, n: int) -> int:
    """The patch count a batch holding `n` real patches is padded to."""
    n = max(int(n), 4)
    if self.patch_buckets is None:
      return max(256, 1 << (n - 1).bit_length())
    for b in self.patch_buckets:
      if b >= n:
        return b
    top = self.patch_buckets[-1]
    return -(-n // top) * top

  def frame_patches(self, patch_size: int = 14) -> int:
    return int(self.max_frame_patches or self.max_pixels // patch_size ** 2)


def bad_marker(pos: int, err: BadSample) -> dict[str, Any]:
  return {"pos": pos, "bad": (err.reason, err.kind, err.item_id, err.path)}


def marker_error(marker: dict[str, Any]) -> BadSample:
  reason, kind, item_id, path = marker["bad"]
  return BadSample(reason, kind=kind, item_id=item_id, path=path)


class ExampleBuilder:
  """Picklable `(pos, record_index) -> example | marker` run by Grain (in workers).

  An example: input_ids [T] int32, loss_mask [T] int32, pixel_values_videos [N, patch_dim]
  float32, video_grid_thw [1, 3] int32, second_per_grid_ts [1] float32, label (str or ""),
  item_id (str), pos (int, the position in the epoch-repeated stream).
  """

  def __init__(self, records: Sequence[Any], tokenizer, options: PipelineOptions, *,
               patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
               for_generation: bool = False):
    self.records = list(records)
    self.tokenizer, self.options, self.for_generation = tokenizer, options, for_generation
    self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
    self.merge_size = merge_size

  def __call__(self, pos: int, index: int) -> dict[str, Any]:
    rec = self.records[int(index)]
    item_id = getattr(rec, "item_id", None)
    path = getattr(rec, "video", None)
    try:
      out = self.build(rec)
    except BadSample as e:
      return bad_marker(pos, e.with_item(item_id, path))
    except MemoryError:  # not a bug: the main process stops with one line naming the item
      return {"pos": pos, "oom": (item_id, path)}
    except Exception as e:  # a bug or an unforeseen failure: always raised in the main process
      return {"pos": pos, "error": (item_id, path, f"{type(e).__name__}: {e}",
                                    traceback.format_exc(limit=6))}
    out["pos"] = pos
    return out

  def _check_record(self, rec) -> None:
    item_id = getattr(rec, "item_id", None)
    for field in ("item_id", "video", "prompt"):
      value = getattr(rec, field, None)
      if not isinstance(value, str) or not value:
        raise BadSample(f"record field {field!r} is missing or empty", kind=errors.BAD_RECORD,
                        item_id=item_id)
    response = getattr(rec, "response", None)
    if not self.for_generation and (not isinstance(response, str) or not response):
      raise BadSample("record has no assistant response to train on", kind=errors.BAD_RECORD,
                      item_id=item_id)
    labels = self.options.labels
    if labels is not None and rec.label not in labels:
      raise BadSample(f"label {rec.label!r} is not one of the classes {list(labels)}",
                      kind=errors.UNKNOWN_LABEL, item_id=item_id)

  def build(self, rec) -> dict[str, Any]:
    """The example of one record; raises BadSample."""
    from deepintuit_jax.data import annotations, video  # imported in the worker

    o = self.options
    self._check_record(rec)
    path = annotations.resolve_video_path(rec.video, o.video_root, item_id=rec.item_id)
    clip = video.load_video(path, sampling=o.sampling, max_frames=o.max_frames, fps=o.fps,
                            min_frames=o.min_frames, item_id=rec.item_id)
    pixels, grid = video.preprocess_video(
        clip.frames, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
        patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
        merge_size=self.merge_size)
    grid = np.asarray(grid, np.int64).reshape(3)
    seconds = video.second_per_grid(clip, temporal_patch_size=self.temporal_patch_size,
                                    default_fps=o.fps)
    n_patches = int(grid.prod())
    if int(grid[1] * grid[2]) > o.frame_patches(self.patch_size):
      raise BadSample(f"a frame of {int(grid[1] * grid[2])} patches exceeds max_frame_patches="
                      f"{o.frame_patches(self.patch_size)}", kind=errors.TOO_LONG,
                      item_id=rec.item_id, path=path)
    enc = chat.encode_example(self.tokenizer, rec.prompt,
                              None if self.for_generation else rec.response,
                              num_video_tokens=[n_patches // self.merge_size ** 2],
                              system=o.system, for_generation=self.for_generation,
                              train_end_of_turn=o.train_end_of_turn)
    if len(enc["input_ids"]) > o.max_seq_len:
      raise BadSample(f"{len(enc['input_ids'])} tokens ({n_patches // self.merge_size ** 2} of "
                      f"them video) exceed max_seq_len={o.max_seq_len}", kind=errors.TOO_LONG,
                      item_id=rec.item_id, path=path)
    return {"input_ids": enc["input_ids"], "loss_mask": enc["loss_mask"],
            "pixel_values_videos": np.asarray(pixels, np.float32),
            "video_grid_thw": grid.astype(np.int32)[None],
            "second_per_grid_ts": np.asarray([seconds], np.float32),
            "label": rec.label if isinstance(rec.label, str) else "",
            "item_id": rec.item_id}


class PosMap:
  """`(pos, record_index) -> builder(pos, record_index)` for `MapDataset.map_with_index`.

  Defined here, not in pipeline.py, so that unpickling it in a spawned Grain worker imports
  only this light module (no jax)."""

  def __init__(self, builder: ExampleBuilder):
    self.builder = builder

  def __call__(self, pos: int, index: int) -> dict[str, Any]:
    return self.builder(pos, index)
