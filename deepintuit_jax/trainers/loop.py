"""The training cadence shared by every stage: step, log, evaluate, checkpoint.

`train_loop` owns no model knowledge: it draws micro-batches, calls the jitted step, writes
metrics (`metrics.jsonl` + TensorBoard), shows a progress bar (step, loss, tokens/s),
checkpoints every `every_steps` and at the end (with the data iterator state), runs the
evaluation callback on its cadence, and stops loudly on a NaN/Inf.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or the gradients; the state was not updated."""


class MetricsWriter:
  """Appends one JSON object a line to `<workdir>/metrics.jsonl` and mirrors scalars to
  TensorBoard (`<workdir>/tb`). Only process 0 writes."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, row: dict[str, Any], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in row.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(f"{prefix}{k}", v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(v: Any) -> Any:
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0)


def train_loop(state: Any, step_fn: Callable, micro_batches: Iterator[tuple[tuple, int]], *,
               total_steps: int, writer: MetricsWriter, checkpointer=None,
               data_state: Callable[[], dict] | None = None, log_every: int = 1,
               eval_fn: Callable[[Any, int], None] | None = None, eval_every: int = 0,
               on_finite_error: Callable[[], None] | None = None) -> Any:
  """Runs `step_fn` from `state.step` to `total_steps`; returns the final state.

  micro_batches: yields (tuple of device-ready micro-batches, real tokens in them) per step.
  data_state: the data iterator state *after* the batches of the step just taken.
  eval_fn(state, step): called every `eval_every` steps (not at the end: the caller does).
  """
  start = int(state.step)
  bar = _progress(total_steps, start)
  t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
  try:
    for step in range(start, total_steps):
      try:
        micro, n_tokens = next(micro_batches)
      except StopIteration:
        print(f"data exhausted at step {step} of {total_steps}", flush=True)
        break
      state, metrics = step_fn(state, micro)
      metrics = jax.device_get(metrics)
      if not bool(metrics["ok"]):
        if checkpointer is not None:
          checkpointer.wait()  # the last good checkpoint must be complete before we exit
        if on_finite_error is not None:
          on_finite_error()
        raise NonFiniteError(
            f"non-finite loss or gradients at step {step + 1} (loss {float(metrics['loss'])}, "
            f"grad_norm {float(metrics['grad_norm'])}); the state was not updated and the "
            f"last good checkpoint is step "
            f"{checkpointer.latest_step() if checkpointer is not None else None}")
      tokens_since += n_tokens
      steps_since += 1
      done = int(state.step)
      if done % log_every == 0 or done == total_steps:
        now = time.perf_counter()
        tps = tokens_since / max(now - t_last, 1e-9)
        row = dict(loss=float(metrics["loss"]), lr=float(metrics["lr"]),
                   grad_norm=float(metrics["grad_norm"]), loss_tokens=int(metrics["tokens"]),
                   tokens_per_second=tps, step_time=(now - t_last) / steps_since)
        writer.write(done, row, prefix="train/")
        if bar is not None:
          bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:.0f}", refresh=False)
        t_last, tokens_since, steps_since = now, 0, 0
      if bar is not None:
        bar.update(1)
      if checkpointer is not None:
        checkpointer.save(state, data_state() if data_state else {},
                          force=done == total_steps)
      if eval_fn is not None and eval_every and done % eval_every == 0 and done != total_steps:
        eval_fn(state, done)
  finally:
    if bar is not None:
      bar.close()
  return state
