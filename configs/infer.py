"""Two-stage inference and the evaluation report (../shared/RECIPE.md "Inference"): the
policy writes one trace per item (temperature 0.01, seeded), each calibrator scores it in one
forward step; every model is evaluated on every split.

    python -m deepintuit_jax.main --config=configs/infer.py      # after grpo, traces, calibrate
    python -m deepintuit_jax.main --config=configs/infer.py \
        --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct \
        --config.infer.policy=/runs/grpo7b/hf --config.infer.calibrators=label_token=/runs/cal7b \
        --config.data.eval_files=test=/data/test.json --config.data.class_file=policy_info.json \
        --config.data.video_root=/data/frame_zips

Outputs: <split>/traces.jsonl (resumable), <split>/calibration_<prompt>.json,
predictions_<model>_<split>.jsonl (rows: id, response, scores, prediction, label),
eval_report.md / .json and plots/ (confusion matrices, reliability diagrams; also in tb/).

Arg variants: `real` forces the release recipe; `pulse` a tiny smoke run (policy = the tiny
model itself; pass --config.infer.calibrators).
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes


# The release's recipe: with model.checkpoint set (or `:real`) these values replace the tiny
# ones the fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"infer.max_new_tokens": 2048, "infer.prompt": "full", "eval.max_new_tokens": 2048,
           "data.max_frames": 32, "data.max_pixels": 200704}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False)
  c = ml_collections.ConfigDict()
  c.stage = "infer"
  c.seed = 42
  c.recipe = "auto"  # auto (release iff model.checkpoint is set) | release | tiny
  c.model = common.model_config()
  c.data = common.data_config()
  c.mesh = common.mesh_config()
  c.eval = common.eval_config()  # generation settings of the baselines (greedy)
  # The tiny recipe (the embedded default; RELEASE above for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  c.eval.max_new_tokens = 192
  c.infer = ml_collections.ConfigDict(dict(
      policy="runs/grpo",     # HF directory or a stage workdir with hf/; none = model.checkpoint
      policy_name="SFT + GRPO",  # its row in the report (its own parsed answers)
      # name=path of calibrators: a calibrate workdir (hf/ or head/ inside) or the
      # directory itself; "" = none (the policy alone)
      calibrators="label_token=runs/calibrate",
      baselines="",           # name=path of HF models evaluated alone (greedy), e.g. SFT=runs/sft
      batch_size=8,
      max_new_tokens=192,     # of the policy's trace
      temperature=0.01,
      prompt="compact",       # meta-review prompt (full | compact) when a calibrator does not
                              # record its own
      priority="",            # tie-break order; "" = the class order
      max_items=0,            # 0 = every item of each split
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.pulse:
    c.infer.policy = "none"
    c.infer.calibrators = ""
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
    c.infer.max_new_tokens = 8
    c.eval.max_new_tokens = 8
  return c
