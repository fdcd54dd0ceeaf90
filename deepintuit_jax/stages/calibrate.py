"""The calibration stage: config -> dataclasses (once), then a composition of the shared stage
plumbing (stages/common.py) around `algorithms.calibrator` on the generic train step.

Starts from the policy (the GRPO stage's HF export; `init_from`), trains on the trace stage's
meta-review examples (`traces`), resumes from its own checkpoints (common.init_train_state),
exports the calibrator: `<workdir>/hf` (label_token: the VLM + tokenizer + calibrator.json)
or `<workdir>/head` (hidden_state: head.safetensors + calibrator.json naming the frozen
backbone). Two-stage inference (`evals.two_stage.Calibrator`) loads either.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from deepintuit_jax.algorithms import calibrator, sft
from deepintuit_jax.core import paths, recipes
from deepintuit_jax.data import chat
from deepintuit_jax.engine import optim
from deepintuit_jax.engine.step import TrainStep
from deepintuit_jax.stages import common, specs
from deepintuit_jax.stages.specs import CheckpointSpec, DataSpec, ModelSpec, TrainSpec

TRACES_COMMAND = "python -m deepintuit_jax.main --config=configs/traces.py"


@dataclasses.dataclass(frozen=True)
class CalibrateRun:
  seed: int
  policy: str              # HF directory the calibrator starts from (and the head's backbone)
  head: str                # label_token | hidden_state
  model: ModelSpec
  data: DataSpec
  optim: optim.OptimConfig
  train: TrainSpec
  checkpoint: CheckpointSpec
  prompt_meta: dict        # the trace stage's calibration_meta.json ({} when absent)

  def __post_init__(self):
    calibrator.check_head(self.head)


def _trace_inputs(traces: str, train_file: str, class_file: str) -> tuple[str, str, dict]:
  """(calibration file, class file, calibration_meta) from the trace workdir (explicit data
  files win)."""
  root = paths.join(os.path.expanduser(traces)) if traces else ""
  train_file = train_file or os.path.join(root, "calibration_train.json")
  if not paths.isfile(train_file):
    raise FileNotFoundError(f"calibration examples {train_file!r} do not exist: run "
                            f"`{TRACES_COMMAND}` first, or set --config.traces to its workdir "
                            "(or data.train_file to a release-format calibration file)")
  if not class_file and paths.isfile(os.path.join(root, "classes.json")):
    class_file = os.path.join(root, "classes.json")
  meta_file = os.path.join(os.path.dirname(train_file), specs.META)
  meta = {}
  if paths.isfile(meta_file):
    meta = paths.read_json(meta_file)
  return train_file, class_file, meta


def from_config(c) -> CalibrateRun:
  """The locked ConfigDict -> frozen dataclasses (its recipe applied)."""
  c = recipes.resolve(c)  # a copy: the data files below are set in it
  head = calibrator.check_head(c.calibrate.head)
  model = specs.model_spec(c)
  train_file, class_file, meta = _trace_inputs(c.traces, c.data.train_file, c.data.class_file)
  with c.unlocked():
    c.data.train_file, c.data.class_file = train_file, class_file
  data = specs.data_spec(c)
  # Only the label token is a target (not the end token after it).
  data = dataclasses.replace(data, options=dataclasses.replace(data.options,
                                                               train_end_of_turn=False))
  frozen = c.train.frozen if c.train.frozen != "auto" else (
      r"^visual\." if head == "label_token" else ",".join(calibrator.HEAD_FROZEN))
  lr = c.train.learning_rate if head == "label_token" else c.train.head_learning_rate
  batch = c.train.batch_size
  return CalibrateRun(
      seed=c.seed, policy=specs.resolve_policy(c.init_from, model), head=head,
      model=model, data=data,
      optim=specs.optim_spec(c, learning_rate=lr, frozen=frozen),
      train=TrainSpec(num_steps=c.train.num_steps, epochs=c.train.epochs,
                      batch_size=batch, micro_batch_size=c.train.micro_batch_size or batch,
                      log_every=c.train.log_every),
      checkpoint=specs.checkpoint_spec(c), prompt_meta=meta)


def run(cfg: CalibrateRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Trains and exports the calibrator; returns the last training metrics row."""
  setup = common.prepare(seed=cfg.seed, init_from=cfg.policy, model=cfg.model, data=cfg.data,
                        checkpoint=cfg.checkpoint, workdir=workdir, mesh=mesh)
  label_ids = chat.label_token_ids(setup.tokenizer, setup.classes)
  vlm_config = setup.model.config
  if cfg.head == "hidden_state":
    setup.model = calibrator.HeadCalibrator(setup.model, calibrator.ClassifierHead(
        vlm_config.text.hidden_size, len(setup.classes), rngs=nnx.Rngs(cfg.seed)))
  data = common.train_data(setup, cfg.train, mesh, model_config=vlm_config)
  loader, total, steps_per_epoch = data.loader, data.total, data.steps_per_epoch
  procs = jax.process_count()
  tx, graphdef, state, shardings = common.start_training(
      setup, data, cfg.optim, seed=cfg.seed, init_from=cfg.policy, mesh=mesh,
      describe=f"calibrator head {cfg.head}: {len(setup.records)} meta-review examples, "
      f"{len(setup.classes)} classes {setup.classes} (label tokens {label_ids}); "
      f"{steps_per_epoch} steps/epoch, {total} steps")
  step_fn = TrainStep(calibrator.make_loss_fn(graphdef, cfg.head, label_ids), tx,
                      optim.schedule(cfg.optim, total), mesh=mesh, state_sharding=shardings,
                      count_name="rows")

  def micro_batches():
    while True:
      micro, tokens = [], 0
      for _ in range(cfg.train.accum):
        b = next(loader)
        calibrator.check_targets(b, label_ids)
        tokens += int(np.asarray(b["attention_mask"]).sum())
        micro.append(step_fn.place(sft.device_batch(b)))
      yield tuple(micro), tokens * procs, loader.get_state()

  export = cfg.checkpoint.export and cfg.head == "label_token"
  state, _ = common.train_and_finish(
      state, step_fn, micro_batches, graphdef=graphdef, setup=setup, loader=loader,
      workdir=workdir, total=total, log_every=cfg.train.log_every,
      prefetch_steps=cfg.data.prefetch_steps,
      export_to=os.path.join(workdir, "hf") if export else None)
  meta = dict(classes=list(setup.classes), label_ids=list(label_ids),
              prompt=cfg.prompt_meta.get("prompt"), priority=cfg.prompt_meta.get("priority"))
  if jax.process_index() == 0 and cfg.checkpoint.export:
    if cfg.head == "label_token":
      calibrator.write_meta(os.path.join(workdir, "hf"), head="label_token", **meta)
    else:
      model = nnx.merge(graphdef, state.params, state.frozen, state.rest)
      calibrator.save_head(os.path.join(workdir, "head"), model.head, backbone=cfg.policy,
                          **meta)
  return {"step": int(state.step)}
