"""Tiny Qwen2.5-VL-shaped models for the embedded default and for tests (transformers'
PyTorch reference of a config, for parity checks, is tools/hf_reference.py).

Everything here is deterministic for a seed and needs no download:
- `build_tokenizer(seed=)`: a small byte-level BPE (about 1k tokens) trained with the
  `tokenizers` library on a built-in English corpus, with Qwen's special tokens (ids 0-7,
  see `SPECIAL_TOKENS`) and a Qwen2.5-VL-style chat template.
- `tiny_config(**overrides)`: a model config whose token ids match that tokenizer.
- `write_tiny_checkpoint(path, seed=)`: a complete Hugging Face directory (config,
  safetensors, tokenizer, processor configs) that transformers and our `from_pretrained` load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepintuit_jax.models.qwen2_5_vl.config import (
    ROPE_CONVENTION_KEY, Qwen2_5_VLConfig, TextConfig, VisionConfig)

# Bump when `write_tiny_checkpoint` writes different files (cache keys can include it).
VERSION = 2
# Qwen's special tokens, in the order of their ids in the tiny tokenizer (0..7).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TOKEN_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
TOKENIZER_VOCAB = 1024       # BPE training target, special tokens included.
MODEL_VOCAB = 1088           # tokenizer + room for added tokens (labels, tags); 17 * 64.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 256 * 28 * 28

# The pre-tokenizer split of Qwen2 (and GPT-4): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-VL's chat template semantics: a default system turn, one vision placeholder per
# image / video content item, text items verbatim, optional "Picture n: " / "Video n: "
# labels, and the assistant header with add_generation_prompt.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Words that video-classification prompts and reasoning traces use.
_WORDS = """
red green blue yellow orange purple white black gray pink brown cyan magenta colour color
circle square triangle rectangle star ball box shape shapes object objects dot line
left right up down top bottom center middle corner edge side above below near far
moving moves moved move growing grows grew grow shrinking shrinks shrank shrink rotating
rotates spinning bouncing falling rising sliding stopping still static fast slow faster
slower quickly slowly large small big tiny larger smaller size speed direction motion
step steps first second third summary summarize evidence check checks verify verification
self yes no label labels answer answers think thinking reason reasoning conclusion final
video frame frames clip clips camera scene person people dog cat car door room house
normal abnormal anomaly event events activity action actions class classes category
policy definition definitions rule rules title description transcript sticker text
the a an is are was were be been it its this that these those there here what which who
and or not but if then else because so while when where how why all any each every some
of in on at to from by with without into onto over under through across between during
one two three four five six seven eight nine ten many few more most less least
you your we our they their he she his her assistant user system helpful
please output format must should can could would will may might do does did done
given provided analyse analyze analysis procedure based following material materials
shows shown see seen appears appear looks look visible observed observe detect detected
change changes changed same different across time begins ends start end during after before
hour minute second seconds morning night day light dark bright shadow window floor wall
kitchen garden street road yard package delivery fall falls fell slip running walking
sitting standing climbing carrying holding opening closing entering leaving open closed
dangerous safe unsafe risk risky accident injury fire smoke water flood broken damage
hateful offensive harmless neutral content speech image audio sound music voice words
correct incorrect wrong true false likely unlikely certain uncertain confidence score
match matches matching consistent inconsistent supports support contradicts reviewer
priority tie ties overrule review rationale second opinion calibrate calibrated classify
about as background becomes bigger centre fits gets goes gradient grid height keeping none
only place plain position stays times towards travels ring cross stripes checker jitters
blinks off frame speech clip
"""
_TEMPLATES = (
    "The {c} {s} is {m} {d}.",
    "Step {n}: the {s} keeps {m} toward the {d} {p}.",
    "Evidence: a {c} {s} appears at the {d} and is {m}.",
    "Check {n}: is the {s} {m}? {yn}, because the {c} {s} moves {d}.",
    "Summary: in this video a {c} {s} is {m} from {d} to {d2}.",
    "<think>Step 1 summary: {c} {s}. Step 2 checks: {yn}. Step 3 verify.</think>",
    "<answer>{label}</answer>",
    "Label: {label}. Answer: {label}. The final answer is {label}.",
    "You are a helpful assistant. Classify the video into one of the labels.",
    "Output format: <think>reasoning</think><answer>label</answer>",
    "A {c} {s} on a plain background stays in place and gets bigger, about {n} times.",
    "It travels towards the {d} of the frame, keeping its size and height. Only {label} fits.",
    "The {s} goes {d}: same position, none other; it becomes smaller on the grid background.",
)


def _corpus(seed: int, n_sentences: int = 3000) -> list[str]:
  """A deterministic English corpus: templates filled from `_WORDS`, plus every word once."""
  rng = np.random.default_rng(seed)
  words = _WORDS.split()
  pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
  colours = words[:15]
  shapes = ["circle", "square", "triangle", "rectangle", "star", "ball", "box", "dot"]
  moves = ["moving", "growing", "shrinking", "rotating", "spinning", "bouncing", "falling",
           "rising", "sliding", "still"]
  dirs = ["left", "right", "up", "down", "top", "bottom", "center", "corner"]
  labels = ["normal", "abnormal", "yes", "no", "moving", "growing", "shrinking", "static"]
  lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
  for _ in range(n_sentences):
    lines.append(pick(_TEMPLATES).format(
        c=pick(colours), s=pick(shapes), m=pick(moves), d=pick(dirs), d2=pick(dirs),
        p=pick(["slowly", "quickly", "fast", "slow"]), n=int(rng.integers(1, 10)),
        yn=pick(["Yes", "No"]), label=pick(labels)))
  lines += ["system\nYou are a helpful assistant.\nuser\nWhat happens?\nassistant\nyes"] * 8
  lines.append("0 1 2 3 4 5 6 7 8 9 10 32 64 100 2024 . , : ; ! ? ' \" ( ) [ ] { } < > / - _ #")
  return lines


def build_tokenizer(*, seed: int = 0):
  """A small byte-level BPE `transformers.PreTrainedTokenizerFast` with Qwen's specials.

  Special tokens get ids 0..7 (`TOKEN_IDS`); pad = `<|endoftext|>`, eos = `<|im_end|>`, no
  bos (as Qwen). The same seed gives the same tokenizer, byte for byte.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(seed), trainer=trainer)
  for t in SPECIAL_TOKENS:
    if tok.token_to_id(t) != TOKEN_IDS[t]:
      raise AssertionError(f"tokenizer: special token {t} got id {tok.token_to_id(t)}")
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None,
      unk_token=None, chat_template=CHAT_TEMPLATE, model_max_length=32768,
      padding_side="right", clean_up_tokenization_spaces=False,
      additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)])


