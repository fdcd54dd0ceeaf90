"""The whole DeepIntuit chain in one command (../shared/RECIPE.md): SFT -> GRPO -> traces ->
calibration (label token; hidden-state head) -> two-stage evaluation -> results table.

    python -m deepintuit_jax.main --config=configs/deepintuit.py          # embedded default
    python -m deepintuit_jax.main --config=configs/deepintuit.py \
        --config.model.checkpoint=/models/Qwen2.5-VL-7B-Instruct \
        --config.sft.data.train_file=/data/coldstart_train.json \
        --config.grpo.data.train_file=/data/stage1_train.json \
        --config.traces.data.train_file=/data/generation_input.json \
        --config.data.eval_files=test_close=/data/test.json,test_open=/data/test_open.json \
        --config.data.class_file=/data/policy_info.json --config.data.video_root=/data/frame_zips

Each step runs in its own sub-workdir (<workdir>/<step>) with its own config, the one of
configs/<stage>.py, here nested as `--config.<step>.x=y`. The chain sets what steps hand over
(init_from = the previous stage's HF export, the trace workdir, the calibrators) and copies
the shared keys (seed, recipe, model, mesh, data.*; chain.SHARED_DATA_KEYS) into every step. A step whose stage
is not registered in deepintuit_jax/main.py (or has no config file) is skipped with a note.
Rerunning after a kill skips finished steps (<step>/stage_done.json) and resumes the one it
was in. The end: results.md / results.json (rows = models, columns = accuracy and macro-F1 on
the close- and open-instance splits, their drop, ECE).

Arg variants: `real` (the release recipe in every step), `pulse` (a few steps each).
"""
from __future__ import annotations

import importlib

import ml_collections

from configs import common

# The steps in order: (step name = sub-workdir and config key, config module, its arg).
# The results table lists the models of each step's eval report in this order.
STEPS = (("imitation_scratch", "configs.imitation", "scratch"),
         ("imitation", "configs.imitation", ""), ("sft", "configs.sft", ""),
         ("grpo", "configs.grpo", ""), ("grpo_control", "configs.grpo", "control"),
         ("traces", "configs.traces", ""),
         ("calibrate", "configs.calibrate", ""), ("calibrate_hidden", "configs.calibrate", "hidden"),
         ("infer", "configs.infer", ""))


def _step_config(module: str, arg: str):
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    return None
  return mod.get_config(arg or None)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False)
  c = ml_collections.ConfigDict()
  c.stage = "deepintuit"
  c.seed = 42
  c.recipe = "auto"
  c.model = common.model_config()
  c.mesh = common.mesh_config()
  c.data = common.data_config()
  # Shared by every step: the tiny recipe's (each step's own recipe tables turn them into
  # the release's 32 frames / 200,704 pixels for a real checkpoint).
  c.data.max_frames = 8
  c.data.max_pixels = 64 * 28 * 28
  # 270 generated clips per test split (the single stages' default is 72): over three seeds
  # the spread of open accuracy at 72 clips (0.03-0.06, about a binomial's 0.059) could not
  # tell rows 0.05 apart; 270 brings the binomial error to 0.03 (README, "The whole chain").
  c.data.synthetic_test = 270
  c.close_split = "test_close"   # the eval split names of the results table's columns
  c.open_split = "test_open"
  c.steps = ""  # "" = every step of STEPS that has a config; else comma-separated names
  names = []
  for name, module, step_arg in STEPS:
    parts = [p for p in (step_arg, "pulse" if args.pulse else "", "real" if args.real else "")
             if p]
    sub = _step_config(module, ",".join(parts))
    if sub is not None:
      c[name] = sub
      names.append(name)
  c.steps = ",".join(names)
  if "sft" in names and not args.real and not args.pulse:
    # The release's shape: SFT a short cold start that leaves room (140 steps, not the single
    # stage's 5 epochs = 188: held-out 0.694 close / 0.319 open, format 0.86, against 0.90 /
    # 0.42), GRPO the task (docs/stages.md "Why this recipe"). A real checkpoint's recipe
    # sets it back to the release's epochs (configs/sft.py RELEASE).
    c.sft.train.num_steps = 140
  if args.real:
    c.recipe = "release"
    c.data.max_frames, c.data.max_pixels = 32, 200704
  if args.pulse:
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
  return c
