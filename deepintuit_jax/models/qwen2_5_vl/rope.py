"""3D (temporal, height, width) rope position ids of Qwen2.5-VL, on the host in NumPy.

Text tokens get the same position on all three axes, increasing by one. A run of image
(video) pad tokens holds one or more images (videos), each a `[t, h/m, w/m]` grid of
merged tokens whose positions are `start + (t_pos, row, col)`; for videos
`t_pos = int(t_index * second_per_grid_t * tokens_per_second)` (float32, truncated).

Three rules are in use for where the text after a vision chunk starts (they differ for a
video whose scaled temporal extent exceeds its spatial one: every 32-frame clip at 2 fps):
* "qwen" (the default, `Qwen2_5_VLConfig.rope_convention`): the original Qwen2.5-VL code
  (transformers 4.49-4.51) and vLLM: one past the largest position of the chunk; padding 1.
* "transformers_5.2" (transformers 4.52-5.2): as "qwen", but each video's seconds per grid
  are truncated to a whole number first (0.5 s -> 0, 1.125 s -> 1); padding 0.
* "transformers_5.3" (transformers >= 5.3): the next position is `start + max(h, w) / m`;
  padding 0.
All return `rope_deltas = max(position) + 1 - number of real tokens`, so that decoding
continues at `cache_position + rope_deltas`. Only NumPy is imported (serving helpers use
this module next to torch), so the config is duck-typed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

CONVENTIONS = ("qwen", "transformers_5.2", "transformers_5.3")
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


class _Grids:
  """Consumes the grids of one modality in order across the whole batch."""

  def __init__(self, kind: str, grid_thw, merge: int, seconds=None):
    self.kind, self.merge, self.next = kind, merge, 0
    self.grid = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64)
    if self.grid.ndim != 2 or self.grid.shape[1] != 3:
      raise ValueError(f"{kind}_grid_thw must have shape [n, 3], got {self.grid.shape}")
    self.tokens = self.grid.prod(-1) // merge ** 2  # merged tokens per grid
    self.seconds = None
    if seconds is not None:
      self.seconds = np.asarray(seconds, np.float32).reshape(-1)
      if self.seconds.size < len(self.grid):
        raise ValueError(f"second_per_grid_ts has {self.seconds.size} entries for "
                         f"{len(self.grid)} videos")

  def take(self, run_len: int, where: str) -> list[int]:
    """Indices of the grids that make up a run of `run_len` pad tokens."""
    out, covered = [], 0
    while covered < run_len:
      if self.next >= len(self.grid):
        raise ValueError(f"{where}: a run of {run_len} {self.kind} tokens, but the "
                         f"{self.kind}_grid_thw rows are used up ({len(self.grid)} given)")
      covered += int(self.tokens[self.next])
      out.append(self.next)
      self.next += 1
    if covered != run_len:
      raise ValueError(
          f"{where}: a run of {run_len} {self.kind} tokens does not match {self.kind} grids "
          f"{self.grid[out].tolist()} ({covered} merged tokens); the number of {self.kind} "
          "pad tokens must equal t*h*w/merge**2 of each grid")
    return out

  def check_used(self):
    if self.next != len(self.grid):
      raise ValueError(f"{len(self.grid)} {self.kind} grids given but the input_ids hold "
                       f"{self.kind} tokens for only {self.next}")


def _grid_positions(grid: np.ndarray, merge: int, interval) -> np.ndarray:
  """[3, t*h/m*w/m] (t_pos, row, col) of one grid, before the start offset."""
  t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
  if interval is None:  # images: no temporal scaling
    t_pos = np.arange(t, dtype=np.int64)
  else:  # float32 product truncated toward zero, as torch's `.long()` on float32
    t_pos = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
  tt, hh, ww = np.meshgrid(t_pos, np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


def get_rope_index(config: Qwen2_5_VLConfig, input_ids, attention_mask=None,
                   image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                   *, convention: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """3D rope positions of a batch (host side).

  Args:
    config: the model config (token ids, spatial merge size, tokens_per_second).
    input_ids: [B, T] int; image / video pad tokens mark where vision features go.
    attention_mask: [B, T] (1 = real token) or None (all real); left or right padding.
    image_grid_thw / video_grid_thw: [n, 3] grids, in order of appearance over the batch.
    second_per_grid_ts: [n_videos] seconds per temporal grid (default 1.0 each).
    convention: one of CONVENTIONS (module docstring); None = `config.rope_convention`.
  Returns:
    position_ids [3, B, T] int32 (padded positions 1 with "qwen", else 0), rope_deltas [B]
    int32.
  """
  if convention is None:
    convention = config.rope_convention
  if convention not in CONVENTIONS:
    raise ValueError(f"convention {convention!r} not one of {CONVENTIONS}")
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
  b, t = ids.shape
  mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask) != 0
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  merge = config.vision.spatial_merge_size
  tps = np.float32(config.vision.tokens_per_second)
  grids = {_IMAGE: _Grids("image", image_grid_thw, merge),
           _VIDEO: _Grids("video", video_grid_thw, merge, second_per_grid_ts)}

  pad_value = 1 if convention == "qwen" else 0
  positions = np.full((3, b, t), pad_value, np.int64)
  deltas = np.zeros((b,), np.int64)
  for row in range(b):
    real = np.flatnonzero(mask[row])
    types = np.where(ids[row, real] == config.image_token_id, _IMAGE,
                     np.where(ids[row, real] == config.video_token_id, _VIDEO, _TEXT))
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1, [len(types)]])
    chunks, cur = [], 0
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
      kind = int(types[s])
      if kind == _TEXT:
        chunks.append(np.broadcast_to(np.arange(cur, cur + e - s), (3, e - s)))
        cur += e - s
        continue
      g = grids[kind]
      for i in g.take(e - s, f"input_ids row {row}, positions {real[s]}..{real[e - 1]}"):
        interval = None
        if kind == _VIDEO:
          spg = np.float32(1.0) if g.seconds is None else g.seconds[i]
          if convention == "transformers_5.2":  # cast to the int64 of the index tensor
            spg = np.trunc(spg)
          interval = np.float32(tps * spg)
        block = _grid_positions(g.grid[i], merge, interval) + cur
        chunks.append(block)
        if convention == "transformers_5.3":
          cur += int(max(g.grid[i, 1], g.grid[i, 2])) // merge
        else:
          cur = int(block.max()) + 1
    if chunks:
      flat = np.concatenate(chunks, axis=1)
      positions[:, row, real] = flat
      deltas[row] = int(flat.max()) + 1 - len(real)
  for g in grids.values():
    g.check_used()
  return positions.astype(np.int32), deltas.astype(np.int32)
