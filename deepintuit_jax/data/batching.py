"""Examples -> one padded batch (host side, NumPy), per the data contract in
docs/ARCHITECTURE.md.

Shapes come from a small set so that jitted steps recompile rarely: the token length is the
smallest length bucket that fits, the vision patch count is a patch bucket, and the vision
layout is built with `pad_to` and a fixed `max_frame_patches`, so its shapes depend only on
those two numbers. A batch with fewer real examples than `batch_size` is filled with dummy
rows (one attended pad token, loss_mask 0, no video); `num_real` counts the real rows, which
come first.

Grouped batches (`groups=G`, for data-parallel vision, see algorithms/sft.py): rows
[g*b, (g+1)*b) (b = batch_size / G) form group g; each group holds only its own videos,
padded to one patch bucket common to all groups, and every device array gets a leading
group axis. Several processes agree on the two buckets by passing `length=` / `patches=`
(the max over processes of `shape_needs`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.models.qwen2_5_vl import rope
from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from deepintuit_jax.models.qwen2_5_vl.vision_layout import vision_layout

# Keys that are not arrays of the device batch (keep them out of jitted functions).
HOST_KEYS = ("labels", "item_id", "num_real", "num_groups")


def shape_needs(examples: Sequence[dict[str, Any]], *, batch_size: int, options: PipelineOptions,
                groups: int = 1, length_steps: int = 1) -> tuple[int, int]:
  """(length bucket, patch bucket) these examples need, as `groups` groups of
  batch_size / groups rows (the patch bucket fits the largest group's videos).
  length_steps > 1: the length on the finer grid of `PipelineOptions.length_bucket`."""
  if groups < 1 or batch_size % groups:
    raise ValueError(f"batch_size {batch_size} is not a multiple of groups={groups}")
  per = batch_size // groups
  t = options.length_bucket(max(len(e["input_ids"]) for e in examples), length_steps)
  patches = max(sum(int(e["pixel_values_videos"].shape[0]) for e in examples[g * per:(g + 1) * per])
                for g in range(groups))
  return t, options.patch_bucket(patches)


def collate(examples: Sequence[dict[str, Any]], *, batch_size: int, options: PipelineOptions,
            model_config: Qwen2_5_VLConfig, pad_id: int, left_pad: bool = False,
            groups: int | None = None, length: int | None = None, patches: int | None = None
            ) -> dict[str, Any]:
  """Pads `examples` (1..batch_size of them) into one batch.

  Returns (B = batch_size, T = length bucket, Np = patch bucket, n = number of videos):
    input_ids [B, T] int32 (pad_id where padded; right-padded, or left-padded if left_pad),
    attention_mask [B, T] int32, loss_mask [B, T] int32 (next-token aligned, see chat.py),
    position_ids [3, B, T] int32 and rope_deltas [B] int32 (rope.get_rope_index),
    pixel_values_videos [Np, patch_dim] float32 (videos concatenated, zero padded),
    video_grid_thw [n, 3] int32, second_per_grid_ts [n] float32,
    video_layout (VisionLayout padded to Np with `options.frame_patches()`),
    labels list[str], item_id list[str] (dummy rows: ""), num_real int.
  With `groups=G` (b = B / G): input_ids / attention_mask / loss_mask [G, b, T],
    position_ids [G, 3, b, T], rope_deltas [G, b], pixel_values_videos [G, Np, patch_dim]
    (group g: the videos of its rows only), video_layout leaves [G, ...]; video_grid_thw,
    second_per_grid_ts, labels, item_id stay flat in row order; num_groups G.
  length / patches: pad to these (length >= the longest example, patches >= the patch
    bucket; e.g. agreed by all processes) instead of the buckets of `shape_needs`.
  """
  n_real = len(examples)
  if not 0 < n_real <= batch_size:
    raise ValueError(f"collate: {n_real} examples for a batch of {batch_size}")
  need_t, need_p = shape_needs(examples, batch_size=batch_size, options=options,
                               groups=groups or 1)
  longest = max(len(e["input_ids"]) for e in examples)
  for name, got, need in (("length", length, longest), ("patches", patches, need_p)):
    if got is not None and got < need:
      raise ValueError(f"collate: {name}={got} is smaller than the {need} this batch needs")
  t = length or need_t
  n_pad = patches or need_p
  lengths = [len(e["input_ids"]) for e in examples]
  ids = np.full((batch_size, t), pad_id, np.int32)
  attn = np.zeros((batch_size, t), np.int32)
  loss = np.zeros((batch_size, t), np.int32)
  for row in range(batch_size):
    if row < n_real:
      e, n = examples[row], lengths[row]
      sl = slice(t - n, t) if left_pad else slice(0, n)
      ids[row, sl] = e["input_ids"]
      attn[row, sl] = 1
      loss[row, sl] = e["loss_mask"]
    else:  # dummy row: one attended pad token so that no attention row is empty
      attn[row, t - 1 if left_pad else 0] = 1

  vcfg = model_config.vision
  grids = _cat([e["video_grid_thw"] for e in examples], (0, 3), np.int32)
  seconds = _cat([e["second_per_grid_ts"] for e in examples], (0,), np.float32)
  position_ids, deltas = rope.get_rope_index(model_config, ids, attn, None, grids, seconds)
  out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
         "position_ids": position_ids, "rope_deltas": deltas,
         "video_grid_thw": grids, "second_per_grid_ts": seconds,
         "labels": [e["label"] for e in examples] + [""] * (batch_size - n_real),
         "item_id": [e["item_id"] for e in examples] + [""] * (batch_size - n_real),
         "num_real": n_real}
  frame_patches = options.frame_patches(vcfg.patch_size)
  if groups is None:
    out["pixel_values_videos"], out["video_layout"] = _vision(examples, n_pad, vcfg,
                                                              frame_patches)
    return out
  per = batch_size // groups
  vis = [_vision(examples[g * per:(g + 1) * per], n_pad, vcfg, frame_patches)
         for g in range(groups)]
  for k in ("input_ids", "attention_mask", "loss_mask"):
    out[k] = out[k].reshape(groups, per, t)
  out["position_ids"] = position_ids.reshape(3, groups, per, t).transpose(1, 0, 2, 3).copy()
  out["rope_deltas"] = np.asarray(deltas).reshape(groups, per)
  out["pixel_values_videos"] = np.stack([v[0] for v in vis])
  out["video_layout"] = jax.tree.map(lambda *xs: np.stack(xs), *[v[1] for v in vis])
  out["num_groups"] = groups
  return out


def _cat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype) -> np.ndarray:
  return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)


def _vision(examples: Sequence[dict[str, Any]], n_pad: int, vcfg, frame_patches: int):
  """The examples' videos concatenated into [n_pad, patch_dim] (zero padded) and their
  layout (padded to n_pad). No examples (a group of dummy rows): zeros, empty layout."""
  pixels = [e["pixel_values_videos"] for e in examples]
  pv = np.empty((n_pad, vcfg.patch_dim), np.float32)  # filled in place: no concat temporary
  at = 0
  for p in pixels:
    pv[at:at + p.shape[0]] = p
    at += p.shape[0]
  pv[at:] = 0
  grids = _cat([e["video_grid_thw"] for e in examples], (0, 3), np.int32)
  layout = vision_layout(grids, vcfg, pad_to=n_pad, max_frame_patches=frame_patches)
  return pv, layout
