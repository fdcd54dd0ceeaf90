"""Serving helpers: the export's settings, video_metadata, and the transformers rope patch."""
import json
import types

import numpy as np
import pytest

from deepintuit_jax import serving
from deepintuit_jax.data.video import VideoClip
from deepintuit_jax.models.qwen2_5_vl import config as config_lib, hf_save, rope


def test_the_key_is_the_configs():
  assert serving.ROPE_CONVENTION_KEY == config_lib.ROPE_CONVENTION_KEY


def test_export_settings(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({config_lib.ROPE_CONVENTION_KEY:
                                                    "transformers_5.2"}))
  (tmp_path / "video_preprocessor_config.json").write_text("{}")
  hf_save.write_processor_settings(str(tmp_path), hf_save.ProcessorSettings(
      min_pixels=3136, max_pixels=50176, max_frames=16, fps=2.0))
  s = serving.export_settings(str(tmp_path))
  assert s == {"rope_convention": "transformers_5.2", "min_pixels": 3136, "max_pixels": 50176,
               "max_frames": 16, "fps": 2.0, "sampling": "release"}
  (tmp_path / "config.json").write_text("{}")  # a stock checkpoint records no rule
  assert serving.export_settings(str(tmp_path))["rope_convention"] == "qwen"


def test_video_metadata_gives_the_training_seconds_per_grid():
  """transformers' processor takes seconds per grid = temporal patch / (frames kept /
  total frames * fps): with every frame kept, 2 / the clip's rate, as training computes."""
  clip = VideoClip(np.zeros((5, 4, 4, 3), np.uint8), 2.0, 5, np.arange(5))
  meta = serving.video_metadata(clip)
  assert meta["fps"] == 2.0 and meta["total_num_frames"] == 5
  assert 2 / (len(meta["frames_indices"]) / meta["total_num_frames"] * meta["fps"]) == 1.0
  zipped = VideoClip(np.zeros((3, 4, 4, 3), np.uint8), None, 3, np.arange(3))
  assert serving.video_metadata(zipped, default_fps=2.0)["fps"] == 2.0  # no source rate


def test_patch_transformers_rope_positions():
  """The patched method returns our rule's positions (and transformers' delta shape)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
  vid = 151656
  stub = types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2),
      image_token_id=151655, video_token_id=vid))
  ids = torch.tensor([[9, 151652] + [vid] * 3 + [151653, 9]])  # t=3 steps of one token
  tt = (ids == vid).int() * 2
  grid, spg = torch.tensor([[3, 2, 2]]), torch.tensor([1.0])
  native = Qwen2_5_VLModel.get_rope_index
  try:
    serving.patch_transformers_rope("qwen")
    pos, deltas = Qwen2_5_VLModel.get_rope_index(stub, ids, mm_token_type_ids=tt,
                                                 video_grid_thw=grid, second_per_grid_ts=spg)
    serving.patch_transformers_rope("qwen")  # idempotent: wraps the original once
    assert Qwen2_5_VLModel.get_rope_index._deepintuit_original is native
  finally:
    serving.patch_transformers_rope(None)
  assert Qwen2_5_VLModel.get_rope_index is native
  cfg = config_lib.Qwen2_5_VLConfig()
  want, want_d = rope.get_rope_index(cfg, ids.numpy(), None, None, grid.numpy(), spg.numpy())
  np.testing.assert_array_equal(pos.numpy(), want)
  assert deltas.shape == (1, 1) and int(deltas) == int(want_d[0])
  np.testing.assert_array_equal(pos[0, 0].numpy(), [0, 1, 2, 4, 6, 7, 8])


def test_bad_convention():
  with pytest.raises(ValueError, match="not one of"):
    serving.patch_transformers_rope("transformers")