def _mrope_section(head_dim: int) -> tuple[int, int, int]:
  """Qwen's split of the rotary half (16, 24, 24 of 64), scaled to `head_dim // 2`."""
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return (t, h, half - t - h)


def tiny_config(**overrides: Any) -> Qwen2_5_VLConfig:
  """A tiny Qwen2.5-VL config matching `build_tokenizer`'s token ids.

  Defaults: vision depth 2, width 32, 2 heads, MLP 64, window 56 px, block 1 full attention;
  decoder width 64, 2 layers, 4 heads (2 kv), MLP 128, mrope (2, 3, 3), vocab 1088, untied.
  Overrides: `text=dict(...)` / `vision=dict(...)` replace fields of the sub-configs (the
  vision `out_hidden_size` follows the text width and `mrope_section` follows the head size
  unless given); other keywords replace top-level fields (e.g. `eos_token_id=`).
  """
  text_kw = dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=32768, tie_word_embeddings=False)
  text_kw.update(overrides.pop("text", None) or {})
  if "mrope_section" not in text_kw:
    head_dim = text_kw.get("head_dim_override") or (
        text_kw["hidden_size"] // text_kw["num_attention_heads"])
    text_kw["mrope_section"] = _mrope_section(head_dim)
  text = TextConfig(**text_kw)
  vision_kw = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                   fullatt_block_indexes=(1,), out_hidden_size=text.hidden_size)
  vision_kw.update(overrides.pop("vision", None) or {})
  vision = VisionConfig(**vision_kw)
  top = dict(image_token_id=TOKEN_IDS["<|image_pad|>"],
             video_token_id=TOKEN_IDS["<|video_pad|>"],
             vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
             vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
             bos_token_id=TOKEN_IDS[PAD_TOKEN], eos_token_id=TOKEN_IDS[EOS_TOKEN])
  names = {f.name for f in dataclasses.fields(Qwen2_5_VLConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise TypeError(f"tiny_config: unknown override(s) {unknown}; use text=dict(...) or "
                    f"vision=dict(...) for sub-config fields")
  top.update(overrides)
  return Qwen2_5_VLConfig(vision=vision, text=text, **top)


def random_hf_tensors(config: Qwen2_5_VLConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named float32 tensors (flat layout) for `config`: matrices normal(0, 0.02), norm
  weights 1 + normal(0, 0.1), biases normal(0, 0.02). Deterministic for the seed."""
  from deepintuit_jax.models.qwen2_5_vl import hf_io
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in hf_io.hf_param_shapes(config).items():
    if key.endswith("norm.weight") or "norm1." in key or "norm2." in key or "ln_q" in key:
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      x = 0.02 * rng.standard_normal(shape)
    out[key] = x.astype(np.float32)
  return out


def processor_configs(*, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                      patch_size: int = 14, temporal_patch_size: int = 2,
                      merge_size: int = 2) -> tuple[dict, dict]:
  """(preprocessor_config.json, video_preprocessor_config.json) as transformers writes them."""
  common = dict(
      do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), rescale_factor=1 / 255,
      resample=3, merge_size=merge_size, patch_size=patch_size,
      temporal_patch_size=temporal_patch_size, min_pixels=min_pixels, max_pixels=max_pixels,
      size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
      processor_class="Qwen2_5_VLProcessor")
  image = dict(common, image_processor_type="Qwen2VLImageProcessor")
  video = dict(common, video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False,
               min_frames=4, max_frames=768, fps=2.0)
  return image, video


def generation_config(config: Qwen2_5_VLConfig) -> dict:
  """generation_config.json: stop on `<|im_end|>` and `<|endoftext|>`, pad with the latter."""
  pad = TOKEN_IDS[PAD_TOKEN] if config.bos_token_id is None else config.bos_token_id
  eos = [config.eos_token_id] if config.eos_token_id is not None else []
  return dict(bos_token_id=config.bos_token_id, pad_token_id=pad,
              eos_token_id=eos + [pad] if pad not in eos else eos, do_sample=False)


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_tiny_checkpoint(path: str, *, seed: int = 0,
                          config: Qwen2_5_VLConfig | None = None) -> str:
  """Writes a complete HF-format Qwen2.5-VL directory for a tiny random model; returns path.

  Files: config.json, model.safetensors (float32, `random_hf_tensors`), generation_config.json,
  tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
  video_preprocessor_config.json. `config` defaults to `tiny_config()`; its token ids
  must be the tokenizer's. The same seed writes the same bytes.
  """
  import safetensors.numpy

  config = config or tiny_config()
  if config.image_token_id != TOKEN_IDS["<|image_pad|>"] or (
      config.video_token_id != TOKEN_IDS["<|video_pad|>"]):
    raise ValueError("write_tiny_checkpoint: config token ids differ from the tiny tokenizer's "
                     "(build the config with tiny_config())")
  if config.text.vocab_size < TOKENIZER_VOCAB:
    raise ValueError(f"write_tiny_checkpoint: vocab_size {config.text.vocab_size} < the "
                     f"tokenizer's {TOKENIZER_VOCAB}")
  os.makedirs(path, exist_ok=True)
  hf_config = config.to_hf_dict(torch_dtype="float32")
  # Random weights trained with no rule: no record, like a stock checkpoint (any
  # model.rope_convention may start from it), and the same bytes as before rules existed.
  hf_config.pop(ROPE_CONVENTION_KEY)
  _write_json(os.path.join(path, "config.json"), hf_config)
  tensors = random_hf_tensors(config, seed)
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"),
                              metadata={"format": "pt"})
  _write_json(os.path.join(path, "generation_config.json"), generation_config(config))
  image, video = processor_configs(patch_size=config.vision.patch_size,
                                   temporal_patch_size=config.vision.temporal_patch_size,
                                   merge_size=config.vision.spatial_merge_size)
  _write_json(os.path.join(path, "preprocessor_config.json"), image)
  _write_json(os.path.join(path, "video_preprocessor_config.json"), video)
  build_tokenizer(seed=seed).save_pretrained(path)
  _portable_tokenizer_config(os.path.join(path, "tokenizer_config.json"))
  return path


def _portable_tokenizer_config(file: str) -> None:
  """Rewrites transformers>=5's tokenizer_config.json with the keys 4.x reads too (the
  generic fast class and `additional_special_tokens`); 5.x reads them as well."""
  with open(file) as f:
    cfg = json.load(f)
  cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  extra = cfg.pop("extra_special_tokens", None)
  if isinstance(extra, list):
    cfg["additional_special_tokens"] = extra
  cfg.pop("backend", None)
  _write_json(file, cfg)


def micro_config(*, vision_depth: int = 1) -> Qwen2_5_VLConfig:
  """The smallest useful config (vocab 50, decoder width 32, vision width 16), for unit tests
  of trainers and samplers where only shapes and math matter; the last vision block uses
  full attention."""
  return Qwen2_5_VLConfig(
      vision=VisionConfig(depth=vision_depth, hidden_size=16, intermediate_size=32,
                          num_heads=1, out_hidden_size=32,
                          fullatt_block_indexes=(vision_depth - 1,)),
      text=TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(1, 1, 2),
                      tie_word_embeddings=False),
      image_token_id=45, video_token_id=46, vision_start_token_id=47, vision_end_token_id=48)
