"""Serving an export with transformers or vLLM as it was trained (docs/serving.md).

* `video_inputs(path, export_dir)`: the frames of one video as training sampled them, and the
  `video_metadata` dict transformers' processor and vLLM need (without it transformers
  assumes 24 fps and the rope's seconds per grid come out 12 times too small).
* `patch_transformers_rope(convention)`: makes transformers' Qwen2.5-VL compute the 3D rope
  positions with one of our rules (`rope.CONVENTIONS`); transformers >= 5.3 otherwise uses
  "transformers_5.3", unlike the original Qwen code and vLLM ("qwen", our default).
Only NumPy and OpenCV are imported here (a vLLM environment needs no jax); the model package,
torch and transformers only inside the patch.
"""
from __future__ import annotations

import inspect
import json
import os
import types
from typing import Any

import numpy as np

from deepintuit_jax.core.errors import ConfigError

# config.json key of the rope rule, as models/qwen2_5_vl/config.py writes it (that package
# imports jax; tests/unit/test_serving.py checks that the two agree).
ROPE_CONVENTION_KEY = "deepintuit_rope_convention"


def export_settings(export_dir: str) -> dict[str, Any]:
  """What an export records for serving: its rope rule ("qwen" when it records none), the
  pixel bounds of its processor files and the frame settings of its video processor file
  (training's, written by the export)."""
  def read(name):
    path = os.path.join(export_dir, name)
    if not os.path.isfile(path):
      return {}
    with open(path) as f:
      return json.load(f)
  cfg, image = read("config.json"), read("preprocessor_config.json")
  video = read("video_preprocessor_config.json") or image
  return {"rope_convention": cfg.get(ROPE_CONVENTION_KEY) or "qwen",
          "min_pixels": int(video.get("min_pixels", 4 * 28 * 28)),
          "max_pixels": int(video.get("max_pixels", 256 * 28 * 28)),
          "max_frames": int(video.get("max_frames", 32)), "fps": float(video.get("fps", 2.0)),
          "sampling": "fps" if video.get("do_sample_frames") else "release"}


def video_metadata(clip, default_fps: float = 2.0) -> dict[str, Any]:
  """The `video_metadata` of the frames of `clip` (a `data.video.VideoClip`) for
  transformers' processor (`videos_kwargs` / `video_metadata=`) and vLLM (the second item
  of a `(frames, metadata)` video; pass do_sample_frames=False to both, so that they do
  not sample these frames again): these frames are all there is, at the
  clip's rate, or `default_fps` when the source has none (frame zips and folders), as
  training assumed (`data.video.second_per_grid`)."""
  n = int(len(clip.frames))
  fps = float(clip.fps or default_fps)
  return {"fps": fps, "total_num_frames": n, "frames_indices": list(range(n)),
          "duration": n / fps, "video_backend": "opencv"}


def video_inputs(path: str, export_dir: str, *, item_id: str | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
  """(frames uint8 RGB [T, H, W, 3], video_metadata) of the video file, frame zip or frame
  folder at `path`, sampled as the export's training did."""
  from deepintuit_jax.data import video
  s = export_settings(export_dir)
  clip = video.load_video(path, sampling=s["sampling"], max_frames=s["max_frames"],
                          fps=s["fps"], item_id=item_id)
  return clip.frames, video_metadata(clip, s["fps"])


def patch_transformers_rope(convention: str | None = "qwen") -> None:
  """Replaces `Qwen2_5_VLModel.get_rope_index` of the installed transformers with ours for
  `convention` (every model of that class in this process; idempotent); None puts the
  installed one back. Only needed where the installed version's rule differs from the
  model's: transformers >= 5.3 for a model trained with "qwen" (the default)."""
  from deepintuit_jax.models.qwen2_5_vl import rope
  if convention is not None and convention not in rope.CONVENTIONS:
    raise ConfigError(f"rope convention {convention!r} not one of {rope.CONVENTIONS}")
  try:
    import torch
    import transformers
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
  except ImportError as e:
    raise ConfigError(f"patch_transformers_rope needs torch and transformers ({e})") from None
  cls = hf.Qwen2_5_VLModel
  original = getattr(cls.get_rope_index, "_deepintuit_original", cls.get_rope_index)
  if convention is None:
    cls.get_rope_index = original
    return
  signature = inspect.signature(original)
  # Before 5.3 the deltas subtract the padded row length, since then the real tokens only.
  major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
  padded_deltas = (major, minor) < (5, 3)

  def get_rope_index(self, *args, **kwargs):
    bound = signature.bind_partial(self, *args, **kwargs).arguments
    ids = bound["input_ids"]
    extra = bound.get("kwargs", {})
    grab = lambda k: bound.get(k, extra.get(k))  # noqa: E731
    host = lambda x: None if x is None else x.detach().cpu().numpy()  # noqa: E731
    vc = self.config.vision_config
    cfg = types.SimpleNamespace(
        vision=types.SimpleNamespace(spatial_merge_size=vc.spatial_merge_size,
                                     tokens_per_second=vc.tokens_per_second),
        image_token_id=self.config.image_token_id, video_token_id=self.config.video_token_id)
    mask = host(grab("attention_mask"))
    pos, deltas = rope.get_rope_index(
        cfg, host(ids), mask, host(grab("image_grid_thw")), host(grab("video_grid_thw")),
        host(grab("second_per_grid_ts")), convention=convention)
    deltas = deltas.astype(np.int64)
    if padded_deltas and mask is not None:
      deltas -= (mask == 0).sum(-1)
    return (torch.from_numpy(pos.astype(np.int64)).to(ids.device),
            torch.from_numpy(deltas).reshape(-1, 1).to(ids.device))

  get_rope_index._deepintuit_original = original
  cls.get_rope_index = get_rope_index
