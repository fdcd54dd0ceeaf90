"""The GRPO stage (RECIPE.md "Stage 1"): config -> dataclasses (once), then a composition of
the shared stage plumbing (stages/common.py) around `grpo.learner.GRPOLearner`.

Starts from the SFT stage's result (`init_from`, default the SFT default's workdir
`runs/sft`); resume order as every stage (common.init_train_state). One loop item is one
rollout batch of prompts; the learner takes `grpo.steps_per_rollout` optimizer steps on it.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from deepintuit_jax.algorithms.grpo import learner as learner_lib
from deepintuit_jax.core import paths, recipes
from deepintuit_jax.data import chat, pipeline
from deepintuit_jax.engine import loop, optim
from deepintuit_jax.evals import curves, generation
from deepintuit_jax.stages import common, specs
from deepintuit_jax.stages.specs import CheckpointSpec, DataSpec, ModelSpec

SFT_COMMAND = "python -m deepintuit_jax.main --config=configs/sft.py"


@dataclasses.dataclass(frozen=True)
class GRPORun:
  seed: int
  init_from: str
  model: ModelSpec
  data: DataSpec
  optim: optim.OptimConfig
  grpo: learner_lib.GRPOConfig
  num_steps: int
  epochs: int
  log_every: int
  checkpoint: CheckpointSpec
  eval: generation.EvalConfig
  eval_every: int


def parse_rewards(spec: str) -> tuple[tuple[str, float], ...]:
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, colon, weight = part.partition(":")
    try:
      out.append((name.strip(), float(weight) if colon else 1.0))
    except ValueError:
      raise ValueError(f"grpo.rewards: {part!r} is not name:weight") from None
  if not out:
    raise ValueError("grpo.rewards is empty: name at least one reward (e.g. format:1,accuracy:1)")
  return tuple(out)


def import_reward_modules(spec: str) -> None:
  """Imports each comma-separated module name or `.py` path of `grpo.reward_modules`, whose
  `@rewards.register(name)` calls add rewards `grpo.rewards` can then name. A path is
  imported once per process (as module `deepintuit_reward_<stem>`), so a second stage in
  the same process (the chain) does not register its rewards twice."""
  for item in filter(None, (p.strip() for p in spec.split(","))):
    if not item.endswith(".py"):
      try:
        importlib.import_module(item)
      except ImportError as e:
        raise ValueError(f"grpo.reward_modules: cannot import {item!r} ({e})") from None
      continue
    path = os.path.abspath(os.path.expanduser(item))
    name = "deepintuit_reward_" + "".join(
        ch if ch.isalnum() else "_" for ch in os.path.splitext(path)[0])
    if name in sys.modules:
      continue
    if not os.path.isfile(path):
      raise ValueError(f"grpo.reward_modules: {item!r} is not a file")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
      module_spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise


def resolve_init_from(init_from: str) -> str:
  """"none" -> "" (start from model.checkpoint); a missing path is an error naming the SFT
  command to run first."""
  if init_from in ("", "none"):
    return ""
  path = paths.join(os.path.expanduser(init_from))
  if not paths.exists(path):
    raise FileNotFoundError(
        f"init_from {init_from!r} does not exist: GRPO starts from the SFT stage's result; "
        f"run `{SFT_COMMAND}` first (or set --config.init_from to an SFT workdir or HF "
        "directory, or to none)")
  return path


def from_config(c) -> GRPORun:
  """The locked ConfigDict -> frozen dataclasses (its recipe applied)."""
  c = recipes.resolve(c)
  init_from = resolve_init_from(c.init_from)
  g = c.grpo
  import_reward_modules(g.reward_modules)
  clip = lambda v: None if v == -1.0 else v  # noqa: E731 (-1 = the loss's default)
  grpo = learner_lib.GRPOConfig(
      group_size=g.group_size, prompts_per_rollout=g.prompts_per_rollout,
      mini_batch_prompts=g.mini_batch_prompts,
      micro_batch_prompts=g.micro_batch_prompts, ppo_epochs=g.ppo_epochs,
      max_response_tokens=g.max_response_tokens, temperature=g.temperature, top_p=g.top_p, advantage=g.advantage,
      policy_loss=g.policy_loss, loss_agg=g.loss_agg, clip_low=clip(g.clip_low),
      clip_high=clip(g.clip_high), dual_clip=g.dual_clip, tis_cap=g.tis_cap,
      kl_coef=g.kl_coef, kl_kind=g.kl_kind, entropy_coef=g.entropy_coef,
      dynamic_sampling=g.dynamic_sampling, max_refills=g.max_refills,
      rewards=parse_rewards(g.rewards), logp_chunk=g.logp_chunk,
      length_steps=g.length_steps, share_prompt=g.share_prompt, control=g.control)
  num_steps, epochs = c.train.num_steps, c.train.epochs
  if num_steps <= 0 and epochs <= 0:
    raise ValueError("set train.num_steps > 0 or train.epochs > 0")
  return GRPORun(
      seed=c.seed, init_from=init_from, model=specs.model_spec(c), data=specs.data_spec(c),
      optim=specs.optim_spec(c, warmup_ratio=0.0, warmup_steps=c.train.warmup_steps,
                             decay="constant"),
      grpo=grpo, num_steps=num_steps, epochs=epochs, log_every=c.train.log_every,
      checkpoint=specs.checkpoint_spec(c), eval=specs.eval_spec(c),
      eval_every=c.eval.every_steps)


def run(cfg: GRPORun, *, workdir: str, mesh) -> dict[str, Any]:
  """Rolls out, trains, evaluates and exports; returns the final eval metrics by split."""
  g = cfg.grpo
  setup = common.prepare(seed=cfg.seed, init_from=cfg.init_from, model=cfg.model,
                        data=cfg.data, checkpoint=cfg.checkpoint, workdir=workdir, mesh=mesh)
  procs = jax.process_count()
  if g.prompts_per_rollout % procs:
    raise ValueError(f"grpo.prompts_per_rollout {g.prompts_per_rollout} must divide over "
                     f"{procs} processes")
  model_config = setup.model.config
  # Whole batches only (a partial one would change the learner's shapes), repeated forever.
  options = dataclasses.replace(setup.options, drop_remainder=True)
  # Each process rolls out its own prompts (its part of one global shuffle), grouped by its
  # data-parallel shards: the sampler's inputs are global arrays sharded by group.
  rollout_groups = common.batch_groups(mesh, g.prompts_per_rollout // procs,
                                      f"grpo.prompts_per_rollout {g.prompts_per_rollout}")
  loader = pipeline.make_train_loader(
      setup.records, tokenizer=setup.tokenizer, model_config=model_config, options=options,
      batch_size=g.prompts_per_rollout // procs, num_epochs=None, ledger=setup.ledger,
      for_generation=True, groups=rollout_groups)
  rollouts = (-(-cfg.num_steps // g.steps_per_rollout) if cfg.num_steps > 0
              else cfg.epochs * max(loader.steps_per_epoch, 1))
  total = rollouts * g.steps_per_rollout
  tx = optim.make_optimizer(cfg.optim, total)
  ref: dict[str, Any] = {}

  def keep_reference(st):  # a frozen copy of the start (the state itself is donated)
    ref["params"] = jax.tree.map(jnp.copy, (st.params, st.frozen, st.rest))
  graphdef, state, shardings, data_state = common.init_train_state(
      setup, tx, cfg.optim, seed=cfg.seed, init_from=cfg.init_from, mesh=mesh,
      on_init=keep_reference if g.kl_coef else None)
  if data_state is not None:
    loader.set_state(data_state)
  rows = g.micro_prompts // procs * g.group_size
  groups = common.batch_groups(mesh, rows, f"grpo.micro_batch_prompts {g.micro_prompts} x "
                                          f"group_size {g.group_size}")
  if jax.process_index() == 0:
    print(common.summary(state, shardings, mesh), flush=True)
    print(f"{len(setup.records)} training prompts, {len(setup.classes)} classes; "
          f"{g.prompts_per_rollout} prompts x G={g.group_size} per rollout, "
          f"{g.steps_per_rollout} optimizer steps per rollout, {rollouts} rollouts = {total} "
          f"steps; {groups} batch group(s) per micro-batch", flush=True)
  ahead = cfg.data.prefetch_steps if procs == 1 else 0
  batches = loop.Prefetcher(learner_lib.prompt_batches(loader), size=ahead,
                            initial_state=loader.get_state())
  learner = learner_lib.GRPOLearner(
      graphdef, tx, optim.schedule(cfg.optim, total), cfg=g, tokenizer=setup.tokenizer,
      options=options, model_config=model_config, pad_id=chat.pad_id(setup.tokenizer),
      mesh=mesh, state_sharding=shardings, groups=groups,
      more_prompts=lambda: next(batches)[0], ref_params=ref.get("params"))
  if jax.process_index() == 0:
    print(f"learner batches: {learner.layout()}", flush=True)
  # Rows past the restored step (a killed run's) are dropped once, so each step has one row.
  writer = loop.MetricsWriter(workdir, resume_step=int(state.step), final_step=total)
  evaluate = common.Evaluator(workdir=workdir, graphdef=graphdef, setup=setup,
                             eval_files=cfg.data.eval_files, cfg=cfg.eval, writer=writer)
  try:
    try:
      state = loop.train_loop(
          state, learner.iteration, batches, total_steps=total, writer=writer,
          checkpointer=setup.checkpointer, data_state=lambda: batches.data_state,
          log_every=cfg.log_every, eval_fn=evaluate if evaluate else None,
          eval_every=cfg.eval_every)
    finally:
      batches.close()
    loader.set_state(batches.data_state)  # rewind the read-ahead
    if jax.process_index() == 0:
      curves.write_reward_curves(workdir, {curves.run_name(g.control):
                                           os.path.join(workdir, "metrics.jsonl")})
    return common.finish(state, graphdef=graphdef, setup=setup, data_state=loader.get_state(),
                        evaluate=evaluate, writer=writer, skip_metrics=loader.skip_metrics(),
                        export_to=os.path.join(workdir, "hf") if cfg.checkpoint.export else None)
  finally:
    setup.checkpointer.close()
    loader.close()
    writer.close()
