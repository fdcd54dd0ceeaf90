"""Checks of a stage config before anything is built or written (the entry layer reads the
ConfigDict; library code never does).

Each failure is a `ConfigError` / `InputNotFound` / `InputError` naming the key, the value
and the reason, which `main` prints as one line. Only keys the config has are checked, so
every stage config built on `configs/common.py` gets the same checks. Values the stage's
`from_config` validates itself (enumerations, batch divisibility) are left to it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from deepintuit_jax.core import paths
from deepintuit_jax.core.errors import ConfigError, InputNotFound

# key -> (predicate, what a valid value is).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train.num_steps": (lambda v: v >= 0, ">= 0 (0 = train for train.epochs)"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.micro_batch_size": (lambda v: v >= 0, ">= 0 (0 = no accumulation)"),
    "train.learning_rate": (lambda v: v > 0, "> 0"),
    "train.head_learning_rate": (lambda v: v > 0, "> 0"),
    "train.warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.loss_chunk": (lambda v: v >= 0, ">= 0 (0 = unchunked)"),
    "checkpoint.every_steps": (lambda v: v >= 1, ">= 1"),
    "checkpoint.keep": (lambda v: v >= 1, ">= 1"),
    "eval.every_steps": (lambda v: v >= 0, ">= 0 (0 = at the end only)"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval.temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "eval.max_items": (lambda v: v >= 0, ">= 0 (0 = every item)"),
    "data.max_frames": (lambda v: v >= 1, ">= 1"),
    "data.max_pixels": (lambda v: v >= 1, ">= 1"),
    "data.min_pixels": (lambda v: v >= 1, ">= 1"),
    "data.max_seq_len": (lambda v: v >= 1, ">= 1"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.prefetch_steps": (lambda v: v >= 0, ">= 0 (0 = no read-ahead)"),
    "data.synthetic_train": (lambda v: v >= 1, ">= 1"),
    "data.synthetic_test": (lambda v: v >= 1, ">= 1"),
}


# What to run first when a stage's init_from (an earlier stage's result) is missing.
_INIT_FROM_HINTS = {"grpo": "; GRPO starts from the SFT stage's result: run `python -m "
                            "deepintuit_jax.main --config=configs/sft.py` first (or set "
                            "--config.init_from to an SFT workdir, an HF directory, or none)"}


def _choices() -> dict[str, tuple[str, ...]]:
  from deepintuit_jax.data import chat, errors as data_errors, video_decode
  from deepintuit_jax.models.qwen2_5_vl import rope
  return {"data.special_tokens": chat.TOKEN_MODES, "data.on_bad_sample": data_errors.ON_BAD_SAMPLE,
          "data.sampling": video_decode.SAMPLING, "recipe": ("auto", "release", "tiny"),
          "model.rope_convention": rope.CONVENTIONS}


def _get(config, dotted: str):
  """The value at `dotted` or None when the config has no such key."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _exists(key: str, path: str, *, kind: str) -> None:
  ok = paths.isdir(path) if kind == "directory" else paths.isfile(path)
  if not ok:
    what = "no such " + kind if not paths.exists(path) else f"not a {kind}"
    raise InputNotFound(f"{key}={path!r}: {what}")


def _check_export(key: str, path: str, *, exports: bool = True) -> None:
  """An HF directory (or, with `exports`, a stage workdir's hf/ export) when there is one at
  `path`: complete (config.json, tokenizer, every weight shard whole)."""
  from deepintuit_jax.models.qwen2_5_vl.hf_load import check_model_dir
  for cand in (path, os.path.join(path, "hf")) if exports else (path,):
    if os.path.isfile(os.path.join(cand, "config.json")):
      check_model_dir(cand, key=key)
      return


def check_config(config) -> None:
  """Raises the first problem found in `config` (a ConfigDict of a stage)."""
  for key, (ok, valid) in _RULES.items():
    value = _get(config, key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
      raise ConfigError(f"{key}={value!r}: must be {valid}")
  for key, allowed in _choices().items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
  checkpoint = _get(config, "model.checkpoint")
  if checkpoint:
    from deepintuit_jax.models.qwen2_5_vl.hf_load import check_model_dir
    check_model_dir(checkpoint, key="model.checkpoint")
  init_from = _get(config, "init_from")
  # "none": start from model.checkpoint; "auto": the tiny base or model.checkpoint (sft,
  # imitation: tiny_base.default_init); a gs:// Orbax checkpoint is checked by common.prepare
  if init_from and init_from not in ("none", "auto") and "://" not in init_from:
    if not os.path.exists(init_from):
      raise InputNotFound(f"init_from={init_from!r}: no such directory (an HF model "
                          "directory or another stage's workdir / checkpoints)"
                          + _INIT_FROM_HINTS.get(_get(config, "stage"), ""))
    _check_export("init_from", init_from, exports=False)  # a workdir: its checkpoints
  # Models handed over by earlier stages (the chain's hf/ exports): whole, or named.
  policy = _get(config, "infer.policy")
  handed = [("infer.policy", policy)] if policy and policy != "none" else []
  for name, path in paths.parse_named(_get(config, "infer.baselines") or "", "infer.baselines"):
    handed.append((f"infer.baselines[{name}]", path))
  for key, path in handed:
    if path and "://" not in path:
      _check_export(key, path)
  for key in ("data.train_file", "data.class_file"):
    if _get(config, key):
      _exists(key, _get(config, key), kind="file")
  if _get(config, "data.video_root"):
    _exists("data.video_root", _get(config, "data.video_root"), kind="directory")
  eval_files = _get(config, "data.eval_files")
  if eval_files and eval_files != "none":
    for name, path in paths.parse_named(eval_files, "data.eval_files"):
      _exists(f"data.eval_files[{name}]", path, kind="file")
