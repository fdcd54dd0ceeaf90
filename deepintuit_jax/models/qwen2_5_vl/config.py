"""Qwen2.5-VL architecture configs: frozen dataclasses read from / written to HF `config.json`.

Reads both layouts that exist in the wild: the original flat one (language-model keys at
top level, `rope_scaling.mrope_section`, as in the released Qwen2.5-VL-*-Instruct checkpoints)
and transformers>=5's nested one (`text_config`, `rope_parameters`). Writes the flat one,
with `text_config` too, which every transformers version and vLLM load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from deepintuit_jax.core.errors import ConfigError
from deepintuit_jax.models.qwen2_5_vl.attention import check_impl
from deepintuit_jax.models.qwen2_5_vl.rope import CONVENTIONS as ROPE_CONVENTIONS

# config.json key recording the rope rule a model was trained with (`rope.CONVENTIONS`);
# transformers and vLLM keep unknown keys and ignore this one. Absent: "qwen".
ROPE_CONVENTION_KEY = "deepintuit_rope_convention"

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
  """How the model runs (not what it is): dtypes, rematerialisation, attention kernel.

  dtype: compute dtype of activations and matmuls (bf16 for training).
  param_dtype: storage dtype of the parameters (fp32 master weights by default).
  remat: per decoder / vision block; "none", "full" (save nothing) or the name of a
    `jax.checkpoint_policies` policy ("dots_saveable", ...).
  attention_impl: attention backend (models/qwen2_5_vl/attention.py): None / "" / "auto"
    (cuDNN flash on GPU where it applies, Pallas splash on TPU, blockwise elsewhere),
    "blockwise" (online softmax over key/value blocks, pure XLA), "cudnn", "pallas", or
    "reference" / "xla" (the explicit-mask path: exact, O(T^2) memory; small shapes, tests).
  attention_block: query / key block length of the blockwise backend (memory O(T * block));
    None = by platform (attention.default_block: 64 on CPU, 512 on GPU / TPU).
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None
  attention_block: int | None = None

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} not one of {REMAT_POLICIES}")
    check_impl(self.attention_impl)
    if self.attention_block is not None and self.attention_block < 1:
      raise ValueError(f"attention_block {self.attention_block} must be >= 1")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: float = 2.0
  rms_norm_eps: float = 1e-6  # HF hard-codes 1e-6 for the vision RMSNorms.
  rope_theta: float = 10000.0
  hidden_act: str = "silu"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
    if (self.hidden_size // self.num_heads) % 4:
      raise ValueError("vision head_dim must be divisible by 4 (2D rotary embedding)")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ValueError("window_size must be a multiple of patch_size * spatial_merge_size")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} outside [0, depth={self.depth})")
    if self.hidden_act != "silu":
      raise ValueError(f"unsupported vision hidden_act {self.hidden_act!r} (Qwen2.5-VL uses silu)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: C * temporal_patch * patch * patch (1176 for Qwen)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  head_dim_override: int | None = None  # HF's optional `head_dim` key.

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads {self.num_attention_heads} not divisible by "
          f"num_key_value_heads {self.num_key_value_heads}")
    if 2 * sum(self.mrope_section) != self.head_dim:
      raise ValueError(
          f"2 * sum(mrope_section={self.mrope_section}) must equal head_dim {self.head_dim}")
    if self.hidden_act != "silu":
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (Qwen2.5-VL uses silu)")

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  # Where the text after a video starts in the 3D rope positions (rope.py): "qwen" (the
  # original Qwen2.5-VL code and vLLM), "transformers_5.2" or "transformers_5.3".
  rope_convention: str = "qwen"

  def __post_init__(self):
    if self.rope_convention not in ROPE_CONVENTIONS:
      raise ValueError(f"rope_convention {self.rope_convention!r} not one of "
                       f"{ROPE_CONVENTIONS}")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(
          f"vision.out_hidden_size {self.vision.out_hidden_size} != text.hidden_size "
          f"{self.text.hidden_size}")

  def replace(self, **kw) -> "Qwen2_5_VLConfig":
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- HF config.json I/O
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "Qwen2_5_VLConfig":
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type not in (MODEL_TYPE, None) or (archs and ARCHITECTURE not in archs):
      raise ValueError(
          f"{source}: unsupported architecture (model_type={model_type!r}, "
          f"architectures={archs}); expected {MODEL_TYPE!r} / {ARCHITECTURE}")
    t = dict(d)
    t.update(d.get("text_config") or {})  # transformers>=5 nests the text keys.
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    theta = t.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    mrope = rope.get("mrope_section") or (16, 24, 24)
    v = d.get("vision_config") or {}
    vrope = v.get("rope_parameters") or {}
    try:
      vision = VisionConfig(
          depth=v["depth"], hidden_size=v["hidden_size"],
          intermediate_size=v["intermediate_size"], num_heads=v["num_heads"],
          in_channels=v.get("in_channels", v.get("in_chans", 3)),
          patch_size=v.get("patch_size", 14),
          temporal_patch_size=v.get("temporal_patch_size", 2),
          spatial_merge_size=v.get("spatial_merge_size", 2),
          window_size=v.get("window_size", 112),
          fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
          out_hidden_size=v.get("out_hidden_size", t["hidden_size"]),
          tokens_per_second=v.get("tokens_per_second", 2),
          rope_theta=vrope.get("rope_theta", 10000.0),
          hidden_act=v.get("hidden_act", "silu"))
      text = TextConfig(
          vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
          intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
          num_attention_heads=t["num_attention_heads"],
          num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
          rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
          mrope_section=tuple(mrope),
          max_position_embeddings=t.get("max_position_embeddings", 128000),
          tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
          hidden_act=t.get("hidden_act", "silu"),
          head_dim_override=t.get("head_dim"))
    except KeyError as e:
      raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
    ids = {k: d.get(k, t.get(k)) for k in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    rule = d.get(ROPE_CONVENTION_KEY) or "qwen"
    if rule not in ROPE_CONVENTIONS:
      raise ValueError(f"{source}: {ROPE_CONVENTION_KEY} {rule!r} not one of {ROPE_CONVENTIONS}")
    return cls(vision=vision, text=text,
               **{k: int(x) for k, x in ids.items() if x is not None},
               bos_token_id=t.get("bos_token_id", 151643),
               eos_token_id=t.get("eos_token_id", 151645),
               rope_convention=rule)

  def to_hf_dict(self, *, torch_dtype: str = "float32") -> dict[str, Any]:
    t, v = self.text, self.vision
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rope_scaling={"type": "mrope", "rope_type": "default",
                      "mrope_section": list(t.mrope_section)},
        use_sliding_window=False, sliding_window=None, max_window_layers=t.num_hidden_layers,
        attention_dropout=0.0, initializer_range=0.02, use_cache=True,
        bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
    if t.head_dim_override:
      text["head_dim"] = t.head_dim_override
    return dict(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE,
        **text,
        text_config=dict(text, model_type="qwen2_5_vl_text",
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section)}),
        vision_config=dict(
            model_type="qwen2_5_vl", depth=v.depth, hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            in_chans=v.in_channels, in_channels=v.in_channels, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            out_hidden_size=v.out_hidden_size,
            # transformers>=5 validates an int here (the released configs hold 2).
            tokens_per_second=(int(v.tokens_per_second)
                               if float(v.tokens_per_second).is_integer()
                               else v.tokens_per_second),
            hidden_act=v.hidden_act),
        image_token_id=self.image_token_id, video_token_id=self.video_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
        torch_dtype=torch_dtype,
        **{ROPE_CONVENTION_KEY: self.rope_convention})

  @classmethod
  def from_json_file(cls, path: str) -> "Qwen2_5_VLConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=path)

  @staticmethod
  def recorded_rope_convention(path: str) -> str | None:
    """The rope rule the HF directory `path` records (our exports do), else None (a stock
    checkpoint, or an export written before the rule was recorded)."""
    f = os.path.join(path, "config.json")
    try:
      with open(f) as fh:
        return json.load(fh).get(ROPE_CONVENTION_KEY)
    except (OSError, ValueError, AttributeError):
      return None

  @staticmethod
  def check_rope_convention(wanted: str, recorded: str | None, what: str) -> None:
    """A `ConfigError` when `what` (a model directory or checkpoints) records another rope
    rule than `wanted`: its numbers were trained with that one."""
    if recorded and recorded != wanted:
      raise ConfigError(
          f"{what} was trained with rope convention {recorded!r}, this run asks for "
          f"{wanted!r}: pass --config.model.rope_convention={recorded} to use it as trained")

  @classmethod
  def from_pretrained_dir(cls, path: str) -> "Qwen2_5_VLConfig":
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
      raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    return cls.from_json_file(f)


# Published sizes (RECIPE.md). Vision towers are identical; only out_hidden_size follows text.
def _preset(hidden, mlp, layers, heads, kv, vocab, tied) -> Qwen2_5_VLConfig:
  return Qwen2_5_VLConfig(
      vision=VisionConfig(out_hidden_size=hidden),
      text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, tie_word_embeddings=tied))


PRESETS: dict[str, Qwen2_5_VLConfig] = {
    "3b": _preset(2048, 11008, 36, 16, 2, 151936, True),
    "7b": _preset(3584, 18944, 28, 28, 4, 152064, False),
    "32b": _preset(5120, 27648, 64, 40, 8, 152064, False),
    "72b": _preset(8192, 29568, 80, 64, 8, 152064, False),
}
