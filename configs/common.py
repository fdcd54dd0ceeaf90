"""Shared config presets. Every stage config builds on these; `main.py` turns the
resolved ConfigDict into frozen dataclasses once (library code never reads it).

Conventions: empty string = "not set" (use the default described next to the key);
0 for step counts = "not set".
"""
from __future__ import annotations

import ml_collections

def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style `--config=path:key=value,flag` args: "real,steps=10" ->
  {real: True, steps: 10} over `defaults` (values typed like their defaults; unknown
  names are an error)."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not eq:
      out[key] = True
    elif kind is bool:
      out[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      checkpoint="",      # HF directory; "" = the built-in tiny model (written once to cache_dir)
      cache_dir="",       # "" = $DEEPINTUIT_CACHE or ~/.cache/deepintuit_jax
      dtype="bfloat16",   # compute dtype
      param_dtype="float32",  # master weights
      remat="none",       # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      attention_impl="",  # "" = auto | blockwise | cudnn | pallas | reference (= xla)
      # Where the text after a video starts in the 3D rope positions: qwen (the original
      # Qwen2.5-VL code and vLLM) | transformers_5.2 | transformers_5.3. Recorded in the
      # export's config.json; a run starting from a model that records another is refused.
      rope_convention="qwen",
  ))


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      train_file="",      # release-format JSON/JSONL; "" = the generated benchmark
      eval_files="",      # "name=path,name=path"; with the generated benchmark "" means
                          # its test_close and test_open splits; "none" = no eval
      class_file="",      # "" = labels taken from the records
      video_root="",      # where video paths of the annotations are looked up
      on_bad_sample="error",  # error | skip
      max_frames=32,
      max_pixels=200704,
      min_pixels=3136,
      max_seq_len=8192,
      sampling="release",  # release | fps
      num_workers=0,      # Grain decode processes
      special_tokens="added",  # class labels, <think>, </think>, <answer>, </answer> and
                               # <NO_POLICY> as atomic tokens (new rows random): "added"
                               # (plain added tokens: kept by skip_special_tokens=True),
                               # "special" (as the release) or "none"
      prefetch_steps=2,   # steps of batches prepared ahead in a thread (0 = none; one process)
      synthetic_train=300,  # generated benchmark sizes (only when train_file is "")
      synthetic_test=72,
  ))


def mesh_config() -> ml_collections.ConfigDict:
  # (data, fsdp, tensor); one -1 takes the remaining devices.
  return ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))


def checkpoint_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=2,             # latest complete checkpoints kept
      export=True,        # write an HF directory (with tokenizer) at the end: <workdir>/hf
      async_save=True,
  ))


def eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every_steps=0,      # 0 = only at the end
      batch_size=8,
      max_new_tokens=512,
      temperature=0.0,    # 0 = greedy
      max_items=0,        # 0 = every item of each split
  ))
