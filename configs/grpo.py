"""Stage 1, GRPO (../shared/RECIPE.md "Stage 1"), starting from the SFT stage's result.

    python -m deepintuit_jax.main --config=configs/sft.py     # first: the SFT default
    python -m deepintuit_jax.main --config=configs/grpo.py    # then GRPO from runs/sft
    python -m deepintuit_jax.main --config=configs/grpo.py \
        --config.model.checkpoint=/path/Qwen2.5-VL-7B-Instruct --config.init_from=/runs/sft7b \
        --config.data.train_file=stage1_train.json --config.data.eval_files=test=test.json

Arg variants (`--config=configs/grpo.py:real`, combined with commas): `control` the
frozen-policy control (rollouts and rewards of the starting policy on the same prompts and
keys, no update, no export: the baseline of the reward curves); `real` forces the release's recipe
(otherwise it applies whenever model.checkpoint is set); `pulse` a few-iteration smoke run
on a smaller generated benchmark, starting from the built-in tiny model itself (init_from
"none"; pass --config.init_from to start from an SFT run).

With model.checkpoint empty the defaults are the tiny-model ones (small groups and batches,
short responses, a few iterations: minutes on a CPU).
"""
from __future__ import annotations

import ml_collections

from configs import common
from deepintuit_jax.core import recipes

# The release's GRPO recipe (../shared/RECIPE.md, stage 1): with model.checkpoint set (or
# `:real`) these values replace the tiny ones the fields below hold (deepintuit_jax/core/recipes.py).
RELEASE = {"train.learning_rate": 1e-6, "train.warmup_steps": 10, "train.epochs": 20,
           "train.num_steps": 0, "train.frozen": "", "grpo.group_size": 8,
           "grpo.prompts_per_rollout": 64, "grpo.mini_batch_prompts": 32,
           "grpo.max_response_tokens": 2048, "grpo.temperature": 1.0,
           "grpo.dynamic_sampling": False, "grpo.rewards": "format:1.0,accuracy:1.0",
           "data.max_frames": 32, "data.max_pixels": 200704,
           "eval.max_new_tokens": 2048, "checkpoint.every_steps": 50}
