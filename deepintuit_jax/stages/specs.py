"""Config pieces -> the frozen specs a stage is built from, with the embedded default (the
tiny model, the generated benchmark) built into the cache once (`build_once`), and the small
parsers every stage shares (eval files, handed-over models, class definitions). A config's
recipe is resolved before these run (`deepintuit_jax.core.recipes`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax.numpy as jnp

from deepintuit_jax.core import paths
from deepintuit_jax.data import annotations, pipeline
from deepintuit_jax.engine import optim
from deepintuit_jax.evals import generation

# What a trace workdir writes beside its examples for the calibration stage.
META = "calibration_meta.json"

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  checkpoint: str          # resolved HF directory
  dtype: Any
  param_dtype: Any
  remat: str
  attention_impl: str | None
  rope_convention: str = "qwen"  # rope.CONVENTIONS; recorded in checkpoints and the export


@dataclasses.dataclass(frozen=True)
class DataSpec:
  train_file: str
  eval_files: tuple[tuple[str, str], ...]
  class_file: str
  options: pipeline.PipelineOptions
  prefetch_steps: int = 2  # steps of batches prepared ahead in a thread (0 = none)
  special_tokens: str = "added"  # labels and tags as added tokens: added | special | none


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  every_steps: int
  keep: int
  export: bool
  async_save: bool


def cache_dir(configured: str) -> str:
  return os.path.abspath(os.path.expanduser(
      configured or os.environ.get("DEEPINTUIT_CACHE", "") or "~/.cache/deepintuit_jax"))


def build_once(path: str, build: Callable[[str], Any]) -> str:
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


def model_spec(c) -> ModelSpec:
  """`c.model` -> ModelSpec; an empty checkpoint = the built-in tiny model (built once)."""
  ckpt = c.model.checkpoint
  if not ckpt:
    from deepintuit_jax.models import tiny
    # Versioned names: a cache built by an older generator is never reused by mistake.
    ckpt = build_once(os.path.join(cache_dir(c.model.cache_dir),
                                   f"tiny_qwen2_5_vl_v{tiny.VERSION}"),
                      lambda p: tiny.write_tiny_checkpoint(p, seed=0))
  return ModelSpec(checkpoint=ckpt, dtype=DTYPES[c.model.dtype],
                   param_dtype=DTYPES[c.model.param_dtype], remat=c.model.remat,
                   attention_impl=c.model.attention_impl or None,
                   rope_convention=c.model.rope_convention)


def data_spec(c) -> DataSpec:
  """`c.data` -> DataSpec; an empty train_file = the generated benchmark (built once), whose
  test splits are the default eval files."""
  train_file, eval_spec, class_file, video_root = (
      c.data.train_file, c.data.eval_files, c.data.class_file, c.data.video_root)
  if not train_file:
    from deepintuit_jax.data import synthetic
    n_train, n_test = c.data.synthetic_train, c.data.synthetic_test
    root = build_once(os.path.join(cache_dir(c.model.cache_dir),
                                   f"synthetic_v{synthetic.VERSION}_s0_{n_train}_{n_test}"),
                      lambda p: synthetic.generate(p, seed=0, num_train=n_train,
                                                   num_test=n_test))
    train_file = os.path.join(root, "train.json")
    class_file = class_file or os.path.join(root, "classes.json")
    video_root = video_root or root
    if not eval_spec:
      eval_spec = (f"test_close={os.path.join(root, 'test_close.json')},"
                   f"test_open={os.path.join(root, 'test_open.json')}")
  eval_files = () if eval_spec == "none" else paths.parse_named(eval_spec, "data.eval_files")
  options = pipeline.PipelineOptions(
      video_root=video_root or None, sampling=c.data.sampling,
      max_frames=c.data.max_frames, max_pixels=c.data.max_pixels, min_pixels=c.data.min_pixels,
      max_seq_len=c.data.max_seq_len, on_bad_sample=c.data.on_bad_sample,
      num_workers=c.data.num_workers, seed=c.seed)
  return DataSpec(train_file=train_file, eval_files=eval_files, class_file=class_file,
                  options=options, prefetch_steps=c.data.prefetch_steps,
                  special_tokens=c.data.special_tokens)


def optim_spec(c, **overrides) -> optim.OptimConfig:
  """The optimizer of a stage's `train.*` keys (learning_rate, warmup_ratio when it has one,
  weight_decay, b1, b2, eps, grad_clip, frozen as comma-separated regexes, offload_optimizer);
  `overrides` replace what a stage derives otherwise (e.g. GRPO's constant schedule)."""
  t = c.train
  kw = dict(learning_rate=t.learning_rate, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
            eps=t.eps, grad_clip=t.grad_clip, frozen=t.frozen,
            offload_optimizer=t.offload_optimizer)
  if "warmup_ratio" in t:
    kw["warmup_ratio"] = t.warmup_ratio
  kw.update(overrides)
  kw["frozen"] = tuple(p for p in kw["frozen"].split(",") if p)
  return optim.OptimConfig(**kw)


def checkpoint_spec(c) -> CheckpointSpec:
  return CheckpointSpec(every_steps=c.checkpoint.every_steps,
                        keep=c.checkpoint.keep, export=c.checkpoint.export,
                        async_save=c.checkpoint.async_save)


def eval_spec(c) -> generation.EvalConfig:
  return generation.EvalConfig(batch_size=c.eval.batch_size,
                               max_new_tokens=c.eval.max_new_tokens,
                               temperature=c.eval.temperature, max_items=c.eval.max_items,
                               seed=c.seed)


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


def resolve_policy(init_from: str, model: ModelSpec, *, what: str = "init_from",
                   produced_by: str = "the GRPO stage") -> str:
  """The HF directory of a model handed over by a previous stage: `init_from` is an HF
  directory or a stage workdir holding its `hf/` export; "none" / "" = model.checkpoint."""
  if init_from in ("", "none"):
    return model.checkpoint
  path = paths.join(os.path.expanduser(init_from))
  for cand in (path, os.path.join(path, "hf")):
    if paths.isfile(os.path.join(cand, "config.json")):
      return cand
  raise FileNotFoundError(
      f"{what} {init_from!r}: neither an HF directory (config.json + safetensors) nor a stage "
      f"workdir with an hf/ export; run {produced_by} first (checkpoint.export=True), or "
      f"point {what} at a model")


def class_definitions(class_file: str, records) -> dict[str, str]:
  """{label: definition} from the class file, else the records' labels (no definitions)."""
  if class_file:
    return dict(annotations.load_class_file(class_file))
  return {c: "" for c in annotations.labels_from_records(records)}


def parse_priority(spec: str) -> tuple[str, ...] | None:
  parts = tuple(p.strip() for p in spec.split(",") if p.strip())
  return parts or None
