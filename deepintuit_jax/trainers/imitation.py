"""The imitation baseline: a video-encoder classifier (models/video_classifier.py: the VLM's
vision tower + a head that keeps space and time) trained with cross-entropy on the labels,
on the same training split and frames as SFT, then scored on the same test splits.

A stage like SFT, composed of the shared plumbing (trainers/stage.py): `prepare` (tokenizer,
records, classes, the base model), the one resume order (`init_train_state`), the generic
`TrainStep` with this file's loss, `loop.train_loop`, `stage.finish`. What is its own:
* the model: `imitation.init=pretrained` keeps the base checkpoint's `visual.*` tower,
  `scratch` builds a random tower of the same config; the head is new in both;
* the batch: the loader's video inputs plus, per row, the class index and where its tokens
  are among its group's merged tokens (`device_batch`); labels are mapped to indices on the
  host. Grouped like SFT's batches (data-parallel vision), placed with `ROW_AXES`;
* the eval: one forward pass per batch, softmax over the classes = the scores (so ECE is
  reported too), `eval_report.md` / `.json` through `evals.report.write_report` with the
  model named `imitation (scratch)` / `imitation (pretrained tower)`, `final=True` at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepintuit_jax import paths, recipes, sharding
from deepintuit_jax.data import annotations, pipeline
from deepintuit_jax.evals import metrics as metrics_lib, report
from deepintuit_jax.models import tiny_base, video_classifier as vc
from deepintuit_jax.trainers import logprobs, loop, optim, stage
from deepintuit_jax.trainers.sft_stage import TrainSpec
from deepintuit_jax.trainers.stage import CheckpointSpec, DataSpec, ModelSpec
from deepintuit_jax.trainers.step import TrainStep

INITS = ("scratch", "pretrained")
MODEL_NAMES = {"scratch": "imitation (scratch)", "pretrained": "imitation (pretrained tower)"}
# Per-row arrays of the classifier's batch (row axis inside a group), for batch placement.
ROW_AXES = dict(sharding.ROW_AXES, class_ids=0, row_weight=0, token_index=0, token_coords=0,
                num_tokens=0)
MODEL_KEYS = ("pixel_values_videos", "video_layout", "token_index", "token_coords",
              "num_tokens")


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
      seed=c.seed, model=stage.model_spec(c),
      init_from=tiny_base.default_init(c.init_from, model_checkpoint=c.model.checkpoint,
                                       cache_dir=stage.cache_dir(c.model.cache_dir)),
      data=stage.data_spec(c),
      imitation=ImitationSpec(init=i.init, head_width=i.head_width, head_depth=i.head_depth,
                              head_heads=i.head_heads,
                              head_mlp_ratio=i.head_mlp_ratio, pos_frequencies=i.pos_frequencies),
      optim=optim.OptimConfig(
          learning_rate=c.train.learning_rate, warmup_ratio=c.train.warmup_ratio,
          weight_decay=c.train.weight_decay, b1=c.train.b1,
          b2=c.train.b2, eps=c.train.eps, grad_clip=c.train.grad_clip,
          frozen=tuple(p for p in c.train.frozen.split(",") if p)),
      train=TrainSpec(num_steps=c.train.num_steps, epochs=c.train.epochs,
                      batch_size=batch, micro_batch_size=c.train.micro_batch_size or batch,
                      log_every=c.train.log_every),
      checkpoint=stage.checkpoint_spec(c),
      eval=EvalSpec(batch_size=c.eval.batch_size, max_items=c.eval.max_items),
      eval_every=c.eval.every_steps)


# ------------------------------------------------------------------ model, batch, loss
def build_classifier(base, spec: ImitationSpec, num_classes: int, *, seed: int, mesh
                     ) -> vc.VideoClassifier:
  """The classifier from a loaded base model (`Qwen2_5_VL`): its tower (`pretrained`) or a
  random one of the same config (`scratch`), a new head; placed on `mesh`."""
  tower = base.visual if spec.init == "pretrained" else None
  model = vc.VideoClassifier(base.config.vision, spec.head(num_classes), base.visual.opts,
                             rngs=nnx.Rngs(seed), tower=tower)
  return sharding.shard_model(model, mesh)


def class_ids(labels: Sequence[str], item_ids: Sequence[str], index: Mapping[str, int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Host labels -> (class indices [B] int32, row weights [B] float32: 1 for a labelled row,
  0 for a dummy or unlabelled one). A label outside the classes is an error naming the item."""
  ids = np.zeros((len(labels),), np.int32)
  weight = np.zeros((len(labels),), np.float32)
  for r, (label, item) in enumerate(zip(labels, item_ids)):
    if not label:
      continue
    key = label.strip().lower()
    if key not in index:
      raise ValueError(f"item {item!r}: label {label!r} is not one of the classes "
                       f"{sorted(index)}")
    ids[r], weight[r] = index[key], 1.0
  return ids, weight


