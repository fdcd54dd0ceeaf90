"""GRPO rewards (RECIPE.md "Stage 1"): R = r_format + r_accuracy, each 0 or 1.

Two levels:
* per response, for notebooks: `format_reward(response)`, `accuracy_reward(response, label)`;
* batched rewards in a registry: a reward is `(responses: Sequence[str], examples:
  Sequence[Mapping]) -> np.ndarray float32 [B]`, registered by name with `@register(name)`;
  `combine({name: weight}, responses, examples)` gives the weighted total and each
  component. `format` and `accuracy` (which reads `example["label"]`) are registered.

The parsing rules live in `data/prompts.py` (`is_well_formatted` is r_format,
`answer_matches` is r_accuracy) so SFT traces and GRPO rewards agree. Responses must be
decoded with special tokens kept (the tags may be special tokens) and cut at the row's
length (a trailing run of pad tokens after the end token makes r_format 0).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np

from deepintuit_jax.algorithms.grpo.registry import Registry
from deepintuit_jax.data import prompts

Reward = Callable[[Sequence[str], Sequence[Mapping]], np.ndarray]
REWARDS: Registry[Reward] = Registry("reward")
register = REWARDS.register
get = REWARDS.get
names = REWARDS.names


def format_reward(response: str) -> float:
  """r_format: 1.0 when the whole response is `<think>A</think>` then `<answer>B</answer>`
  (whitespace around the blocks, one optional end token at the end), A and B free of tags
  and special tokens; else 0.0."""
  _check_response(response, 0)
  return 1.0 if prompts.is_well_formatted(response) else 0.0


def accuracy_reward(response: str, label: str) -> float:
  """r_accuracy: 1.0 when the first `<answer>` block, stripped and lower-cased, equals
  `label` lower-cased (surrounding whitespace of the label ignored); else 0.0."""
  _check_response(response, 0)
  if not isinstance(label, str):
    raise TypeError(f"accuracy_reward: label must be a string, got {type(label).__name__}")
  return 1.0 if prompts.answer_matches(response, label) else 0.0


def _check_response(response, i: int) -> None:
  if not isinstance(response, str):
    raise TypeError(f"reward: response {i} must be a string (decoded text), got "
                    f"{type(response).__name__}")


def _label(example, i: int) -> str:
  try:
    label = example["label"]
  except (KeyError, TypeError, IndexError):
    keys = list(example.keys()) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"accuracy reward: example {i} has no 'label' (got {keys})") from None
  if not isinstance(label, str):
    raise TypeError(f"accuracy reward: example {i} label must be a string, got "
                    f"{type(label).__name__}")
  return label


@register("format")
def format_rewards(responses: Sequence[str], examples: Sequence[Mapping]) -> np.ndarray:
  """[B] float32 r_format of each response (examples unused)."""
  del examples
  for i, r in enumerate(responses):
    _check_response(r, i)
  return np.asarray([prompts.is_well_formatted(r) for r in responses], np.float32)


@register("accuracy")
def accuracy_rewards(responses: Sequence[str], examples: Sequence[Mapping]) -> np.ndarray:
  """[B] float32 r_accuracy of each response against `examples[i]["label"]`."""
  out = np.zeros(len(responses), np.float32)
  for i, (r, ex) in enumerate(zip(responses, examples, strict=True)):
    _check_response(r, i)
    out[i] = float(prompts.answer_matches(r, _label(ex, i)))
  return out


def combine(names_weights: Mapping[str, float], responses: Sequence[str],
            examples: Sequence[Mapping]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Weighted sum of registered rewards.

  Args:
    names_weights: reward name -> weight (e.g. the config's `{"format": 1.0, "accuracy":
      1.0}`, RECIPE's R); every name must be registered.
    responses: B decoded responses; examples: the B matching examples (row i of a GRPO
      batch is repeated for its G responses by the caller).
  Returns:
    (total [B] float32 = sum_k w_k r_k, {name: r_k [B] float32, unweighted}).
  """
  if not names_weights:
    raise ValueError("rewards.combine: no rewards given")
  if len(responses) != len(examples):
    raise ValueError(f"rewards.combine: {len(responses)} responses but {len(examples)} examples")
  b = len(responses)
  total = np.zeros(b, np.float32)
  parts = {}
  for name, weight in names_weights.items():
    fn = get(name)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
      raise ValueError(f"rewards.combine: weight of {name!r} must be a finite number, got {weight!r}")
    r = np.asarray(fn(responses, examples), np.float32)
    if r.shape != (b,):
      raise ValueError(f"reward {name!r} returned shape {r.shape}, expected ({b},)")
    if not np.all(np.isfinite(r)):
      bad = int(np.flatnonzero(~np.isfinite(r))[0])
      raise ValueError(f"reward {name!r} is not finite for response {bad}: {r[bad]}")
    parts[name] = r
    total += np.float32(weight) * r
  return total, parts
