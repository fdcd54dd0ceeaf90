"""The cold-start SFT stage: config -> dataclasses (once), build, resume, train, eval, export.

Resume order (one): the workdir's own latest complete checkpoint > `init_from` (an HF
directory, or another stage's workdir / checkpoints directory) > `model.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepintuit_jax import checkpointing
from deepintuit_jax.data import annotations, chat, errors, pipeline
from deepintuit_jax.evals import generation, metrics as metrics_lib
from deepintuit_jax.trainers import loop, optim, sft

# What "-1" / "auto" in configs/sft.py resolve to.
RELEASE = dict(learning_rate=2e-5, epochs=5, batch_size=64, max_frames=32, max_pixels=200704,
               frozen=r"^visual\.", max_new_tokens=2048, every_steps=500)
TINY = dict(learning_rate=5e-3, epochs=5, batch_size=8, max_frames=8,
            max_pixels=64 * 28 * 28, frozen="", max_new_tokens=192, every_steps=50)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  checkpoint: str          # resolved HF directory
  dtype: Any
  param_dtype: Any
  remat: str
  attention_impl: str | None


@dataclasses.dataclass(frozen=True)
class DataSpec:
  train_file: str
  eval_files: tuple[tuple[str, str], ...]
  class_file: str
  options: pipeline.PipelineOptions
  prefetch_steps: int = 2  # steps of batches prepared ahead in a thread (0 = none)
  special_tokens: str = "added"  # labels and tags as added tokens: added | special | none


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  num_steps: int
  epochs: int
  batch_size: int
  micro_batch_size: int
  log_every: int
  loss_chunk: int = 0  # tokens per cross-entropy chunk; 0 = unchunked [B, T, V] logits

  def __post_init__(self):
    if self.loss_chunk < 0:
      raise ValueError(f"train.loss_chunk {self.loss_chunk} must be >= 0 (0 = unchunked)")
    if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
      raise ValueError(f"train.batch_size {self.batch_size} must be a positive multiple of "
                       f"train.micro_batch_size {self.micro_batch_size}")
    if self.num_steps <= 0 and self.epochs <= 0:
      raise ValueError("set train.num_steps > 0 or train.epochs > 0")

  @property
  def accum(self) -> int:
    return self.batch_size // self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  every_steps: int
  keep: int
  export: bool
  async_save: bool


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


def cache_dir(configured: str) -> str:
  return os.path.abspath(os.path.expanduser(
      configured or os.environ.get("DEEPINTUIT_CACHE", "") or "~/.cache/deepintuit_jax"))


def _build_once(path: str, build) -> str:
  """Runs build(tmp) and renames tmp to `path`, unless `path` exists (atomic, so a run
  killed while building never leaves a half-written cache entry)."""
  if os.path.isdir(path):
    return path
  tmp = f"{path}.tmp-{os.getpid()}"
  build(tmp)
  try:
    os.replace(tmp, path)
  except OSError:  # another process won the race
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def parse_eval_files(spec: str) -> tuple[tuple[str, str], ...]:
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, path = part.partition("=")
    if not eq or not name.strip() or not path.strip():
      raise ValueError(f"data.eval_files: {part!r} is not name=path")
    out.append((name.strip(), path.strip()))
  return tuple(out)


def from_config(c) -> SFTRun:
  """The locked ConfigDict -> frozen dataclasses, with recipe sentinels resolved and the
  embedded default (tiny model, generated benchmark) built into the cache when needed."""
  recipe = c.recipe
  if recipe not in ("auto", "release", "tiny"):
    raise ValueError(f"recipe={recipe!r}: must be auto, release or tiny")
  if recipe == "auto":
    recipe = "release" if c.model.checkpoint else "tiny"
  r = RELEASE if recipe == "release" else TINY
  pick = lambda v, key: r[key] if v in (-1, -1.0, "auto") else v
  cache = cache_dir(c.model.cache_dir)

  ckpt = c.model.checkpoint
  if not ckpt:
    from deepintuit_jax.models import testing
    # Versioned names: a cache built by an older generator is never reused by mistake.
    ckpt = _build_once(os.path.join(cache, f"tiny_qwen2_5_vl_v{testing.VERSION}"),
                       lambda p: testing.write_tiny_checkpoint(p, seed=0))
  train_file, eval_spec, class_file, video_root = (
      c.data.train_file, c.data.eval_files, c.data.class_file, c.data.video_root)
  if not train_file:
    from deepintuit_jax.data import synthetic
    n_train, n_test = c.data.synthetic_train, c.data.synthetic_test
    root = _build_once(os.path.join(cache, f"synthetic_v{synthetic.VERSION}_s0_{n_train}_{n_test}"),
                       lambda p: synthetic.generate(p, seed=0, num_train=n_train,
                                                    num_test=n_test))
    train_file = os.path.join(root, "train.json")
    class_file = class_file or os.path.join(root, "classes.json")
    video_root = video_root or root
    if not eval_spec:
      eval_spec = (f"test_close={os.path.join(root, 'test_close.json')},"
                   f"test_open={os.path.join(root, 'test_open.json')}")
  eval_files = () if eval_spec == "none" else parse_eval_files(eval_spec)

  frozen = pick(c.train.frozen, "frozen")
  batch = pick(c.train.batch_size, "batch_size")
  options = pipeline.PipelineOptions(
      video_root=video_root or None, sampling=c.data.sampling,
      max_frames=pick(c.data.max_frames, "max_frames"),
      max_pixels=pick(c.data.max_pixels, "max_pixels"), min_pixels=c.data.min_pixels,
      max_seq_len=c.data.max_seq_len, on_bad_sample=c.data.on_bad_sample,
      num_workers=c.data.num_workers, seed=c.seed)
  return SFTRun(
      seed=c.seed, init_from=c.init_from,
      model=ModelSpec(checkpoint=ckpt, dtype=DTYPES[c.model.dtype],
                      param_dtype=DTYPES[c.model.param_dtype], remat=c.model.remat,
                      attention_impl=c.model.attention_impl or None),
      data=DataSpec(train_file=train_file, eval_files=eval_files, class_file=class_file,
                    options=options, prefetch_steps=c.data.prefetch_steps,
                    special_tokens=c.data.special_tokens),
      optim=optim.OptimConfig(
          learning_rate=pick(c.train.learning_rate, "learning_rate"),
          warmup_ratio=c.train.warmup_ratio, weight_decay=c.train.weight_decay, b1=c.train.b1,
          b2=c.train.b2, eps=c.train.eps, grad_clip=c.train.grad_clip,
          frozen=tuple(p for p in frozen.split(",") if p)),
      train=TrainSpec(num_steps=c.train.num_steps, epochs=pick(c.train.epochs, "epochs"),
                      batch_size=batch, micro_batch_size=c.train.micro_batch_size or batch,
                      log_every=c.train.log_every, loss_chunk=c.train.loss_chunk),
      checkpoint=CheckpointSpec(every_steps=pick(c.checkpoint.every_steps, "every_steps"),
                                keep=c.checkpoint.keep, export=c.checkpoint.export,
                                async_save=c.checkpoint.async_save),
      eval=generation.EvalConfig(batch_size=c.eval.batch_size,
                                 max_new_tokens=pick(c.eval.max_new_tokens, "max_new_tokens"),
                                 temperature=c.eval.temperature, max_items=c.eval.max_items,
                                 seed=c.seed),
      eval_every=c.eval.every_steps)


def _load_tokenizer(path: str):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(path))


def _summary(state: sft.TrainState, shardings: sft.TrainState, mesh) -> str:
  n_train, n_frozen = optim.count_params(state.params), optim.count_params(state.frozen)
  specs = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
    specs.setdefault(str(s.spec), 0)
    specs[str(s.spec)] += 1
  lines = [f"parameters: {n_train:,} trainable, {n_frozen:,} frozen",
           f"mesh: {dict(mesh.shape)} over {mesh.devices.size} device(s), "
           f"{jax.process_count()} process(es)",
           "trainable parameter shardings: " + ", ".join(f"{k} x{v}" for k, v in specs.items())]
  return "\n".join(lines)


def run(cfg: SFTRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Trains, evaluates and exports; returns the final eval metrics by split."""
  from deepintuit_jax.models import qwen2_5_vl
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions

  is_main = jax.process_index() == 0
  ck = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every_steps=cfg.checkpoint.every_steps,
                                  keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  own_step = ck.latest_step()
  source = cfg.model.checkpoint
  init_kind = "model.checkpoint"
  if own_step is None and cfg.init_from:
    if checkpointing.is_checkpoint_dir(cfg.init_from):
      init_kind = "init_from (checkpoint)"
    elif _is_hf_dir(cfg.init_from):
      source, init_kind = cfg.init_from, "init_from (HF)"
    else:
      raise FileNotFoundError(f"init_from {cfg.init_from!r}: neither an HF directory "
                              "(config.json + safetensors) nor a directory of complete Orbax "
                              "checkpoints")

  tokenizer = _load_tokenizer(source)
  ledger = errors.SkipLedger()
  classes = (list(annotations.load_class_file(cfg.data.class_file)) if cfg.data.class_file
             else None)
  records = annotations.load_records(cfg.data.train_file, on_bad_sample=cfg.data.options.on_bad_sample,
                                     ledger=ledger, labels=classes)
  classes = classes or annotations.labels_from_records(records)
  chat.add_tokens_for_mode(tokenizer, classes, cfg.data.special_tokens)  # one token per label
  options = dataclasses.replace(cfg.data.options, labels=tuple(classes))

  opts = RuntimeOptions(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                        remat=cfg.model.remat, attention_impl=cfg.model.attention_impl)
  model = qwen2_5_vl.from_pretrained(source, mesh=mesh, opts=opts)
  need = chat.required_vocab_size(tokenizer)
  if need > model.config.text.vocab_size:
    model = qwen2_5_vl.resize_token_embeddings(model, need, seed=cfg.seed)
  model_config = model.config

  procs = jax.process_count()
  if cfg.train.micro_batch_size % procs:
    raise ValueError(f"train.micro_batch_size {cfg.train.micro_batch_size} must divide over "
                     f"{procs} processes")
  per_process = cfg.train.micro_batch_size // procs
  groups = sft.local_data_groups(mesh)
  if per_process % groups:
    if procs > 1:
      raise ValueError(f"train.micro_batch_size {cfg.train.micro_batch_size} gives "
                       f"{per_process} rows per process, not a multiple of the {groups} "
                       "data-parallel shards each process feeds")
    print(f"warning: {per_process} rows per micro-batch do not split over {groups} "
          "data-parallel shards: vision runs replicated on every device", flush=True)
    groups = 1
  loader = pipeline.make_train_loader(
      records, tokenizer=tokenizer, model_config=model_config, options=options,
      batch_size=per_process, num_epochs=None, ledger=ledger, groups=groups)
  steps_per_epoch = max(loader.steps_per_epoch // cfg.train.accum, 1)
  total = cfg.train.num_steps if cfg.train.num_steps > 0 else cfg.train.epochs * steps_per_epoch

  tx = optim.make_optimizer(cfg.optim, total)
  graphdef, state = sft.init_state(model, tx, cfg.optim.frozen, cfg.seed)
  del model
  shardings = sft.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  if own_step is not None:
    state, data_state = ck.restore(state, shardings)
    loader.set_state(data_state)
    print(f"resumed from {ck.directory} step {own_step}", flush=True)
  elif init_kind == "init_from (checkpoint)":
    state = checkpointing.load_params(cfg.init_from, state, shardings)
    print(f"initialised parameters from {cfg.init_from}", flush=True)
  else:
    print(f"initialised from {init_kind}: {source}", flush=True)
  if is_main:
    print(_summary(state, shardings, mesh), flush=True)
    print(f"{len(records)} training records, {len(classes)} classes {classes}; "
          f"{steps_per_epoch} steps/epoch, {total} steps, accumulation {cfg.train.accum}, "
          f"{groups} batch group(s) per process, loss chunk {cfg.train.loss_chunk or 'off'}",
          flush=True)

  step_fn = sft.make_train_step(graphdef, tx, optim.schedule(cfg.optim, total), mesh=mesh,
                                state_sharding=shardings, loss_chunk=cfg.train.loss_chunk)

  def micro_batches():
    while True:
      micro, tokens = [], 0
      for _ in range(cfg.train.accum):
        b = next(loader)
        tokens += int(np.asarray(b["attention_mask"]).sum())
        micro.append(step_fn.place(sft.device_batch(b)))  # host->device in this thread
      yield tuple(micro), tokens * procs, loader.get_state()

  writer = loop.MetricsWriter(workdir, resume_step=own_step or 0, final_step=total)
  eval_splits = {name: annotations.load_records(path, on_bad_sample=options.on_bad_sample,
                                                labels=classes)
                 for name, path in cfg.data.eval_files}

  def evaluate(st, step):
    model = sft.trainable_model(graphdef, st)
    results = {}
    for name, recs in eval_splits.items():
      t0 = time.perf_counter()
      m, preds = generation.evaluate_split(model, tokenizer, recs, options=options,
                                           cfg=cfg.eval, classes=classes)
      m["eval_seconds"] = time.perf_counter() - t0
      results[name] = m
      writer.write(step, dict(split=name, **m), prefix=f"eval/{name}/")
      if is_main:
        with open(os.path.join(workdir, f"predictions_{name}_step{step}.jsonl"), "w") as f:
          f.writelines(json.dumps(p) + "\n" for p in preds)
        print(f"[eval step {step}] {name}: accuracy {m.get('accuracy', float('nan')):.3f} "
              f"format_rate {m.get('format_rate', float('nan')):.3f} "
              f"macro_f1 {m.get('macro_f1', float('nan')):.3f} (n={int(m['n'])})", flush=True)
    if is_main and results:
      with open(os.path.join(workdir, "eval_report.md"), "w") as f:
        f.write(metrics_lib.report_markdown(results, step=step))
      checkpointing.write_json(os.path.join(workdir, "eval_report.json"),
                               {"step": step, "splits": results})
    return results

  # Host-side batch preparation runs ahead in a thread; checkpoints record the position of
  # the batches actually trained on, not the read-ahead.
  # Several processes agree on batch shapes with a collective (pipeline.process_max) that
  # must not race the train step's collectives from another thread: no read-ahead there.
  ahead = cfg.data.prefetch_steps if procs == 1 else 0
  batches = loop.Prefetcher(micro_batches(), size=ahead, initial_state=loader.get_state())
  try:
    try:
      state = loop.train_loop(
          state, step_fn, batches, total_steps=total, writer=writer, checkpointer=ck,
          log_every=cfg.train.log_every, eval_fn=evaluate if eval_splits else None,
          eval_every=cfg.eval_every)
    finally:
      batches.close()
    loader.set_state(batches.data_state)  # rewind the read-ahead (and its skip counts)
    ck.save(state, loader.get_state(), force=True)
    ck.wait()
    skipped = loader.skip_metrics()
    writer.write(int(state.step), skipped, prefix="data/")
    if ledger.total and is_main:
      print(loader.skip_summary(), flush=True)
    results = evaluate(state, int(state.step)) if eval_splits else {}
    if cfg.checkpoint.export:
      export(graphdef, state, tokenizer, source, os.path.join(workdir, "hf"),
             processor=qwen2_5_vl.hf_save.ProcessorSettings.from_pipeline(options))
  finally:
    ck.close()
    loader.close()
    writer.close()
  return results


def export(graphdef, state: sft.TrainState, tokenizer, source: str, out: str, *,
           processor=None) -> str:
  """The trained model as an HF directory with the (extended) tokenizer; `processor`
  (hf_save.ProcessorSettings) writes the training's pixel / frame settings."""
  from deepintuit_jax.models import qwen2_5_vl
  model = sft.trainable_model(graphdef, state)
  if jax.process_index() == 0:
    qwen2_5_vl.save_pretrained(model, out, source_dir=source, processor=processor)
    tokenizer.save_pretrained(out)
    print(f"exported the model to {out}", flush=True)
  return out
