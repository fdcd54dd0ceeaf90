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
  c.data.max_frames = -1   # by recipe (tables in deepintuit_jax/trainers/traces_stage.py)
  c.data.max_pixels = -1
  c.data.eval_files = "none"
  c.traces = ml_collections.ConfigDict(dict(
      num_traces=-1,       # K traces per video (release 4)
      temperature=-1.0,    # -1 = by recipe (release 1.0, tiny 0.7)
      max_new_tokens=-1,   # release 2048
      batch_size=8,        # videos per sampler batch (K rows each)
      prompt="auto",       # meta-review prompt: full | compact (auto: compact for the tiny model)
      priority="",         # tie-break order, comma-separated labels; "" = the class order
      max_items=0,         # 0 = every training video
  ))
  if args.real:
    c.recipe = "release"
  if args.pulse:
    c.init_from = "none"
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
    c.traces.num_traces = 2
    c.traces.max_new_tokens = 8
  return c
