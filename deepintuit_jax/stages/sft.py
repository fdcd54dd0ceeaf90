"""The cold-start SFT stage: config -> dataclasses (once), then a composition of the shared
stage plumbing (stages/common.py): prepare, resume, train on the generic step, eval, export.

Resume order (one, common.init_train_state): the workdir's own latest complete checkpoint >
`init_from` (an HF directory, or another stage's workdir / checkpoints directory) >
`model.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from deepintuit_jax.algorithms import sft
from deepintuit_jax.core import recipes
from deepintuit_jax.engine import optim
from deepintuit_jax.evals import generation
from deepintuit_jax.models import tiny_base
from deepintuit_jax.stages import common, specs
from deepintuit_jax.stages.specs import CheckpointSpec, DataSpec, ModelSpec, TrainSpec

@dataclasses.dataclass(frozen=True)
class SFTRun:
  seed: int
  init_from: str
  model: ModelSpec
  data: DataSpec
  optim: optim.OptimConfig
  train: TrainSpec
  checkpoint: CheckpointSpec
  eval: generation.EvalConfig
  eval_every: int


def from_config(c) -> SFTRun:
  """The locked ConfigDict -> frozen dataclasses, with its recipe applied and the embedded
  default (tiny model, generated benchmark) built into the cache when needed."""
  c = recipes.resolve(c)
  batch = c.train.batch_size
  init_from = tiny_base.default_init(c.init_from, model_checkpoint=c.model.checkpoint,
                                     cache_dir=specs.cache_dir(c.model.cache_dir))
  return SFTRun(
      seed=c.seed, init_from=init_from, model=specs.model_spec(c), data=specs.data_spec(c),
      optim=specs.optim_spec(c),
      train=TrainSpec(num_steps=c.train.num_steps, epochs=c.train.epochs,
                      batch_size=batch, micro_batch_size=c.train.micro_batch_size or batch,
                      log_every=c.train.log_every, loss_chunk=c.train.loss_chunk),
      checkpoint=specs.checkpoint_spec(c), eval=specs.eval_spec(c),
      eval_every=c.eval.every_steps)


def run(cfg: SFTRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Trains, evaluates and exports; returns the final eval metrics by split."""
  setup = common.prepare(seed=cfg.seed, init_from=cfg.init_from, model=cfg.model,
                        data=cfg.data, checkpoint=cfg.checkpoint, workdir=workdir, mesh=mesh)
  data = common.train_data(setup, cfg.train, mesh)
  loader, total = data.loader, data.total
  tx, graphdef, state, shardings = common.start_training(
      setup, data, cfg.optim, seed=cfg.seed, init_from=cfg.init_from, mesh=mesh,
      describe=f"{len(setup.records)} training records, {len(setup.classes)} classes "
      f"{setup.classes}; {data.steps_per_epoch} steps/epoch, {total} steps, accumulation "
      f"{cfg.train.accum}, {data.groups} batch group(s) per process, loss chunk "
      f"{cfg.train.loss_chunk or 'off'}")
  step_fn = sft.make_train_step(graphdef, tx, optim.schedule(cfg.optim, total), mesh=mesh,
                                state_sharding=shardings, loss_chunk=cfg.train.loss_chunk)
  procs = jax.process_count()

  def micro_batches():
    while True:
      micro, tokens = [], 0
      for _ in range(cfg.train.accum):
        b = next(loader)
        tokens += int(np.asarray(b["attention_mask"]).sum())
        micro.append(step_fn.place(sft.device_batch(b)))  # host->device in this thread
      yield tuple(micro), tokens * procs, loader.get_state()

  _, results = common.train_and_finish(
      state, step_fn, micro_batches, graphdef=graphdef, setup=setup, loader=loader,
      workdir=workdir, total=total, log_every=cfg.train.log_every,
      prefetch_steps=cfg.data.prefetch_steps,
      make_evaluator=lambda writer: common.Evaluator(
          workdir=workdir, graphdef=graphdef, setup=setup, eval_files=cfg.data.eval_files,
          cfg=cfg.eval, writer=writer),
      eval_every=cfg.eval_every,
      export_to=os.path.join(workdir, "hf") if cfg.checkpoint.export else None)
  return results
