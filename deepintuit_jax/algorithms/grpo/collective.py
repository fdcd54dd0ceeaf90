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


def reward_stats(rows: dict[str, np.ndarray], group_size: int) -> dict[str, float]:
  """Reward metrics of the (gathered) per-response arrays `total` [N] and `reward/<name>` [N]
  (N whole groups of `group_size`, in prompt order): their means, the total's std,
  `groups_all_equal` (the share of groups whose rewards are all equal, which carry no signal:
  zero advantage under every estimator), and for the release's rewards the names the eval
  reports use (`format_rate`, `accuracy`)."""
  total = rows["total"]
  by_group = total.reshape(-1, group_size)
  out = dict(reward_mean=float(total.mean()), reward_std=float(total.std()),
             groups_all_equal=float(np.mean(by_group.max(1) == by_group.min(1))))
  out.update({k: float(np.mean(v)) for k, v in rows.items() if k.startswith("reward/")})
  out.update({alias: out[k] for alias, k in (("format_rate", "reward/format"),
                                             ("accuracy", "reward/accuracy")) if k in out})
  return out


def rollout_stats(rows: dict[str, np.ndarray], group_size: int) -> dict[str, float]:
  """`reward_stats` plus the rollout's lengths [N], truncated [N] bool and advantages [N]."""
  lengths, adv = rows["lengths"].astype(np.float64), rows["advantages"]
  return dict(reward_stats(rows, group_size),
              response_length_mean=float(lengths.mean()),
              response_length_max=float(lengths.max()),
              response_truncated=float(np.mean(rows["truncated"])),
              advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
              advantage_min=float(adv.min()), advantage_max=float(adv.max()),
              rollout_tokens=float(lengths.sum()))


def logprob_mismatch(rollout_logp: np.ndarray, learner_logp: np.ndarray, lengths: np.ndarray,
                     allgather: Allgather = process_allgather) -> dict[str, float]:
  """How far the sampler's per-token probabilities of the responses are from the learner's
  for the same tokens and parameters (verl's rollout-vs-actor check): `rollout_probs_diff_mean`
  / `_max` (|p_rollout - p_learner| over every response token of every process) and
  `rollout_actor_probs_pearson_corr`. Both sides score the tempered distribution, so only
  float noise (bf16 logits) may separate them; a larger gap means off-policy rollouts.
  rollout_logp / learner_logp [R, L]; lengths [R] (tokens past a row's length are ignored)."""
  mask = np.arange(rollout_logp.shape[1])[None, :] < np.asarray(lengths)[:, None]
  p = np.exp(np.asarray(rollout_logp, np.float64)[mask])
  q = np.exp(np.asarray(learner_logp, np.float64)[mask])
  d = np.abs(p - q)
  sums = np.asarray([p.size, d.sum(), p.sum(), q.sum(), (p * p).sum(), (q * q).sum(),
                     (p * q).sum()], np.float64)
  got = allgather(sums).reshape(-1, sums.size).sum(0)
  top = float(allgather(np.asarray([d.max() if d.size else 0.0])).max())
  n, dsum, sp, sq, spp, sqq, spq = got
  if n == 0:
    return dict(rollout_probs_diff_mean=0.0, rollout_probs_diff_max=0.0,
                rollout_actor_probs_pearson_corr=1.0)
  cov = spq / n - (sp / n) * (sq / n)
  var = (spp / n - (sp / n) ** 2) * (sqq / n - (sq / n) ** 2)
  return dict(rollout_probs_diff_mean=float(dsum / n), rollout_probs_diff_max=top,
              rollout_actor_probs_pearson_corr=float(cov / np.sqrt(var)) if var > 0 else 1.0)
