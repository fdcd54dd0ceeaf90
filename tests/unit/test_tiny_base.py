"""The tiny base: its builder on a reduced budget, and the hook the embedded default uses."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from deepintuit_jax.models import tiny, tiny_base
from tests.scripts import load_script  # noqa: E402



def _builder():
  return load_script("scripts", "build_tiny_base.py")


def test_base_config_rotates_height_and_width():
  """Per-step rotation of the fastest h and w frequencies (rope: theta^(-2i/d) on pair i;
  the sections take the pairs in order t, h, w), worked out here in NumPy."""
  c = tiny_base.base_config().text
  half = c.head_dim // 2
  inv = c.rope_theta ** (-np.arange(half) / half)
  t, h, _ = c.mrope_section
  assert inv[t] > 0.5 and inv[t + h] > 0.2   # radians per merged-token step, h and w
  small = tiny.tiny_config().text          # the unit/parity tests' config is unchanged
  inv = small.rope_theta ** (-np.arange(small.head_dim // 2) / (small.head_dim // 2))
  assert inv[sum(small.mrope_section[:2])] < 1e-3


@pytest.mark.slow  # ~30-80 s on 2 shared cores: compiles a train step and a forward
def test_builder_reduced_budget_writes_a_loadable_base(tmp_path):
  from transformers import AutoTokenizer
  from deepintuit_jax.models import qwen2_5_vl
  b = _builder()
  out = str(tmp_path / "base")
  info = b.build(out, seed=1, num_clips=8, num_heldout=2, steps=2, batch=2,
                 corpus_dir=str(tmp_path / "corpus"), config=tiny.tiny_config(),
                 tower_steps=2, tower_batch=2, tower_clips=4)
  assert np.isfinite(info["final_loss"]) and info["steps"] == 2
  # stage 1 (the tower on its dense targets) ran on 4 clips and was measured on 2 held out
  assert info["tower"]["steps"] == 2 and info["tower"]["clips"] == 4
  assert 0.0 <= info["tower"]["heldout"]["kind_acc"] <= 1.0
  assert info["frozen"] == r"^visual\."
  assert set(info["heldout"][-1]) == {"step", "direction", "end", "describe"}
  assert json.load(open(os.path.join(out, "build_info.json")))["seed"] == 1
  assert info["vision_tokens"]["token_std"] > 0
  assert tiny_base.is_complete(out)
  model = qwen2_5_vl.from_pretrained(out)
  assert model.config.text.hidden_size == tiny.tiny_config().text.hidden_size
  tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
  assert tok.convert_tokens_to_ids("<|video_pad|>") == tiny.TOKEN_IDS["<|video_pad|>"]


def test_checkpoint_dir_copies_once_and_loads(tmp_path):
  from deepintuit_jax.models import qwen2_5_vl
  path = tiny_base.checkpoint_dir(str(tmp_path / "cache"))
  assert path.endswith(f"tiny_base_v{tiny_base.VERSION}") and tiny_base.is_complete(path)
  stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
  assert tiny_base.checkpoint_dir(str(tmp_path / "cache")) == path
  assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
  model = qwen2_5_vl.from_pretrained(path)
  assert model.config == qwen2_5_vl.Qwen2_5_VLConfig.from_pretrained_dir(tiny_base.ASSET_DIR)
  assert model.config.text == tiny_base.base_config().text
  assert model.config.vision == tiny_base.base_config().vision  # the shipped weights' shape
  assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp-" in f]


def test_default_init_picks_the_base_only_for_the_embedded_default(tmp_path):
  cache = str(tmp_path / "cache")
  assert tiny_base.default_init("auto", model_checkpoint="", cache_dir=cache) == os.path.join(
      cache, f"tiny_base_v{tiny_base.VERSION}")
  assert tiny_base.default_init("auto", model_checkpoint="/m/qwen", cache_dir=cache) == ""
  assert tiny_base.default_init("", model_checkpoint="", cache_dir=cache) == ""
  assert tiny_base.default_init("/w/sft/hf", model_checkpoint="", cache_dir=cache) == "/w/sft/hf"


def test_checkpoint_dir_names_a_missing_file(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    tiny_base.checkpoint_dir(str(tmp_path / "cache"), source=str(src))
