"""The imitation baseline: a video-encoder classifier (models/video_classifier.py: the VLM's
vision tower + a head that keeps space and time) trained with cross-entropy on the labels,
on the same training split and frames as SFT, then scored on the same test splits.

A stage like SFT, composed of the shared plumbing (stages/common.py): `prepare` (tokenizer,
records, classes, the base model), the one resume order (`init_train_state`), the generic
`TrainStep` with the classifier's loss (algorithms/imitation.py: model, batch, loss),
`loop.train_loop`, `common.finish`. What is its own:
* the model: `imitation.init=pretrained` keeps the base checkpoint's `visual.*` tower,
  `scratch` builds a random tower of the same config; the head is new in both;
* the eval: one forward pass per batch, softmax over the classes = the scores (so ECE is
  reported too), `eval_report.md` / `.json` through `evals.report.write_report` with the
  model named `imitation (scratch)` / `imitation (pretrained tower)`, `final=True` at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepintuit_jax.algorithms import imitation
from deepintuit_jax.core import paths, recipes
from deepintuit_jax.data import annotations, pipeline
from deepintuit_jax.engine import loop, optim
from deepintuit_jax.engine.step import TrainStep
from deepintuit_jax.evals import metrics as metrics_lib, report
from deepintuit_jax.models import tiny_base, video_classifier as vc
from deepintuit_jax.stages import common, specs
from deepintuit_jax.stages.specs import CheckpointSpec, DataSpec, ModelSpec, TrainSpec

INITS = ("scratch", "pretrained")
MODEL_NAMES = {"scratch": "imitation (scratch)", "pretrained": "imitation (pretrained tower)"}


@dataclasses.dataclass(frozen=True)
class ImitationSpec:
  """init: scratch | pretrained (the base checkpoint's vision tower); the head's sizes
  (models/video_classifier.HeadConfig without the class count)."""
  init: str
  head_width: int
  head_depth: int
  head_heads: int
  head_mlp_ratio: int
  pos_frequencies: int

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"imitation.init={self.init!r}: must be one of {INITS}")
    self.head(2)  # validates the sizes now, not after the model is loaded

  def head(self, num_classes: int) -> vc.HeadConfig:
    return vc.HeadConfig(num_classes=num_classes, width=self.head_width, depth=self.head_depth,
                         num_heads=self.head_heads, mlp_ratio=self.head_mlp_ratio,
                         pos_frequencies=self.pos_frequencies)

  @property
  def model_name(self) -> str:
    return MODEL_NAMES[self.init]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  batch_size: int
  max_items: int  # 0 = every item of each split

  def __post_init__(self):
    if self.batch_size < 1 or self.max_items < 0:
      raise ValueError(f"eval.batch_size must be >= 1 and eval.max_items >= 0: {self}")


@dataclasses.dataclass(frozen=True)
class ImitationRun:
  seed: int
  init_from: str
  model: ModelSpec
  data: DataSpec
  imitation: ImitationSpec
  optim: optim.OptimConfig
  train: TrainSpec
  checkpoint: CheckpointSpec
  eval: EvalSpec
  eval_every: int


def from_config(c) -> ImitationRun:
  """The locked ConfigDict -> frozen dataclasses (its recipe applied, the embedded default
  built into the cache when needed)."""
  c = recipes.resolve(c)
  if c.checkpoint.export:
    raise ValueError("checkpoint.export=True: the imitation classifier is not an HF model; "
                     "its parameters are in the Orbax checkpoints (visual.* keep HF's names)")
  batch = c.train.batch_size
  i = c.imitation
  return ImitationRun(
      seed=c.seed, model=specs.model_spec(c),
      init_from=tiny_base.default_init(c.init_from, model_checkpoint=c.model.checkpoint,
                                       cache_dir=specs.cache_dir(c.model.cache_dir)),
      data=specs.data_spec(c),
      imitation=ImitationSpec(init=i.init, head_width=i.head_width, head_depth=i.head_depth,
                              head_heads=i.head_heads,
                              head_mlp_ratio=i.head_mlp_ratio, pos_frequencies=i.pos_frequencies),
      optim=specs.optim_spec(c),
      train=TrainSpec(num_steps=c.train.num_steps, epochs=c.train.epochs,
                      batch_size=batch, micro_batch_size=c.train.micro_batch_size or batch,
                      log_every=c.train.log_every),
      checkpoint=specs.checkpoint_spec(c),
      eval=EvalSpec(batch_size=c.eval.batch_size, max_items=c.eval.max_items),
      eval_every=c.eval.every_steps)


# ------------------------------------------------------------------ eval
class Evaluator:
  """Scores every split of `eval_files`: a metrics row per split (`eval/<split>/...`),
  `predictions_<split>_step<k>.jsonl` (item_id, label, prediction, scores), and
  `eval_report.md` / `.json` (evals.report; `final` once `step >= total_steps`). Every
  process scores every item (a classifier's forward pass is cheap), so all of them feed the
  same batches. Calling it returns {split: metrics}."""

  def __init__(self, *, workdir: str, graphdef, setup: common.Setup, model_config,
               eval_files, spec: EvalSpec, model_name: str, total_steps: int,
               writer: loop.MetricsWriter, mesh):
    o = setup.options
    self.splits = {name: annotations.load_records(path, on_bad_sample=o.on_bad_sample,
                                                  labels=setup.classes)
                   for name, path in eval_files}
    self.workdir, self.setup, self.spec, self.writer = workdir, setup, spec, writer
    self.model_config, self.model_name, self.total_steps = model_config, model_name, total_steps
    self.index = imitation.label_index(setup.classes)
    self.merge = model_config.vision.spatial_merge_size

    def predict(params, frozen, rest, group):
      return jax.nn.softmax(imitation.group_logits(graphdef, params, frozen, rest, group),
                            axis=-1)
    self._predict = jax.jit(predict, out_shardings=NamedSharding(mesh, P()))

  def __bool__(self) -> bool:
    return bool(self.splits)

  def split(self, state, records) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, predictions) of the classifier in `state` on `records`."""
    if self.spec.max_items:
      records = list(records)[: self.spec.max_items]
    opts = dataclasses.replace(self.setup.options, shuffle=False)
    preds: list[dict] = []
    for batch in pipeline.make_eval_batches(
        records, tokenizer=self.setup.tokenizer, model_config=self.model_config, options=opts,
        batch_size=self.spec.batch_size, for_generation=False, process_index=0,
        process_count=1):
      if not any(batch["item_id"]) or batch.get("pixel_values_videos") is None:
        continue  # only dummy rows (skipped records)
      group = jax.tree.map(lambda x: x[0],
                           imitation.device_batch(batch, self.index, self.merge))
      probs = np.asarray(self._predict(state.params, state.frozen, state.rest,
                                       {k: group[k] for k in imitation.MODEL_KEYS}), np.float64)
      for row, (item, label) in enumerate(zip(batch["item_id"], batch["labels"])):
        if item:
          p = probs[row]
          preds.append(dict(item_id=item, label=label,
                            prediction=self.setup.classes[int(np.argmax(p))],
                            scores=dict(zip(self.setup.classes, p.tolist()))))
    m = metrics_lib.classification_metrics(
        [p["prediction"] for p in preds], [p["label"] for p in preds],
        classes=self.setup.classes, scores=[p["scores"] for p in preds])
    return m, preds

  def __call__(self, state, step: int) -> dict[str, dict]:
    is_main = jax.process_index() == 0
    results = {}
    for name, recs in self.splits.items():
      t0 = time.perf_counter()
      m, preds = self.split(state, recs)
      m["eval_seconds"] = time.perf_counter() - t0
      results[name] = m
      self.writer.write(step, dict(split=name, **{k: v for k, v in m.items() if isinstance(
          v, (int, float))}), prefix=f"eval/{name}/")
      if is_main:
        paths.write_text(os.path.join(self.workdir, f"predictions_{name}_step{step}.jsonl"),
                         "".join(json.dumps(p) + "\n" for p in preds))
        print(f"[eval step {step}] {self.model_name} {name}: accuracy "
              f"{m.get('accuracy', float('nan')):.3f} macro_f1 "
              f"{m.get('macro_f1', float('nan')):.3f} (n={int(m['n'])})", flush=True)
    if is_main and results:
      report.write_report(self.workdir, {self.model_name: results}, step=step,
                          final=step >= self.total_steps, title="Imitation baseline")
    return results


# ------------------------------------------------------------------ the stage
def run(cfg: ImitationRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Trains the classifier, evaluates it; returns the final eval metrics by split."""
  setup = common.prepare(seed=cfg.seed, init_from=cfg.init_from, model=cfg.model,
                        data=cfg.data, checkpoint=cfg.checkpoint, workdir=workdir, mesh=mesh)
  base_config = setup.model.config
  merge = base_config.vision.spatial_merge_size
  data = common.train_data(setup, cfg.train, mesh, model_config=base_config)
  loader, total, groups = data.loader, data.total, data.groups
  steps_per_epoch = data.steps_per_epoch
  procs = jax.process_count()
  setup.model = imitation.build_classifier(
      setup.model, cfg.imitation.init, cfg.imitation.head(len(setup.classes)), seed=cfg.seed,
                                 mesh=mesh)
  tx, graphdef, state, shardings = common.start_training(
      setup, data, cfg.optim, seed=cfg.seed, init_from=cfg.init_from, mesh=mesh,
      describe=f"{cfg.imitation.model_name}: {len(setup.records)} training records, "
      f"{len(setup.classes)} classes {setup.classes}; {steps_per_epoch} steps/epoch, "
      f"{total} steps, accumulation {cfg.train.accum}, {groups} batch group(s) per process")
  step_fn = TrainStep(imitation.make_loss_fn(graphdef), tx, optim.schedule(cfg.optim, total),
                      mesh=mesh, state_sharding=shardings, row_axes=imitation.ROW_AXES,
                      count_name="examples")
  index = imitation.label_index(setup.classes)

  def micro_batches():
    while True:
      raw = [next(loader) for _ in range(cfg.train.accum)]
      # One token length L for the step's micro-batches and every process (a collective
      # with several processes, which then read no batches ahead: see below).
      length, = pipeline.process_max((vc.token_bucket(max(imitation.needed_tokens(b, merge)
                                                            for b in raw)),))
      micro = tuple(step_fn.place(imitation.device_batch(b, index, merge, length)) for b in raw)
      # The loop's tokens_per_second counts the merged vision tokens the head reads.
      tokens = sum(int(vc.merged_grid(b["video_grid_thw"], merge).prod(axis=1).sum())
                   for b in raw)
      yield micro, tokens * procs, loader.get_state()

  _, results = common.train_and_finish(
      state, step_fn, micro_batches, graphdef=graphdef, setup=setup, loader=loader,
      workdir=workdir, total=total, log_every=cfg.train.log_every,
      prefetch_steps=cfg.data.prefetch_steps,
      make_evaluator=lambda writer: Evaluator(
          workdir=workdir, graphdef=graphdef, setup=setup, model_config=base_config,
          eval_files=cfg.data.eval_files, spec=cfg.eval, model_name=cfg.imitation.model_name,
          total_steps=total, writer=writer, mesh=mesh),
      eval_every=cfg.eval_every)
  return results