# The tiny recipe (the fields below), chosen by measurement from the chain's SFT export
# (docs/stages.md "GRPO", "Why this recipe"):
# - sampling at 0.7: at 1.0 only 6-38% of the tiny SFT policy's rollouts are well formed
#   (62-94% at 0.7), so most groups carried no signal;
# - the vision tower frozen, lr 1e-4, dynamic sampling, 8 prompts x G 8 per rollout, 40 steps:
#   a reward of one fixed answer climbs 0.21 -> 0.65 (first / last quarter) in 40 steps, while
#   held-out accuracy stays within the seed spread of SFT's (README table); with the whole
#   model trained at lr 1e-4 the text degenerated (format 0.88 -> 0.75, held-out close 0.92 ->
#   0.74), and lr 1e-5 with 4 x G 4 for 16 steps moved nothing measurable;
# - 120 steps, not 40: from the full SFT the accuracy reward's first / last quarter rose
#   +0.08 to +0.13 over seeds 42, 1, 2 (40 steps: +0.03 to +0.07); from the chain's short
#   cold start, with the rewards below, +0.19, +0.13, +0.10 (the frozen control -0.03 to
#   +0.00; README; docs/stages.md "GRPO");
# - 180 steps, not 120: from the cold start +0.22, +0.22, +0.13, and SFT + GRPO above SFT on
#   both splits at every seed (120 steps: one seed of three below it);
# - the accuracy reward alone (format logged at weight 0; the release adds them): with both
#   at weight 1, from a short cold start the policy learnt the format and lost the task
#   (held-out close 0.694 -> 0.472, format 1.00); with accuracy alone the same start went to
#   0.917 close / 0.444 open (from 0.694 / 0.319), and from the full SFT 0.926 / 0.463
#   against 0.900 / 0.452 with both rewards (docs/stages.md "Why this recipe").


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, real=False, pulse=False, control=False)
  c = ml_collections.ConfigDict()
  c.stage = "grpo"
  c.seed = 42
  # The SFT stage's workdir (its checkpoints/) or an HF directory; own checkpoints win;
  # "none" = start from model.checkpoint itself.
  c.init_from = "runs/sft"
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
  c.checkpoint.every_steps = 10
  c.train = ml_collections.ConfigDict(dict(
      num_steps=180,      # optimizer steps (> 0 overrides epochs; rounded up to whole
                          # rollout batches); 0 = from epochs (the release's)
      epochs=1,           # passes over the training prompts
      learning_rate=1e-4,
      warmup_steps=2,     # linear warmup, then constant (verl's actor schedule)
      weight_decay=0.1,
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0,      # max global norm; 0 = off
      frozen=r"^visual\.",  # comma-separated regexes; "" = everything trains (vision
                          # included: the release's)
      log_every=1,
      offload_optimizer=False,  # the optimizer state (AdamW's fp32 moments, 8 bytes per
                                # trainable parameter, sharded) kept in host memory between
                                # steps, off the devices (docs/accelerators.md)
  ))
  c.grpo = ml_collections.ConfigDict(dict(
      group_size=8,           # G responses per prompt
      prompts_per_rollout=8,  # prompts per rollout batch (global)
      mini_batch_prompts=4,   # prompts per optimizer step (global)
      micro_batch_prompts=0,  # prompts per accumulation pass (0 = the mini-batch at once)
      ppo_epochs=1,           # passes over each rollout batch
      max_response_tokens=160,
      temperature=0.7,        # the release samples at 1.0
      top_p=1.0,
      rewards="format:0.0,accuracy:1.0",  # name:weight of registered rewards (weight 0:
                                          # logged, not rewarded; the release: format:1.0)
      reward_modules="",      # comma-separated modules or .py files imported first: their
                              # @algorithms.grpo.rewards.register(name) adds rewards to name
      advantage="grpo",       # grpo | dr_grpo | rloo | reinforce_plus_plus_baseline
      policy_loss="vanilla",  # vanilla | gspo
      loss_agg="token-mean",  # token-mean | seq-mean-token-sum | seq-mean-token-mean |
                              # seq-mean-token-sum-norm
      clip_low=-1.0,          # -1 = the policy loss's default (vanilla 0.2, gspo 3e-4)
      clip_high=-1.0,         # -1 = the policy loss's default (vanilla 0.28, gspo 4e-4)
      dual_clip=3.0,
      tis_cap=2.0,            # truncated importance sampling cap; 0 = off
      kl_coef=0.0,            # > 0: KL to a frozen reference copy of the start, as a loss term
      kl_kind="low_var_kl",   # k1 | k2 | k3 (= low_var_kl) | abs (+ kl, mse aliases)
      entropy_coef=0.0,       # entropy bonus
      dynamic_sampling=True,  # drop groups whose rewards are all equal, refill (the
                              # release does not)
      max_refills=2,          # extra prompt batches drawn per rollout at most
      logp_chunk=1024,        # tokens per chunk of the log-prob passes (0 = unchunked)
      length_steps=8,         # learner rows padded to each length bucket's interval cut
                              # into this many steps (<= that many compiled shapes per
                              # bucket); 1 = the pipeline's buckets
      share_prompt=True,      # the learner runs each prompt and its video once under its G
                              # responses (False: one prompt ++ response row per response)
      control=False,          # the frozen-policy control: roll out and score the same prompts
                              # with the same keys, never update (`:control`)
  ))
  recipes.attach(c, RELEASE, real=args.real)
  if args.control:  # its rewards are the baseline of a GRPO run's reward curves
    c.grpo.control = True
    c.checkpoint.export = False
    c.data.eval_files = "none"
  if args.pulse:
    c.init_from = "none"
    c.train.num_steps = 4
    c.checkpoint.every_steps = 2
    c.data.synthetic_train, c.data.synthetic_test = 16, 4
    c.eval.max_new_tokens = 8
    c.grpo.max_response_tokens = 16
    c.grpo.group_size, c.grpo.prompts_per_rollout, c.grpo.mini_batch_prompts = 4, 4, 2
    c.grpo.dynamic_sampling = False
  return c
