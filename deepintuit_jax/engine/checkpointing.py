"""Orbax checkpoints of a training run: parameters, optimizer state, step, RNG, data iterator.

Layout of one step directory (`<workdir>/checkpoints/<step>/`), one Orbax item each:
  params   all model parameters (trainable and frozen, one tree, HF-mirroring paths), so
           any stage can `init_from` another stage's checkpoint whatever it froze
  opt      the optimizer state of the trainable parameters
  meta     step [] int32 and rng [2] uint32
  data     the data iterator state (JSON)
Saves are asynchronous. Orbax writes into a temporary directory and renames it when the
save is complete, so an interrupted save is never listed and never restored.

What storage does wrong (see docs/reliability.md):
* A save that fails (a full disk, a failing write) raises `CheckpointError` naming the
  directory, the step and the error, at the next `save` or `wait`; the previous checkpoints
  stay (Orbax deletes old ones only after a save is complete), so a rerun resumes there.
* A complete-looking step that cannot be read (a truncated or missing file, an empty
  metadata file: a disk that filled after the rename, a half-copied bucket) is skipped by
  `restore`, which falls back to the newest intact step and says which step it skipped and
  why. The skipped step is moved aside to `<step>.unreadable` (kept for inspection, out of
  Orbax's step listing, so neither resumed nor counted by `keep` nor overwritten), but only
  once an older step has restored: a restore that fails at every step (a code or layout
  problem, not the files) moves nothing and stops with one line.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deepintuit_jax.core import interrupts, paths
from deepintuit_jax.core.errors import CheckpointError
from deepintuit_jax.engine.state import TrainState

UNREADABLE = ".unreadable"  # suffix of a step directory moved aside by `restore`


def _abstract(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) for restoring into `tree`'s layout."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  # `shardings` may stop at a prefix of `tree` (a NamedSharding in place of an nnx.Param).
  full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, tree,
                      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, full)


def _param_shardings(shardings: TrainState | None) -> dict | None:
  return (None if shardings is None
          else nnx.to_pure_dict(nnx.merge_state(shardings.params, shardings.frozen)))


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
  _pending: int | None = None  # the step of the save in flight
  _failed = False              # a failed save was reported (Orbax re-raises it at close)

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
    with self._failures(step):
      started = bool(self._mgr.save(step, args=args, force=True))
    self._pending = step if started else self._pending
    # Test hook; Orbax's save has waited for the previous save, so that one is complete.
    interrupts.kill_point(f"checkpoint save of step {step} started in {self.directory}")
    return started

  @contextlib.contextmanager
  def _failures(self, step: int | None):
    """A failed write (raised by Orbax in the save's thread, surfacing here) as one line."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 (any failure of the storage stops the run)
      failed = self._pending if self._pending is not None else step
      self._pending, self._failed = None, True
      self._mgr.reload()
      latest = self._mgr.latest_step()
      raise CheckpointError(
          f"saving checkpoint step {failed} in {self.directory} failed ({reason(e)}); the "
          f"latest complete checkpoint is step {latest}, which a rerun resumes from once the "
          "storage is fixed (free space, permissions)") from e

  def restore(self, state: TrainState, shardings: TrainState | None = None,
              step: int | None = None) -> tuple[TrainState, dict]:
    """Restores `step` into the layout of `state` (a freshly built state, or its
    `jax.eval_shape`); returns (state, data iterator state). Without `step`: the newest
    step that reads back, unreadable newer ones skipped (printed) and moved aside.

    Raises:
      CheckpointError: no step reads back (each step's reason is named).
    """
    if step is not None:
      return self._restore(state, shardings, step)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    skipped: list[tuple[int, str]] = []
    for s in steps:
      try:
        out, why = self._restore(state, shardings, s), None
      except Exception as e:  # noqa: BLE001 (Orbax / TensorStore raise many types here)
        out, why = None, reason(e)
      if not _agreed(why is None):
        skipped.append((s, why or "unreadable on another process"))
        continue
      for bad, why in skipped:
        aside = self._move_aside(bad)
        print(f"checkpoint step {bad} in {self.directory} is unreadable ({why}); skipped it "
              f"(moved to {aside}) and resumed from step {s}", flush=True)
      return out
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored: "
        + "; ".join(f"step {s}: {why}" for s, why in skipped)
        + " (use a new --workdir, or move the broken step directories aside)")

  def _restore(self, state: TrainState, shardings: TrainState | None, step: int
               ) -> tuple[TrainState, dict]:
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(
            _abstract(merged_params(state), _param_shardings(shardings))),
        opt=ocp.args.StandardRestore(
            _abstract(state.opt_state, None if shardings is None else shardings.opt_state)),
        meta=ocp.args.StandardRestore(_abstract({"step": state.step, "rng": state.rng})),
        data=ocp.args.JsonRestore())
    out = self._mgr.restore(step, args=args)
    state = with_params(state, out["params"])
    state = state.replace(opt_state=out["opt"], step=out["meta"]["step"],
                          rng=out["meta"]["rng"])
    return state, dict(out["data"] or {})

  def _move_aside(self, step: int) -> str:
    """`<step>` -> `<step>.unreadable[-k]` (process 0; the others wait for it)."""
    src = paths.as_path(self.directory) / str(step)
    dst, k = src.parent / f"{step}{UNREADABLE}", 1
    ok = True
    if jax.process_index() == 0:
      while dst.exists():
        dst, k = src.parent / f"{step}{UNREADABLE}-{k}", k + 1
      try:
        src.rename(dst)
      except (OSError, NotImplementedError) as e:  # e.g. a bucket without directory renames
        ok, why = False, reason(e)
    if not _agreed(ok):
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is unreadable and could not be moved "
          f"aside ({why if not ok else 'on process 0'}); move it out of the way by hand and "
          "rerun")
    self._mgr.reload()
    return os.fspath(dst)

  def wait(self) -> None:
    with self._failures(None):
      self._mgr.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    if not self._failed:
      self.wait()
    try:
      self._mgr.close()
    except Exception:  # noqa: BLE001
      if not self._failed:  # else: the failure already reported, raised again by Orbax
        raise


def reason(e: BaseException, limit: int = 240) -> str:
  """The root cause of `e` on one line (TensorStore wraps it in pages of spec)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split()) or type(e).__name__
  text = text if len(text) <= limit else text[:limit] + "..."
  return text if isinstance(e, (OSError, ValueError)) and ":" in text else (
      f"{type(e).__name__}: {text}")


def _agreed(ok: bool) -> bool:
  """Whether every process has `ok` (a restore must pick the same step everywhere)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


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
  target = _abstract(merged_params(state), _param_shardings(shardings))
  with ocp.CheckpointManager(root, item_names=("params", "opt", "meta", "data")) as mgr:
    try:
      out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001 (a model mismatch, or a truncated / missing file)
      raise CheckpointError(f"init_from {path!r}: cannot load the parameters of its checkpoint "
                            f"step {step} into this model ({reason(e)})") from e
  return with_params(state, out["params"])


def write_json(path: str, obj: Any) -> None:
  """Small helper for JSON files next to checkpoints (atomic replace; local or gs://)."""
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                    default=lambda o: np.asarray(o).tolist()))