def label_index(classes: Sequence[str]) -> dict[str, int]:
  return {c.strip().lower(): i for i, c in enumerate(classes)}


def needed_tokens(batch: dict, merge: int) -> int:
  """The largest video of a loader batch, in merged tokens (0 without videos)."""
  grids = batch.get("video_grid_thw")
  if grids is None or len(grids) == 0:
    return 0
  return int(vc.merged_grid(grids, merge).prod(axis=1).max())


def device_batch(batch: dict, index: Mapping[str, int], merge: int, length: int | None = None
                 ) -> dict:
  """A loader batch (grouped or not; the data contract of docs/ARCHITECTURE.md) -> the
  classifier's grouped device batch (G = 1 when un-grouped; b = rows per group, L = `length`
  or the token bucket of the batch's largest video):
    pixel_values_videos [G, Np, patch_dim], video_layout (leaves [G, ...]),
    token_index [G, b, L] int32, token_coords [G, b, L, 3] float32, num_tokens [G, b] int32,
    class_ids [G, b] int32, row_weight [G, b] float32.
  Every real row must hold exactly one video (a record's clip)."""
  g = int(batch.get("num_groups", 1))
  rows = len(batch["labels"])
  per, n_real = rows // g, int(batch["num_real"])
  grids = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)
  if len(grids) != n_real:
    raise ValueError(f"a batch of {n_real} items holds {len(grids)} videos: every record must "
                     f"have exactly one video (items {list(batch['item_id'][:n_real])})")
  length = length or vc.token_bucket(needed_tokens(batch, merge))
  layouts = [vc.token_layout(grids[k * per:min((k + 1) * per, n_real)], per, merge, length)
             for k in range(g)]
  ids, weight = class_ids(batch["labels"], batch["item_id"], index)
  pixels, layout = batch["pixel_values_videos"], batch["video_layout"]
  if "num_groups" not in batch:
    pixels, layout = pixels[None], jax.tree.map(lambda x: np.asarray(x)[None], layout)
  stack = lambda name: np.stack([getattr(t, name) for t in layouts])
  return {"pixel_values_videos": np.asarray(pixels), "video_layout": layout,
          "token_index": stack("token_index"), "token_coords": stack("token_coords"),
          "num_tokens": stack("num_tokens"), "class_ids": ids.reshape(g, per),
          "row_weight": weight.reshape(g, per)}


def group_logits(graphdef: nnx.GraphDef, params, frozen, rest, group: dict) -> jax.Array:
  """Logits [b, C] float32 of one group (no group axis) of `device_batch`."""
  model = nnx.merge(graphdef, params, frozen, rest)
  return model(*(group[k] for k in MODEL_KEYS))


def make_loss_fn(graphdef: nnx.GraphDef):
  """`loss_fn(params, frozen, rest, batch) -> (cross-entropy sum, labelled rows,
  {"accuracy": correct rows})` for a grouped `device_batch` (the `step.TrainStep`
  contract: the step reports the row mean of both)."""

  def group(g, params, frozen, rest):
    logits = group_logits(graphdef, params, frozen, rest, g)
    logp, _ = logprobs.logits_logprobs(logits, g["class_ids"])
    w = g["row_weight"]
    correct = (jnp.argmax(logits, axis=-1) == g["class_ids"]).astype(jnp.float32)
    return -jnp.sum(logp * w), jnp.sum(w), jnp.sum(correct * w)

  def loss_fn(params, frozen, rest, mb):
    sums, counts, correct = logprobs.map_groups(group, mb, params, frozen, rest)
    return jnp.sum(sums), jnp.sum(counts), {"accuracy": jnp.sum(correct)}
  return loss_fn


