"""The plumbing every stage shares, so that a stage file is a short composition:

* config pieces -> frozen specs (`model_spec`, `data_spec`, `checkpoint_spec`, `eval_spec`)
  of a config whose recipe is resolved (`deepintuit_jax.core.recipes`: the numbers live in the
  config files), and the embedded default (tiny model, generated benchmark) built into the
  cache once (`build_once`);
* `prepare`: resume order, tokenizer (+ the release's added tokens), records, classes, model;
* `init_train_state`: the one resume order (the workdir's own latest complete checkpoint >
  `init_from` > `model.checkpoint`), placed on the mesh;
* `train_data` / `train_and_finish`: a labelled-batch stage's loader, and the loop's tail
  every stage shares (writer, read-ahead, train loop, final checkpoint, eval, export);
* `Evaluator`: held-out generative eval (metrics rows, predictions, report) on a cadence;
* `export`: the trained model as an HF directory with the extended tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax

from deepintuit_jax.core import paths, sharding
from deepintuit_jax.data import annotations, chat, errors, pipeline
from deepintuit_jax.engine import checkpointing, loop, optim
from deepintuit_jax.engine.state import TrainState, init_state, state_shardings, trainable_model
from deepintuit_jax.evals import generation, metrics as metrics_lib
from deepintuit_jax.stages.specs import CheckpointSpec, DataSpec, ModelSpec

def _is_hf_dir(path: str) -> bool:
  return paths.isdir(path) and paths.isfile(os.path.join(path, "config.json")) and any(
      f.endswith((".safetensors", ".safetensors.index.json")) for f in paths.listdir(path))


@dataclasses.dataclass
class Setup:
  """What `prepare` built: where the weights come from, the (extended) tokenizer, the
  training records and classes, pipeline options with the labels, the model, and the
  workdir's checkpointer."""
  source: str
  init_kind: str
  tokenizer: Any
  records: list
  classes: list
  ledger: errors.SkipLedger
  options: pipeline.PipelineOptions
  model: Any
  checkpointer: checkpointing.Checkpointer


def prepare(*, seed: int, init_from: str, model: ModelSpec, data: DataSpec,
            checkpoint: CheckpointSpec, workdir: str, mesh) -> Setup:
  """Checkpointer, the resume source, tokenizer, records, classes and the model (loaded
  straight into its shardings on `mesh`, embeddings grown for the added tokens)."""
  from transformers import AutoTokenizer

  from deepintuit_jax.models import qwen2_5_vl
  from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, RuntimeOptions

  ck = checkpointing.Checkpointer(paths.join(workdir, "checkpoints"),
                                  every_steps=checkpoint.every_steps, keep=checkpoint.keep,
                                  async_save=checkpoint.async_save)
  source, init_kind = model.checkpoint, "model.checkpoint"
  if init_from:
    if checkpointing.is_checkpoint_dir(init_from):
      init_kind = "init_from (checkpoint)"
      # The architecture and tokenizer those checkpoints were trained with (e.g. the tiny
      # base the SFT default starts from), when recorded and still there.
      recorded = checkpointing.recorded_source(init_from)
      if recorded and recorded != source and _is_hf_dir(recorded):
        source = recorded
    elif _is_hf_dir(init_from):
      source, init_kind = init_from, "init_from (HF)"
    elif ck.latest_step() is None:
      raise FileNotFoundError(f"init_from {init_from!r}: neither an HF directory "
                              "(config.json + safetensors) nor a directory of complete Orbax "
                              "checkpoints")
    # else: resuming from the workdir's own checkpoint; the start point is not needed.
  source = paths.join(source)
  if init_kind == "init_from (checkpoint)":  # the HF source is the base, not what trained
    Qwen2_5_VLConfig.check_rope_convention(
        model.rope_convention, checkpointing.recorded_rope_convention(init_from), init_from)
  ck.model_source, ck.rope_convention = source, model.rope_convention
  with paths.fetched(source) as local:  # a bucket's HF directory is read from a local copy
    tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    opts = RuntimeOptions(dtype=model.dtype, param_dtype=model.param_dtype, remat=model.remat,
                          attention_impl=model.attention_impl)
    net = qwen2_5_vl.from_pretrained(local, mesh=mesh, opts=opts,
                                     rope_convention=model.rope_convention)
  ledger = errors.SkipLedger()
  classes = list(annotations.load_class_file(data.class_file)) if data.class_file else None
  records = annotations.load_records(data.train_file, on_bad_sample=data.options.on_bad_sample,
                                     ledger=ledger, labels=classes)
  classes = classes or annotations.labels_from_records(records)
  chat.add_tokens_for_mode(tokenizer, classes, data.special_tokens)  # one token per label
  options = dataclasses.replace(data.options, labels=tuple(classes))
  need = chat.required_vocab_size(tokenizer)
  if need > net.config.text.vocab_size:
    net = qwen2_5_vl.resize_token_embeddings(net, need, seed=seed)
  return Setup(source=source, init_kind=init_kind, tokenizer=tokenizer, records=records,
               classes=classes, ledger=ledger, options=options, model=net, checkpointer=ck)


