"""The imitation baseline (issue 11): a video-encoder classifier, the VLM's vision tower plus a
head that keeps space and time (deepintuit_jax/models/video_classifier.py), trained with
cross-entropy on the labels on SFT's training split and frames, scored on the same test
splits (accuracy, macro-F1, ECE) in the same report format as the other stages.

    python -m deepintuit_jax.main --config=configs/imitation.py             # embedded default
    python -m deepintuit_jax.main --config=configs/imitation.py:scratch     # random tower
    python -m deepintuit_jax.main --config=configs/imitation.py \
        --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct \
        --config.data.train_file=train.json --config.data.video_root=/videos

`imitation.init`: `pretrained` (default) keeps the base checkpoint's vision tower (the tiny
base's pretrained `visual.*` for the embedded default, `init_from=auto`; Qwen2.5-VL's for
real runs; `init_from` an HF directory, e.g. another stage's export, takes its tower
instead); `scratch` a random tower of the same shape. The report names the model
`imitation (pretrained tower)` / `imitation (scratch)`.

Arg variants (`--config=configs/imitation.py:pulse,scratch`): `real` forces the release-style
recipe (otherwise it applies whenever model.checkpoint is set); `scratch` sets
imitation.init=scratch; `pulse` a three-step smoke run on a smaller generated benchmark.
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes


# The release-scale recipe (the frames are SFT's; docs/stages.md "Imitation baseline" says why
# the rest): with model.checkpoint set (or `:real`) these values replace the tiny ones the
# fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"train.learning_rate": 5e-5, "train.epochs": 10, "train.batch_size": 64,
           "train.weight_decay": 0.05, "data.max_frames": 32, "data.max_pixels": 200704,
           "checkpoint.every_steps": 500, "imitation.head_width": 512,
           "imitation.head_depth": 2, "imitation.head_heads": 8}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False, scratch=False)
  c = ml_collections.ConfigDict()
  c.stage = "imitation"
  c.seed = 42
  # An HF dir (its tower) or an imitation workdir (own checkpoints win); "auto" = the tiny
  # base (deepintuit_jax/models/tiny_base.py) when model.checkpoint is empty, else
  # model.checkpoint; "" = model.checkpoint (the random tiny model when that is empty).
  c.init_from = "auto"
  c.recipe = "auto"  # auto (release iff model.checkpoint is set) | release | tiny
  c.model = common.model_config()
  c.data = common.data_config()
  c.mesh = common.mesh_config()
  c.checkpoint = common.checkpoint_config()
  # The tiny recipe (the embedded default; RELEASE above for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  c.checkpoint.every_steps = 100
  c.checkpoint.export = False  # the classifier is not an HF model (must stay False)
  c.imitation = ml_collections.ConfigDict(dict(
      init="pretrained",  # pretrained (the base checkpoint's vision tower) | scratch
      head_width=64,      # the head's width
      head_depth=1,       # transformer blocks over [CLS] + the ordered tokens
      head_heads=4,       # attention heads
      head_mlp_ratio=4,   # MLP width / head width
      pos_frequencies=6,  # Fourier frequencies per axis of the (t, h, w) position embedding
  ))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=0,        # > 0 overrides epochs
      epochs=10,
      batch_size=8,       # global
      micro_batch_size=0,  # global batch of one accumulation step; 0 = batch_size
      learning_rate=3e-4,
      warmup_ratio=0.06,
      weight_decay=0.0,   # on matrices only
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0,      # max global norm; 0 = off
      frozen="",          # comma-separated regexes over parameter paths; "^visual\\." trains
                          # the head only (a probe of the tower); "" = end to end
      log_every=1,
      offload_optimizer=False,  # the optimizer state (AdamW's fp32 moments, 8 bytes per
                                # trainable parameter, sharded) kept in host memory between
                                # steps, off the devices (docs/accelerators.md)
  ))
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,      # 0 = only at the end
      batch_size=8,
      max_items=0,        # 0 = every item of each split
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.scratch:
    c.imitation.init = "scratch"
  if args.pulse:
    c.train.num_steps = 3
    c.checkpoint.every_steps = 2
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
  return c
