"""Stage 2a, trace generation (../shared/RECIPE.md "Stage 2"): the GRPO model writes K
reasoning traces per training video; they become the calibrator's meta-review examples.

    python -m deepintuit_jax.main --config=configs/traces.py     # after sft and grpo
    python -m deepintuit_jax.main --config=configs/traces.py \
        --config.init_from=/runs/grpo7b/hf --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct \
        --config.data.train_file=generation_input.json --config.data.class_file=policy_info.json \
        --config.data.video_root=/data/frame_zips

Outputs in the workdir: traces.jsonl (one row per (item, trace), resumable: a rerun after a
kill continues where it stopped), calibration_train.json (release-format meta-review records,
video paths made absolute), classes.json and calibration_meta.json (the prompt style the
calibrator and two-stage inference must share).

Arg variants: `real` forces the release recipe; `pulse` a tiny smoke run starting from the
built-in tiny model itself (init_from "none").
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes


# The release's recipe: with model.checkpoint set (or `:real`) these values replace the tiny
# ones the fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"traces.num_traces": 4, "traces.temperature": 1.0, "traces.max_new_tokens": 2048,
           "traces.prompt": "full", "data.max_frames": 32, "data.max_pixels": 200704}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False)
  c = ml_collections.ConfigDict()
  c.stage = "traces"
  c.seed = 42
  # The policy: the GRPO stage's workdir (its hf/ export) or an HF directory; "none" = the
  # model.checkpoint itself (smoke tests).
  c.init_from = "runs/grpo"
  c.recipe = "auto"  # auto (release iff model.checkpoint is set) | release | tiny
  c.model = common.model_config()
  c.data = common.data_config()
  c.mesh = common.mesh_config()
  # The tiny recipe (the embedded default; RELEASE above for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  c.data.eval_files = "none"
  c.traces = ml_collections.ConfigDict(dict(
      num_traces=4,        # K traces per video
      temperature=0.7,     # as the tiny GRPO's rollouts (configs/grpo.py says why)
      max_new_tokens=192,
      batch_size=8,        # videos per sampler batch (K rows each)
      prompt="compact",    # meta-review prompt: full | compact
      priority="",         # tie-break order, comma-separated labels; "" = the class order
      max_items=0,         # 0 = every training video
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.pulse:
    c.init_from = "none"
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
    c.traces.num_traces = 2
    c.traces.max_new_tokens = 8
  return c