def init_train_state(setup: Setup, tx, optim_cfg: optim.OptimConfig, *, seed: int,
                     init_from: str, mesh,
                     on_init: Callable[[TrainState], None] | None = None
                     ) -> tuple[Any, TrainState, TrainState, dict | None]:
  """The one resume order: the workdir's own latest complete checkpoint > `init_from` (an
  Orbax checkpoint's parameters, or the HF directory already loaded) > `model.checkpoint`.

  on_init(state): called with the state as initialised, before an own checkpoint replaces
  it (e.g. to keep a frozen reference copy of the starting parameters).
  optim_cfg: its `frozen` parameters get no optimizer state; `offload_optimizer` places
  that state in host memory.
  Returns (graphdef, state, shardings, data iterator state or None when not resumed).
  Frees `setup.model` (its arrays now live in the state)."""
  graphdef, state = init_state(setup.model, tx, optim_cfg.frozen, seed)
  setup.model = None
  shardings = state_shardings(state, mesh, offload_optimizer=optim_cfg.offload_optimizer)
  state = jax.device_put(state, shardings)
  ck = setup.checkpointer
  own = ck.latest_step()
  if setup.init_kind == "init_from (checkpoint)" and (own is None or on_init is not None):
    state = checkpointing.load_params(init_from, state, shardings)
    print(f"initialised parameters from {init_from}", flush=True)
  elif own is None:
    print(f"initialised from {setup.init_kind}: {setup.source}", flush=True)
  if on_init is not None:
    on_init(state)
  data_state = None
  if own is not None:
    state, data_state = ck.restore(state, shardings)
    print(f"resumed from {ck.directory} step {int(state.step)}", flush=True)
  return graphdef, state, shardings, data_state


def batch_groups(mesh, rows_per_process: int, what: str) -> int:
  """Groups per process batch: one per local data-parallel shard when they divide the rows
  (data-parallel vision), else 1 (vision replicated; an error with several processes)."""
  groups = sharding.local_data_groups(mesh)
  if rows_per_process % groups:
    if jax.process_count() > 1:
      raise ValueError(f"{what} gives {rows_per_process} rows per process, not a multiple of "
                       f"the {groups} data-parallel shards each process feeds")
    print(f"warning: {rows_per_process} rows per micro-batch do not split over {groups} "
          "data-parallel shards: vision runs replicated on every device", flush=True)
    return 1
  return groups


@dataclasses.dataclass
class TrainData:
  """A labelled-batch stage's training loader: `groups` data-parallel groups per process
  micro-batch, `steps_per_epoch` optimizer steps per pass, `total` steps to run."""
  loader: Any
  groups: int
  steps_per_epoch: int
  total: int


