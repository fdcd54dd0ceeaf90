"""The training cadence shared by every stage: step, log, evaluate, checkpoint.

`train_loop` owns no model knowledge: it draws micro-batches, calls the jitted step, writes
metrics (`metrics.jsonl` + TensorBoard), shows a progress bar (step, loss, tokens/s),
checkpoints every `every_steps` and at the end (with the data iterator state), runs the
evaluation callback on its cadence, and stops loudly on a NaN/Inf.
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from deepintuit_jax.core import interrupts, paths, workdir as workdir_lib


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or the gradients; the state was not updated."""


class MetricsWriter:
  """Appends one JSON object a line to `<workdir>/metrics.jsonl` and mirrors scalars to
  TensorBoard (`<workdir>/tb`). Only process 0 writes. A `gs://` workdir: rows are
  written through `paths.append_line` (one object rewrite per row), TensorBoard events into
  a local temporary directory copied to `<workdir>/tb` at `close()`."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None,
               final_step: int | None = None, redo_all: bool = False):
    """resume_step: the step the run restarts from; rows it will write again are dropped
    once (`workdir.truncate_metrics`; also its eval rows when it is `final_step`).
    redo_all: the stage writes all its rows again on a rerun (traces, infer): the rows of an
    earlier, killed run are dropped, so that each row appears once."""
    if redo_all:
      resume_step = -1  # every row is past it
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self._tb = self._tb_stage = None
    if self.enabled:
      paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
      if resume_step is not None:
        workdir_lib.truncate_metrics(self.path, resume_step, redo_final=resume_step == final_step)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb_stage = paths.staged(paths.join(workdir, "tb"))  # tensorboardX: local only
        self._tb = SummaryWriter(self._tb_stage.__enter__())

  def write(self, step: int, row: dict[str, Any], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in row.items()}
    paths.append_line(self.path, json.dumps({"step": int(step), **clean}, sort_keys=True))
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(f"{prefix}{k}", v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb, stage = None, self._tb_stage
      stage.__exit__(None, None, None)  # copies the events up when the workdir is a URL


def _plain(v: Any) -> Any:
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


class Prefetcher:
  """Draws items from `source` in a background thread, up to `size` ahead, so that the host's
  batch preparation (collation, rope positions, vision layouts) overlaps the device step.

  Items are `(micro_batches, n_tokens, data_state)` where `data_state` is the data
  iterator's state *after* the item's batches. `data_state` of the Prefetcher is that of the
  last item handed out (the position a checkpoint must record, not the read-ahead one);
  before any item it is `initial_state`. An exception raised by `source` is re-raised by the
  `__next__` that reaches it, with its own traceback (a bad sample in "error" mode stops the
  run with its item, file and reason).
  """

  def __init__(self, source: Iterator, *, size: int = 2, initial_state: Any = None):
    """size: items read ahead; 0 = none (items are drawn in the caller's thread)."""
    if size < 0:
      raise ValueError(f"prefetch size must be >= 0, got {size}")
    self.data_state = initial_state
    self._source = source if size == 0 else None
    if size == 0:
      return
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                    name="batch-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, source: Iterator) -> None:
    try:
      for item in source:
        if not self._put(("item", item)):
          return
      self._put(("end", None))
    except BaseException as e:  # noqa: BLE001 (handed to the consumer, not swallowed)
      self._put(("error", e))

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self):
    if self._source is not None:
      value = next(self._source)
      self.data_state = value[2]
      return value
    kind, value = self._queue.get()
    if kind == "end":
      self._queue.put((kind, value))  # stay exhausted
      raise StopIteration
    if kind == "error":
      self._queue.put((kind, value))
      raise value
    self.data_state = value[2]
    return value

  def close(self) -> None:
    """Stops the thread (read-ahead items are dropped; `data_state` stays consumed)."""
    if self._source is not None:
      return
    self._stop.set()
    self._thread.join(timeout=60)


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
  """The scalar entries of a metrics dict as Python numbers (`ok` and arrays left out)."""
  out = {}
  for k, v in metrics.items():
    if k == "ok":
      continue
    v = _plain(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = v
  return out


def _crossed(prev: int, done: int, every: int) -> bool:
  """Whether (prev, done] holds a multiple of `every` (a step may advance state.step by
  several optimizer steps, e.g. GRPO's mini-batches)."""
  return bool(every) and done // every > prev // every


def train_loop(state: Any, step_fn: Callable, micro_batches: Iterator[tuple], *,
               total_steps: int, writer: MetricsWriter, checkpointer=None,
               data_state: Callable[[], dict] | None = None, log_every: int = 1,
               eval_fn: Callable[[Any, int], None] | None = None, eval_every: int = 0,
               on_finite_error: Callable[[], None] | None = None) -> Any:
  """Runs `step_fn` until `state.step` reaches `total_steps`; returns the final state.

  Progress is `state.step` (optimizer steps), so a `step_fn` may take several optimizer
  steps per item; logging, checkpoints and evals fire when their cadence is crossed.
  micro_batches: yields (payload for step_fn, real tokens in it) per item, optionally with
    a third element, the data iterator state after it (what a `Prefetcher` yields), and a
    fourth, a dict of host-side metrics to log with the step's.
  data_state: the data iterator state after the item just trained on; when given it takes
    precedence over the items' (a step_fn that draws more data itself needs it).
  Every scalar the step returns (except `ok`) is logged, plus tokens_per_second (unless the
  step reports its own) and step_time.
  eval_fn(state, step): called every `eval_every` steps (not at the end: the caller does).
  """
  start = int(state.step)
  bar = _progress(total_steps, start)
  t_last, tokens_since, items_since = time.perf_counter(), 0, 0
  done = start
  stop, last_data = interrupts.StopRequest().install(processes=jax.process_count()), None
  try:
    while done < total_steps:
      if stop.requested:  # Ctrl-C: checkpoint the last completed step, raise Interrupted
        stop.stop(state, last_data, checkpointer)
      try:
        item = next(micro_batches)
      except StopIteration:
        print(f"data exhausted at step {done} of {total_steps}", flush=True)
        break
      payload, n_tokens = item[0], item[1]
      item_state = item[2] if len(item) > 2 else None
      host_metrics = item[3] if len(item) > 3 else {}
      state, metrics = step_fn(state, payload)
      metrics = jax.device_get(metrics)
      prev, done = done, int(state.step)
      if not bool(metrics["ok"]):
        if checkpointer is not None:
          checkpointer.wait()  # the last good checkpoint must be complete before we exit
        if on_finite_error is not None:
          on_finite_error()
        raise NonFiniteError(
            f"non-finite loss or gradients at step {prev + 1} (loss {float(metrics['loss'])}, "
            f"grad_norm {float(metrics['grad_norm'])}); the state was not updated and the "
            f"last good checkpoint is step "
            f"{checkpointer.latest_step() if checkpointer is not None else None}")
      tokens_since += n_tokens
      items_since += 1
      if _crossed(prev, done, log_every) or done >= total_steps:
        now = time.perf_counter()
        row = {**_scalars(host_metrics), **_scalars(metrics)}
        row.setdefault("tokens_per_second", tokens_since / max(now - t_last, 1e-9))
        row["step_time"] = (now - t_last) / items_since
        writer.write(done, row, prefix="train/")
        if bar is not None:
          shown = {k: f"{row[k]:.4g}" for k in ("loss", "reward_mean") if k in row}
          bar.set_postfix(**shown, tok_s=f"{row['tokens_per_second']:.0f}", refresh=False)
        t_last, tokens_since, items_since = now, 0, 0
      if bar is not None:
        bar.update(done - prev)
      ds = data_state() if data_state is not None else item_state
      last_data = ds if ds is not None else {}
      if checkpointer is not None and (_crossed(prev, done, checkpointer.every_steps)
                                       or done >= total_steps):
        checkpointer.save(state, last_data, force=True)
      if eval_fn is not None and _crossed(prev, done, eval_every) and done < total_steps:
        eval_fn(state, done)
    if stop.requested:
      stop.stop(state, last_data, checkpointer)
  finally:
    stop.uninstall()
    if bar is not None:
      bar.close()
  return state
