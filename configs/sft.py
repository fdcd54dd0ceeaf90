"""Stage 0, cold-start SFT (../shared/RECIPE.md).

    python -m deepintuit_jax.main --config=configs/sft.py              # embedded default
    python -m deepintuit_jax.main --config=configs/sft.py \
        --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct \
        --config.data.train_file=train.json --config.data.video_root=/videos

Arg variants (`--config=configs/sft.py:real`): `real` forces the release's recipe
(otherwise it applies whenever model.checkpoint is set; `recipe=auto`); `pulse` a few-step
smoke run on a smaller generated benchmark.

With model.checkpoint empty the defaults are the tiny-model ones: the run starts from the
shipped tiny base (`init_from=auto`, deepintuit_jax/models/tiny_base.py: a tiny Qwen2.5-VL
pretrained on described clips), vision tower frozen as in the release recipe, a higher lr,
small batches, enough steps to learn in minutes. `--config.init_from=` (empty) starts from
the random tiny model instead.
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes

# The release's recipe (../shared/RECIPE.md, stage 0): with model.checkpoint set (or `:real`)
# these values replace the tiny ones the fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"train.learning_rate": 2e-5, "train.num_steps": 0, "train.epochs": 5,
           "train.batch_size": 64,
           "data.max_frames": 32, "data.max_pixels": 200704, "eval.max_new_tokens": 2048,
           "checkpoint.every_steps": 500}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False)
  c = ml_collections.ConfigDict()
  c.stage = "sft"
  c.seed = 42
  # An HF dir or another stage's workdir/checkpoints (own checkpoints win); "auto" = the
  # tiny base when model.checkpoint is empty, else model.checkpoint; "" = model.checkpoint
  # (the random tiny model when that is empty).
  c.init_from = "auto"
  c.recipe = "auto"  # auto (release recipe iff model.checkpoint is set) | release | tiny
  c.model = common.model_config()
  c.data = common.data_config()
  c.mesh = common.mesh_config()
  c.checkpoint = common.checkpoint_config()
  c.eval = common.eval_config()
  # The tiny recipe (the embedded default; RELEASE above for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  c.eval.max_new_tokens = 192
  c.checkpoint.every_steps = 50
  c.train = ml_collections.ConfigDict(dict(
      num_steps=0,        # > 0 overrides epochs
      epochs=5,
      batch_size=8,       # global
      micro_batch_size=0,  # global batch of one accumulation step; 0 = batch_size
      learning_rate=1e-3,  # from the tiny base (5e-3 was the random tiny model's)
      warmup_ratio=0.06,
      weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0,      # max global norm; 0 = off
      frozen=r"^visual\.",  # comma-separated regexes over parameter paths
                          # ('visual.blocks.0...'); both recipes freeze the tower (the tiny
                          # base's is pretrained); "" trains it too
      log_every=1,
      offload_optimizer=False,  # the optimizer state (AdamW's fp32 moments, 8 bytes per
                                # trainable parameter, sharded) kept in host memory between
                                # steps, off the devices (docs/accelerators.md)
      loss_chunk=1024,    # tokens per chunk of the cross-entropy (logits [chunk, V] at a
                          # time, recomputed in the backward); 0 = full [B, T, V] logits
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.pulse:
    c.train.num_steps = 3
    c.checkpoint.every_steps = 2
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
    c.eval.max_new_tokens = 8
  return c

