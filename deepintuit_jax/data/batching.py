"""Examples -> one padded batch (host side, NumPy), per the data contract in
docs/ARCHITECTURE.md.

Shapes come from a small set so that jitted steps recompile rarely: the token length is the
smallest length bucket that fits, the vision patch count is a patch bucket, and the vision
layout is built with `pad_to` and a fixed `max_frame_patches`, so its shapes depend only on
those two numbers. A batch with fewer real examples than `batch_size` is filled with dummy
rows (one attended pad token, loss_mask 0, no video); `num_real` counts the real rows, which
come first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.models.qwen2_5_vl import rope
from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from deepintuit_jax.models.qwen2_5_vl.vision_layout import vision_layout

# Keys that are not arrays of the device batch (keep them out of jitted functions).
HOST_KEYS = ("labels", "item_id", "num_real")


def collate(examples: Sequence[dict[str, Any]], *, batch_size: int, options: PipelineOptions,
            model_config: Qwen2_5_VLConfig, pad_id: int, left_pad: bool = False
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
  """
  n_real = len(examples)
  if not 0 < n_real <= batch_size:
    raise ValueError(f"collate: {n_real} examples for a batch of {batch_size}")
  lengths = [len(e["input_ids"]) for e in examples]
  t = options.length_bucket(max(lengths))
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
  grids = np.concatenate([e["video_grid_thw"] for e in examples]).astype(np.int32)
  seconds = np.concatenate([e["second_per_grid_ts"] for e in examples]).astype(np.float32)
  pixels = [e["pixel_values_videos"] for e in examples]
  n_patches = sum(p.shape[0] for p in pixels)
  n_pad = options.patch_bucket(n_patches)
  pv = np.empty((n_pad, vcfg.patch_dim), np.float32)  # filled in place: no concat temporary
  at = 0
  for p in pixels:
    pv[at:at + p.shape[0]] = p
    at += p.shape[0]
  pv[at:] = 0
  layout = vision_layout(grids, vcfg, pad_to=n_pad,
                         max_frame_patches=options.frame_patches(vcfg.patch_size))
  position_ids, deltas = rope.get_rope_index(model_config, ids, attn, None, grids, seconds)
  return {
      "input_ids": ids, "attention_mask": attn, "loss_mask": loss,
      "position_ids": position_ids, "rope_deltas": deltas,
      "pixel_values_videos": pv, "video_grid_thw": grids, "second_per_grid_ts": seconds,
      "video_layout": layout,
      "labels": [e["label"] for e in examples] + [""] * (batch_size - n_real),
      "item_id": [e["item_id"] for e in examples] + [""] * (batch_size - n_real),
      "num_real": n_real,
  }
