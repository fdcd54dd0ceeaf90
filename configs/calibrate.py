"""Stage 2b, intuitive calibration (../shared/RECIPE.md "Stage 2"): the calibrator learns the
final label from the video plus a trace of the policy (the trace stage's meta-review
examples, wrong traces included).

    python -m deepintuit_jax.main --config=configs/calibrate.py      # after configs/traces.py
    python -m deepintuit_jax.main --config=configs/calibrate.py --config.calibrate.head=hidden_state
    python -m deepintuit_jax.main --config=configs/calibrate.py \
        --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct --config.init_from=/runs/grpo7b/hf \
        --config.traces=/runs/traces7b

`calibrate.head`: `label_token` (the release: the full VLM from the GRPO model, cross-entropy
on the single label token; exported to <workdir>/hf) or `hidden_state` (the ablation: the
VLM frozen, a linear head on pooled final hidden states; exported to <workdir>/head).
With model.checkpoint set the release recipe applies: lr 2e-5, 10 epochs, global batch 256,
grad clip 1.0, 6% warmup, bf16, vision frozen, 32 frames.

Arg variants: `real` forces the release recipe; `pulse` a few steps starting from the tiny
model itself (needs a trace workdir: --config.traces=...).
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes


# The release's recipe: with model.checkpoint set (or `:real`) these values replace the tiny
# ones the fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"train.learning_rate": 2e-5, "train.head_learning_rate": 1e-3, "train.epochs": 10,
           "train.batch_size": 256, "data.max_frames": 32, "data.max_pixels": 200704,
           "checkpoint.every_steps": 500}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False, hidden=False)
  c = ml_collections.ConfigDict()
  c.stage = "calibrate"
  c.seed = 42
  # The policy to start from: the GRPO stage's workdir (hf/ export or checkpoints/) or an
  # HF directory; "none" = model.checkpoint. Own checkpoints win (resume).
  c.init_from = "runs/grpo"
  # The trace stage's workdir (calibration_train.json, classes.json, calibration_meta.json).
  c.traces = "runs/traces"
  c.recipe = "auto"  # auto (release iff model.checkpoint is set) | release | tiny
  c.model = common.model_config()
  c.data = common.data_config()
  c.mesh = common.mesh_config()
  c.checkpoint = common.checkpoint_config()
  # "" = from the trace workdir: its calibration_train.json and classes.json.
  c.data.train_file = ""
  c.data.eval_files = "none"
  # The tiny recipe (the embedded default; RELEASE above for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  c.checkpoint.every_steps = 50
  c.calibrate = ml_collections.ConfigDict(dict(
      head="label_token",  # label_token | hidden_state
  ))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=0,        # > 0 overrides epochs
      epochs=1,
      batch_size=16,      # global
      micro_batch_size=0,  # global batch of one accumulation step; 0 = batch_size
      learning_rate=1e-3,  # of the label_token calibrator (the whole VLM but its tower)
      head_learning_rate=1e-2,  # of the hidden_state calibrator (its head alone)
      warmup_ratio=0.06,
      weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0,
      frozen="auto",      # regexes; auto = the vision tower (label_token), the VLM (hidden_state)
      log_every=1,
      offload_optimizer=False,  # the optimizer state (AdamW's fp32 moments, 8 bytes per
                                # trainable parameter, sharded) kept in host memory between
                                # steps, off the devices (docs/accelerators.md)
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.hidden:
    c.calibrate.head = "hidden_state"
  if args.pulse:
    c.init_from = "none"
    c.train.num_steps = 3
    c.checkpoint.every_steps = 2
  return c
