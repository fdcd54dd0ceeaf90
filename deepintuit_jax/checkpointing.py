"""Orbax checkpoints of a training run: parameters, optimizer state, step, RNG, data iterator.

Layout of one step directory (`<workdir>/checkpoints/<step>/`), one Orbax item each:
  params   all model parameters (trainable and frozen, one tree, HF-mirroring paths), so
           any stage can `init_from` another stage's checkpoint whatever it froze
  opt      the optimizer state of the trainable parameters
  meta     step [] int32 and rng [2] uint32
  data     the data iterator state (JSON)
Saves are asynchronous. Orbax writes into a temporary directory and renames it when the
save is complete, so an interrupted save is never listed and never restored.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deepintuit_jax import paths
from deepintuit_jax.trainers.state import TrainState


def _abstract(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) for restoring into `tree`'s layout."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  # `shardings` may stop at a prefix of `tree` (a NamedSharding in place of an nnx.Param).
  full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, tree,
                      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, full)


def merged_params(state: TrainState) -> dict:
  """All parameters of the state (trainable + frozen) as one pure dict."""
  return nnx.to_pure_dict(nnx.merge_state(state.params, state.frozen))


class Checkpointer:
  """Async Orbax checkpoints of a `TrainState` plus JSON data-iterator state.

  directory: where step directories go; every_steps: `maybe_save` cadence; keep: how many
  of the latest complete checkpoints to keep (older ones are deleted after a new save).
  `model_source` (set by the stage once known): the HF directory the model's architecture
  and tokenizer came from, recorded beside the first save (`SOURCE_FILE`), so that a later
  stage starting from these checkpoints builds the same model (`recorded_source`), with the
  rope rule it was trained with (`rope_convention`, `recorded_rope_convention`).
  """
  model_source: str | None = None
  rope_convention: str | None = None
  _source_recorded = False

  def __init__(self, directory: str, *, every_steps: int, keep: int = 2,
               async_save: bool = True):
    if every_steps < 1:
      raise ValueError(f"checkpoint.every_steps must be >= 1, got {every_steps}")
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.fspath(paths.as_path(directory))  # a local path or a gs:// URL
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("params", "opt", "meta", "data"))

  def latest_step(self) -> int | None:
    """The latest *complete* checkpoint's step (interrupted saves are not listed)."""
    self._mgr.reload()
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    self._mgr.reload()
    return list(self._mgr.all_steps())

  def save(self, state: TrainState, data_state: dict | None, *, force: bool = False) -> bool:
    """Saves at `state.step` when it is a multiple of every_steps (or `force`); returns
    whether a save started. The save runs in the background; `wait()` blocks on it."""
    step = int(state.step)
    if not force and step % self.every_steps:
      return False
    if step in self._mgr.all_steps():
      return False
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(merged_params(state)),
        opt=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state or {}))
    if self.model_source and not self._source_recorded and jax.process_index() == 0:
      record = paths.join(self.directory, SOURCE_FILE)
      if not paths.as_path(record).exists():  # one look per run, not per save (gs://)
        write_json(record, {"source": self.model_source,
                            "rope_convention": self.rope_convention})
      self._source_recorded = True
    return bool(self._mgr.save(step, args=args, force=True))

  def restore(self, state: TrainState, shardings: TrainState | None = None,
              step: int | None = None) -> tuple[TrainState, dict]:
    """Restores `step` (default the latest) into the layout of `state` (a freshly built
    state, or its `jax.eval_shape`); returns (state, data iterator state)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    shard = shardings if shardings is not None else None
    param_shard = (None if shard is None
                   else nnx.to_pure_dict(nnx.merge_state(shard.params, shard.frozen)))
    target_params = merged_params(state)
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target_params, param_shard)),
        opt=ocp.args.StandardRestore(
            _abstract(state.opt_state, None if shard is None else shard.opt_state)),
        meta=ocp.args.StandardRestore(_abstract({"step": state.step, "rng": state.rng})),
        data=ocp.args.JsonRestore())
    out = self._mgr.restore(step, args=args)
    state = with_params(state, out["params"])
    state = state.replace(opt_state=out["opt"], step=out["meta"]["step"],
                          rng=out["meta"]["rng"])
    return state, dict(out["data"] or {})

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def with_params(state: TrainState, params: dict) -> TrainState:
  """`state` with its trainable and frozen parameters replaced from a full pure dict
  (extra entries are an error; the split of trainable / frozen is kept)."""
  def pick(part: nnx.State) -> nnx.State:
    part = jax.tree.map(lambda x: x, part)  # a copy; replace_by_pure_dict mutates
    flat = dict(nnx.to_flat_state(part))
    sub = {}
    for path in flat:
      node, src = sub, params
      for k in path[:-1]:
        src = src[k] if k in src else src[str(k)]
        node = node.setdefault(k, {})
      src_leaf = src[path[-1]] if path[-1] in src else src[str(path[-1])]
      node[path[-1]] = src_leaf
    nnx.replace_by_pure_dict(part, sub)
    return part
  return state.replace(params=pick(state.params), frozen=pick(state.frozen))


def is_checkpoint_dir(path: str) -> bool:
  """A directory of Orbax step directories (a stage's `checkpoints/`) or a workdir with one."""
  return latest_complete_step(path) is not None


SOURCE_FILE = "model_source.json"


def recorded_source(path: str) -> str | None:
  """The HF directory the checkpoints under `path` (a `checkpoints/` dir or its workdir) were
  trained from, as `Checkpointer.model_source` recorded it; None when not recorded."""
  return _source_record(path).get("source") or None


def recorded_rope_convention(path: str) -> str | None:
  """The rope rule the checkpoints under `path` were trained with; None when not recorded
  (checkpoints written before the rule was recorded)."""
  return _source_record(path).get("rope_convention") or None


def _source_record(path: str) -> dict:
  record = paths.as_path(paths.join(_ckpt_root(path), SOURCE_FILE))
  return json.loads(record.read_text()) if record.exists() else {}


def _ckpt_root(path: str) -> str:
  sub = paths.join(path, "checkpoints")
  return sub if paths.as_path(sub).is_dir() else os.fspath(paths.as_path(path))


def latest_complete_step(path: str) -> int | None:
  root = _ckpt_root(path)
  if not paths.as_path(root).is_dir():
    return None
  steps = ocp.utils.checkpoint_steps(root)  # only finalised step directories
  return max(steps) if steps else None


def load_params(path: str, state: TrainState, shardings: TrainState | None = None
                ) -> TrainState:
  """`init_from` another stage's checkpoint: only its parameters (latest complete step);
  optimizer state, step and RNG stay fresh."""
  root = _ckpt_root(path)
  step = latest_complete_step(root)
  if step is None:
    raise FileNotFoundError(f"init_from {path!r}: no complete Orbax checkpoint there")
  param_shard = (None if shardings is None
                 else nnx.to_pure_dict(nnx.merge_state(shardings.params, shardings.frozen)))
  target = _abstract(merged_params(state), param_shard)
  with ocp.CheckpointManager(root, item_names=("params", "opt", "meta", "data")) as mgr:
    try:
      out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError) as e:
      raise ValueError(f"init_from {path!r} step {step}: parameters do not match this model "
                       f"({e})") from None
  return with_params(state, out["params"])


def write_json(path: str, obj: Any) -> None:
  """Small helper for JSON files next to checkpoints (atomic replace; local or gs://)."""
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                    default=lambda o: np.asarray(o).tolist()))