# ------------------------------------------------------------------ eval
class Evaluator:
  """Scores every split of `eval_files`: a metrics row per split (`eval/<split>/...`),
  `predictions_<split>_step<k>.jsonl` (item_id, label, prediction, scores), and
  `eval_report.md` / `.json` (evals.report; `final` once `step >= total_steps`). Every
  process scores every item (a classifier's forward pass is cheap), so all of them feed the
  same batches. Calling it returns {split: metrics}."""

  def __init__(self, *, workdir: str, graphdef, setup: stage.Setup, model_config,
               eval_files, spec: EvalSpec, model_name: str, total_steps: int,
               writer: loop.MetricsWriter, mesh):
    o = setup.options
    self.splits = {name: annotations.load_records(path, on_bad_sample=o.on_bad_sample,
                                                  labels=setup.classes)
                   for name, path in eval_files}
    self.workdir, self.setup, self.spec, self.writer = workdir, setup, spec, writer
    self.model_config, self.model_name, self.total_steps = model_config, model_name, total_steps
    self.index = label_index(setup.classes)
    self.merge = model_config.vision.spatial_merge_size

    def predict(params, frozen, rest, group):
      return jax.nn.softmax(group_logits(graphdef, params, frozen, rest, group), axis=-1)
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
      group = jax.tree.map(lambda x: x[0], device_batch(batch, self.index, self.merge))
      probs = np.asarray(self._predict(state.params, state.frozen, state.rest,
                                       {k: group[k] for k in MODEL_KEYS}), np.float64)
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
  setup = stage.prepare(seed=cfg.seed, init_from=cfg.init_from, model=cfg.model,
                        data=cfg.data, checkpoint=cfg.checkpoint, workdir=workdir, mesh=mesh)
  base_config = setup.model.config
  merge = base_config.vision.spatial_merge_size
  data = stage.train_data(setup, cfg.train, mesh, model_config=base_config)
  loader, total, groups = data.loader, data.total, data.groups
  steps_per_epoch = data.steps_per_epoch
  procs = jax.process_count()
  setup.model = build_classifier(setup.model, cfg.imitation, len(setup.classes), seed=cfg.seed,
                                 mesh=mesh)
  tx, graphdef, state, shardings = stage.start_training(
      setup, data, cfg.optim, seed=cfg.seed, init_from=cfg.init_from, mesh=mesh,
      describe=f"{cfg.imitation.model_name}: {len(setup.records)} training records, "
      f"{len(setup.classes)} classes {setup.classes}; {steps_per_epoch} steps/epoch, "
      f"{total} steps, accumulation {cfg.train.accum}, {groups} batch group(s) per process")
  step_fn = TrainStep(make_loss_fn(graphdef), tx, optim.schedule(cfg.optim, total), mesh=mesh,
                      state_sharding=shardings, row_axes=ROW_AXES, count_name="examples")
  index = label_index(setup.classes)

  def micro_batches():
    while True:
      raw = [next(loader) for _ in range(cfg.train.accum)]
      # One token length L for the step's micro-batches and every process (a collective
      # with several processes, which then read no batches ahead: see below).
      length, = pipeline.process_max((vc.token_bucket(max(needed_tokens(b, merge)
                                                            for b in raw)),))
      micro = tuple(step_fn.place(device_batch(b, index, merge, length)) for b in raw)
      # The loop's tokens_per_second counts the merged vision tokens the head reads.
      tokens = sum(int(vc.merged_grid(b["video_grid_thw"], merge).prod(axis=1).sum())
                   for b in raw)
      yield micro, tokens * procs, loader.get_state()

  _, results = stage.train_and_finish(
      state, step_fn, micro_batches, graphdef=graphdef, setup=setup, loader=loader,
      workdir=workdir, total=total, log_every=cfg.train.log_every,
      prefetch_steps=cfg.data.prefetch_steps,
      make_evaluator=lambda writer: Evaluator(
          workdir=workdir, graphdef=graphdef, setup=setup, model_config=base_config,
          eval_files=cfg.data.eval_files, spec=cfg.eval, model_name=cfg.imitation.model_name,
          total_steps=total, writer=writer, mesh=mesh),
      eval_every=cfg.eval_every)
  return results