def train_data(setup: Setup, train, mesh, *, model_config=None) -> TrainData:
  """The endless training loader of a stage that reads labelled batches (SFT, calibration,
  imitation). `train` has micro_batch_size (global rows per accumulation step), accum,
  num_steps (> 0 wins) and epochs; each process reads its share of every micro-batch."""
  procs = jax.process_count()
  if train.micro_batch_size % procs:
    raise ValueError(f"train.micro_batch_size {train.micro_batch_size} must divide over "
                     f"{procs} processes")
  per_process = train.micro_batch_size // procs
  groups = batch_groups(mesh, per_process, f"train.micro_batch_size {train.micro_batch_size}")
  loader = pipeline.make_train_loader(
      setup.records, tokenizer=setup.tokenizer,
      model_config=model_config or setup.model.config, options=setup.options,
      batch_size=per_process, num_epochs=None, ledger=setup.ledger, groups=groups)
  steps_per_epoch = max(loader.steps_per_epoch // train.accum, 1)
  total = train.num_steps if train.num_steps > 0 else train.epochs * steps_per_epoch
  return TrainData(loader=loader, groups=groups, steps_per_epoch=steps_per_epoch, total=total)


def start_training(setup: Setup, data: TrainData, optim_cfg, *, seed: int, init_from: str,
                   mesh, describe: str) -> tuple[Any, Any, TrainState, TrainState]:
  """The set-up a labelled-batch stage does after `train_data`: the optimizer over
  `data.total` steps, the one resume order (`init_train_state`),
  the loader moved to a resumed run's position, and on process 0 the parameter summary
  and `describe` (the stage's line: records, classes, steps). Returns (tx, graphdef, state,
  shardings)."""
  tx = optim.make_optimizer(optim_cfg, data.total)
  graphdef, state, shardings, data_state = init_train_state(
      setup, tx, optim_cfg, seed=seed, init_from=init_from, mesh=mesh)
  if data_state is not None:
    data.loader.set_state(data_state)
  if jax.process_index() == 0:
    print(summary(state, shardings, mesh), flush=True)
    print(describe, flush=True)
  return tx, graphdef, state, shardings


def train_and_finish(state: TrainState, step_fn, micro_batches: Callable[[], Any], *,
                     graphdef, setup: Setup, loader, workdir: str, total: int, log_every: int,
                     prefetch_steps: int,
                     make_evaluator: Callable[[loop.MetricsWriter], Any] | None = None,
                     eval_every: int = 0, export_to: str | None = None
                     ) -> tuple[TrainState, dict[str, dict]]:
  """The tail every stage shares: metrics writer, read-ahead, `loop.train_loop`, `finish`.

  micro_batches(): a generator of (micro-batches, tokens, loader state) per step;
  make_evaluator(writer): the stage's evaluator (or None). Host-side batches are prepared
  ahead in a thread (`prefetch_steps`; none with several processes, whose batch-shape
  collectives must not race the step's); checkpoints record the position of the batches
  trained on, not the read-ahead. Rows of `metrics.jsonl` past the restored step (a killed
  run's) are dropped once, so each step has one row. Closes the checkpointer, the loader and
  the writer. Returns (final state, final eval metrics by split)."""
  writer = loop.MetricsWriter(workdir, resume_step=int(state.step), final_step=total)
  try:
    evaluate = make_evaluator(writer) if make_evaluator else None
    ahead = prefetch_steps if jax.process_count() == 1 else 0
    batches = loop.Prefetcher(micro_batches(), size=ahead, initial_state=loader.get_state())
    try:
      state = loop.train_loop(
          state, step_fn, batches, total_steps=total, writer=writer,
          checkpointer=setup.checkpointer, log_every=log_every,
          eval_fn=evaluate if evaluate else None, eval_every=eval_every)
    finally:
      batches.close()
    loader.set_state(batches.data_state)  # rewind the read-ahead (and its skip counts)
    results = finish(state, graphdef=graphdef, setup=setup, data_state=loader.get_state(),
                     evaluate=evaluate, writer=writer, skip_metrics=loader.skip_metrics(),
                     export_to=export_to)
    return state, results
  finally:
    setup.checkpointer.close()
    loader.close()
    writer.close()


def summary(state: TrainState, shardings: TrainState, mesh) -> str:
  n_train, n_frozen = optim.count_params(state.params), optim.count_params(state.frozen)
  specs: dict[str, int] = {}
  for _, s in jax.tree_util.tree_flatten_with_path(
      shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
    specs[str(s.spec)] = specs.get(str(s.spec), 0) + 1
  return "\n".join([
      f"parameters: {n_train:,} trainable, {n_frozen:,} frozen",
      f"mesh: {dict(mesh.shape)} over {mesh.devices.size} device(s), "
      f"{jax.process_count()} process(es)",
      "trainable parameter shardings: " + ", ".join(f"{k} x{v}" for k, v in specs.items()),
      "optimizer state: " + ("host memory (train.offload_optimizer)"
                             if sharding.is_offloaded(shardings.opt_state) else "device memory")])


class Evaluator:
  """Held-out generative eval of every split in `eval_files` (`evals.generation`): a metrics
  row per split (`eval/<split>/...`), `predictions_<split>_step<k>.jsonl`, and
  `eval_report.md` / `.json`. Calling it returns {split: metrics}."""

  def __init__(self, *, workdir: str, graphdef, setup: Setup, eval_files, cfg,
               writer: loop.MetricsWriter):
    o = setup.options
    self.splits = {name: annotations.load_records(path, on_bad_sample=o.on_bad_sample,
                                                  labels=setup.classes)
                   for name, path in eval_files}
    self.workdir, self.graphdef, self.setup, self.cfg, self.writer = (
        workdir, graphdef, setup, cfg, writer)

  def __bool__(self) -> bool:
    return bool(self.splits)

  def __call__(self, state: TrainState, step: int) -> dict[str, dict]:
    is_main = jax.process_index() == 0
    model = trainable_model(self.graphdef, state)
    results = {}
    for name, recs in self.splits.items():
      t0 = time.perf_counter()
      m, preds = generation.evaluate_split(model, self.setup.tokenizer, recs,
                                           options=self.setup.options, cfg=self.cfg,
                                           classes=self.setup.classes)
      m["eval_seconds"] = time.perf_counter() - t0
      results[name] = m
      self.writer.write(step, dict(split=name, **m), prefix=f"eval/{name}/")
      if is_main:
        paths.write_text(paths.join(self.workdir, f"predictions_{name}_step{step}.jsonl"),
                         "".join(json.dumps(p) + "\n" for p in preds))
        print(f"[eval step {step}] {name}: accuracy {m.get('accuracy', float('nan')):.3f} "
              f"format_rate {m.get('format_rate', float('nan')):.3f} "
              f"macro_f1 {m.get('macro_f1', float('nan')):.3f} (n={int(m['n'])})", flush=True)
    if is_main and results:
      paths.write_text(paths.join(self.workdir, "eval_report.md"),
                       metrics_lib.report_markdown(results, step=step))
      checkpointing.write_json(paths.join(self.workdir, "eval_report.json"),
                               {"step": step, "splits": results})
    return results


def export(graphdef, state: TrainState, tokenizer, source: str, out: str, *,
           processor=None) -> str:
  """The trained model as an HF directory with the (extended) tokenizer; `processor`
  (hf_save.ProcessorSettings) writes the training's pixel / frame settings."""
  from deepintuit_jax.models import qwen2_5_vl
  model = trainable_model(graphdef, state)
  if jax.process_index() == 0:
    with paths.staged(out) as local:  # safetensors / save_pretrained write local files only
      qwen2_5_vl.save_pretrained(model, local, source_dir=source, processor=processor)
      tokenizer.save_pretrained(local)
    print(f"exported the model to {out}", flush=True)
  return out


def finish(state: TrainState, *, graphdef, setup: Setup, data_state: dict, evaluate: Evaluator,
           export_to: str | None, writer: loop.MetricsWriter, skip_metrics: dict | None = None
           ) -> dict[str, dict]:
  """The end of every stage: a final checkpoint (with the data iterator's consumed
  position), skipped-sample counts, the final eval and the export."""
  ck = setup.checkpointer
  ck.save(state, data_state, force=True)
  ck.wait()
  if skip_metrics is not None:
    writer.write(int(state.step), skip_metrics, prefix="data/")
  if setup.ledger.total and jax.process_index() == 0:
    print(setup.ledger.summary(), flush=True)
  results = evaluate(state, int(state.step)) if evaluate else {}
  if export_to:
    from deepintuit_jax.models.qwen2_5_vl import hf_save
    export(graphdef, state, setup.tokenizer, setup.source, export_to,
           processor=hf_save.ProcessorSettings.from_pipeline(setup.options))
  return results
