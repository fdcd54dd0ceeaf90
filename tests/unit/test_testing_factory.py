"""The tiny-model factory: tokenizer, config, HF-format checkpoint (deterministic, loadable)."""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest

from deepintuit_jax.models import tiny

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def tokenizer():
  return tiny.build_tokenizer(seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return tiny.write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), seed=0)


def test_tokenizer_special_tokens_and_ids(tokenizer):
  ids = tokenizer.convert_tokens_to_ids(SPECIALS)
  assert ids == list(range(8))
  assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
  assert 900 <= len(tokenizer) <= 1024
  # Special tokens are never split, words of the domain are single tokens.
  text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>The red circle is moving left"
  toks = tokenizer.tokenize(text)
  assert toks[:6] == ["<|im_start|>", "user", "Ċ", "<|vision_start|>", "<|video_pad|>",
                      "<|vision_end|>"]
  assert toks[6:] == ["The", "Ġred", "Ġcircle", "Ġis", "Ġmoving", "Ġleft"]
  # The generated benchmark's words are in the corpus (short prompts and traces).
  for word in ("background", "stays", "travels", "bigger", "keeping", "towards", "position"):
    assert len(tokenizer.tokenize(" " + word)) == 1, word
  # Byte-level: any text round-trips, including unseen characters.
  for s in ["Step 2: yes / no -- évidence 37°C 🙂", "  two  spaces\n\nnewlines"]:
    assert tokenizer.decode(tokenizer(s)["input_ids"]) == s


def test_chat_template_renders_qwen_layout(tokenizer):
  video_turn = [{"role": "user", "content": [{"type": "video", "video": "/v/a.mp4"},
                                             {"type": "text", "text": "What moves?"}]}]
  got = tokenizer.apply_chat_template(video_turn, tokenize=False, add_generation_prompt=True)
  assert got == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?"
                 "<|im_end|>\n<|im_start|>assistant\n")
  conv = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
          {"role": "assistant", "content": "<answer>yes</answer>"}]
  got = tokenizer.apply_chat_template(conv, tokenize=False)
  assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                 "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                 "<|im_start|>assistant\n<answer>yes</answer><|im_end|>\n")


def test_tiny_config_matches_tokenizer_and_overrides():
  cfg = tiny.tiny_config()
  assert (cfg.image_token_id, cfg.video_token_id) == (6, 7)
  assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (3, 4)
  assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 2)
  assert cfg.text.vocab_size % 64 == 0 and cfg.text.vocab_size > tiny.TOKENIZER_VOCAB
  assert 2 * sum(cfg.text.mrope_section) == cfg.text.head_dim
  big = tiny.tiny_config(text=dict(hidden_size=128, num_attention_heads=4),
                            vision=dict(depth=3), eos_token_id=0)
  assert big.vision.out_hidden_size == 128 and big.text.mrope_section == (4, 6, 6)
  assert big.vision.depth == 3 and big.eos_token_id == 0
  with pytest.raises(TypeError, match="hidden_size"):
    tiny.tiny_config(hidden_size=8)


def test_checkpoint_is_deterministic_and_complete(ckpt, tmp_path):
  again = tiny.write_tiny_checkpoint(str(tmp_path / "again"), seed=0)
  names = sorted(os.listdir(ckpt))
  for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json",
            "video_preprocessor_config.json"]:
    assert f in names, f
  assert sorted(os.listdir(again)) == names
  for f in names:
    assert filecmp.cmp(os.path.join(ckpt, f), os.path.join(again, f), shallow=False), f
  other = tiny.write_tiny_checkpoint(str(tmp_path / "other"), seed=1)
  assert not filecmp.cmp(os.path.join(ckpt, "model.safetensors"),
                         os.path.join(other, "model.safetensors"), shallow=False)
  with open(os.path.join(ckpt, "preprocessor_config.json")) as f:
    pre = json.load(f)
  assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
  assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
  assert pre["max_pixels"] == 200704 and pre["image_mean"][0] == pytest.approx(0.48145466)
  with open(os.path.join(ckpt, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == [2, 0]


def test_transformers_loads_the_directory(ckpt):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
  ours = load_file(os.path.join(ckpt, "model.safetensors"))
  theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  # transformers>=5 nests the towers; compare under the flat names the file uses.
  theirs = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
            for k, v in theirs.items()}
  assert set(theirs) == set(ours)
  for k, v in ours.items():
    np.testing.assert_array_equal(theirs[k], v, err_msg=k)
  assert model.config.video_token_id == 7
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  assert tok.convert_tokens_to_ids("<|video_pad|>") == 7 and tok.eos_token_id == 2
  assert set(tok.all_special_tokens) == set(SPECIALS) and tok.pad_token_id == 0
  assert tok.tokenize("a<|vision_start|><|image_pad|>b") == ["a", "<|vision_start|>",
                                                              "<|image_pad|>", "b"]
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True).endswith("<|im_start|>assistant\n")
