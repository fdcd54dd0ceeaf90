"""GRPO across processes: which global prompt a process's rows are, and the rollout's
per-row arrays and counters gathered from every process (small host arrays), so that the
metrics process 0 logs are the global ones.

The training loader interleaves one global order over the processes
(`data/pipeline.py`: process p takes elements p, p + P, p + 2P, ...), so local prompt r of
process p is global prompt r * P + p of the rollout batch: with one process that is just r.
Every function takes `allgather` (default `process_allgather`: NumPy in, stacked
`[process_count, ...]` out, a collective every process must call in the same order), so a
test can stand in for several processes on one.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

Allgather = Callable[[np.ndarray], np.ndarray]


def process_allgather(x: np.ndarray) -> np.ndarray:
  """[...] on every process -> [process_count, ...] (one process: x[None], no sync)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape((-1,) + x.shape)


def global_prompt_ids(num_local: int, process_index: int, process_count: int) -> np.ndarray:
  """[num_local] int32: the global index (in the rollout batch) of each local prompt."""
  return (np.arange(num_local, dtype=np.int32) * process_count + process_index).astype(np.int32)


def gather_rows(arrays: dict[str, np.ndarray], group_size: int,
                allgather: Allgather = process_allgather) -> dict[str, np.ndarray]:
  """Per-response arrays [n * G, ...] of every process -> [P * n * G, ...] in global prompt
  order (prompt q's G rows at q*G .. q*G + G-1, q = r * P + p). Every process must hold the
  same n (GRPO batches have the same shape on every process)."""
  out = {}
  for name, x in arrays.items():
    x = np.asarray(x)
    got = allgather(x)  # [P, n*G, ...]
    p, rows = got.shape[:2]
    if rows % group_size:
      raise ValueError(f"gather_rows: {name} has {rows} rows, not whole groups of {group_size}")
    got = got.reshape((p, rows // group_size, group_size) + x.shape[1:])
    out[name] = np.swapaxes(got, 0, 1).reshape((p * rows,) + x.shape[1:])
  return out


def reduce_scalars(values: dict[str, float], how: dict[str, str],
                   allgather: Allgather = process_allgather) -> dict[str, float]:
  """Scalars of every process reduced by `how[name]` in ("sum", "max", "min"), in one
  collective."""
  names = sorted(values)
  ops = {"sum": np.sum, "max": np.max, "min": np.min}
  for n in names:
    if how[n] not in ops:
      raise ValueError(f"reduce_scalars: {n}: unknown reduction {how[n]!r}")
  got = allgather(np.asarray([values[n] for n in names], np.float64))  # [P, K]
  return {n: float(ops[how[n]](got[:, i])) for i, n in enumerate(names)}


def rollout_stats(rows: dict[str, np.ndarray]) -> dict[str, float]:
  """The rollout metrics of the (gathered) per-response arrays: total [N] rewards,
  `reward/<name>` components [N], lengths [N], truncated [N] bool, advantages [N]."""
  total, lengths = rows["total"], rows["lengths"].astype(np.float64)
  adv = rows["advantages"]
  out = dict(reward_mean=float(total.mean()), reward_std=float(total.std()),
             response_length_mean=float(lengths.mean()),
             response_length_max=float(lengths.max()),
             response_truncated=float(np.mean(rows["truncated"])),
             advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
             advantage_min=float(adv.min()), advantage_max=float(adv.max()),
             rollout_tokens=float(lengths.sum()))
  for name, v in rows.items():
    if name.startswith("reward/"):
      out[name] = float(np.mean(v))
  if "reward/format" in rows:
    out["format_rate"] = out["reward/format"]
  if "reward/accuracy" in rows:
    out["accuracy"] = out["reward/accuracy"]
  return out
