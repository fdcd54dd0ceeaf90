"""The export serves as trained: label / tag tokens that survive `skip_special_tokens=True`
(`data.special_tokens="added"`) with the release's ids and encoding, and processor files
holding the training's pixel and frame settings."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from deepintuit_jax.data import chat, prompts
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl import hf_save

LABELS = ["normal", "abnormal"]
PROMPT = "Is it normal? <think>reasoning</think><answer>label</answer>"
RESPONSE = "<think>Step 1: a red ball moves normally.</think>\n<answer>abnormal</answer>"


def _tokenizer(mode):
  t = tiny.build_tokenizer(seed=0)
  chat.add_tokens_for_mode(t, LABELS, mode)
  return t


def test_added_tokens_encode_as_the_release_and_survive_skip_special_tokens():
  added, special, base = _tokenizer("added"), _tokenizer("special"), _tokenizer("none")
  assert len(base) == len(tiny.build_tokenizer(seed=0))
  # Same ids, one token each: "normal" is a vocabulary token of the tiny tokenizer, the
  # other six get the next ids in order (labels, tags, <NO_POLICY>).
  n0 = len(base)
  ids = chat.label_token_ids(added, LABELS + list(chat.TAG_TOKENS) + [chat.NO_POLICY_TOKEN])
  assert ids == chat.label_token_ids(special, LABELS + list(chat.TAG_TOKENS)
                                     + [chat.NO_POLICY_TOKEN])
  assert ids[1:] == list(range(n0, n0 + 6)) and ids[0] < n0
  ex_a = chat.encode_example(added, PROMPT, RESPONSE, num_video_tokens=[3])
  ex_s = chat.encode_example(special, PROMPT, RESPONSE, num_video_tokens=[3])
  np.testing.assert_array_equal(ex_a["input_ids"], ex_s["input_ids"])
  np.testing.assert_array_equal(ex_a["loss_mask"], ex_s["loss_mask"])
  resp = added.encode(RESPONSE, add_special_tokens=False)
  assert resp == special.encode(RESPONSE, add_special_tokens=False)
  # vLLM's / transformers' default decoding: the release's special tokens vanish.
  assert added.decode(resp, skip_special_tokens=True) == RESPONSE
  assert "<answer>" not in special.decode(resp, skip_special_tokens=True)
  # The eval's parser sees the same answer in both modes.
  for tok in (added, special):
    text = chat.decode_response(tok, resp)
    assert prompts.extract_answer(text) == "abnormal" and prompts.is_well_formatted(text)
  assert chat.add_tokens_for_mode(added, LABELS, "added") == []  # idempotent
  with pytest.raises(ValueError, match="data.special_tokens='yes'"):
    chat.add_tokens_for_mode(added, LABELS, "yes")


def test_added_tokens_round_trip_through_save_pretrained(tmp_path):
  from transformers import AutoTokenizer
  tok = _tokenizer("added")
  tok.save_pretrained(str(tmp_path))
  back = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  ids = back.encode(RESPONSE, add_special_tokens=False)
  assert ids == tok.encode(RESPONSE, add_special_tokens=False)
  assert back.decode(ids, skip_special_tokens=True) == RESPONSE


def test_processor_files_carry_the_training_settings(tmp_path):
  src = tiny.write_tiny_checkpoint(str(tmp_path / "src"))
  out = str(tmp_path / "out")
  os.makedirs(out)
  for name in hf_save.PROCESSOR_FILES:
    with open(os.path.join(src, name)) as f, open(os.path.join(out, name), "w") as g:
      g.write(f.read())
  from deepintuit_jax.data import pipeline
  settings = hf_save.ProcessorSettings.from_pipeline(pipeline.PipelineOptions(
      max_pixels=50176, min_pixels=3136, max_frames=8))
  assert settings == hf_save.ProcessorSettings(min_pixels=3136, max_pixels=50176, max_frames=8,
                                               min_frames=4, fps=2.0, sample_frames=False)
  hf_save.write_processor_settings(out, settings)
  image = json.load(open(os.path.join(out, "preprocessor_config.json")))
  video = json.load(open(os.path.join(out, "video_preprocessor_config.json")))
  for cfg in (image, video):
    assert (cfg["min_pixels"], cfg["max_pixels"]) == (3136, 50176)
    assert cfg["size"] == {"shortest_edge": 3136, "longest_edge": 50176}
  assert (video["max_frames"], video["min_frames"], video["fps"]) == (8, 4, 2.0)
  assert video["do_sample_frames"] is False and "max_frames" not in image
  assert video["patch_size"] == 14 and image["image_processor_type"] == "Qwen2VLImageProcessor"
  from transformers import AutoImageProcessor
  proc = AutoImageProcessor.from_pretrained(out, local_files_only=True)
  assert proc.size["longest_edge"] == 50176 and proc.size["shortest_edge"] == 3136
  # Without source files the image processor's file is written from Qwen's defaults.
  bare = str(tmp_path / "bare")
  os.makedirs(bare)
  hf_save.write_processor_settings(bare, settings)
  assert sorted(os.listdir(bare)) == ["preprocessor_config.json"]
  assert AutoImageProcessor.from_pretrained(bare, local_files_only=True).size["longest_edge"] \
      == 50176


def test_the_export_records_its_rope_rule_and_a_load_asking_another_is_refused(tmp_path):
  """The rule travels with the model: save_pretrained writes it into config.json,
  from_pretrained reads it back; asking for another one is a one-line ConfigError naming the
  key to set (a stage would otherwise run the model under positions it was not trained
  with); a directory without a record (a stock checkpoint) takes any rule."""
  from deepintuit_jax.core.errors import ConfigError
  from deepintuit_jax.models import qwen2_5_vl
  base = tiny.write_tiny_checkpoint(str(tmp_path / "base"))
  model = qwen2_5_vl.from_pretrained(base, rope_convention="transformers_5.3")
  assert model.config.rope_convention == "transformers_5.3"  # no record in the stock dir
  out = hf_save.save_pretrained(model, str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["deepintuit_rope_convention"] == "transformers_5.3"
  assert qwen2_5_vl.from_pretrained(out).config.rope_convention == "transformers_5.3"
  with pytest.raises(ConfigError, match=r"--config.model.rope_convention=transformers_5.3"):
    qwen2_5_vl.from_pretrained(out, rope_convention="qwen")
  assert qwen2_5_vl.from_pretrained(base).config.rope_convention == "qwen"
