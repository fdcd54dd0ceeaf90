"""AdamW with warmup + linear decay, global-norm clipping, and parameters frozen by path.

Frozen parameters are split off the model before the optimizer sees it (`partition`), so
they carry no optimizer state and get no gradient buffers at all: with the vision tower
frozen, the moments of ~670M parameters are never allocated.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """learning_rate: peak lr; warmup_ratio: fraction of total steps of linear warmup from 0,
  then linear decay to 0 (the recipe's schedule); grad_clip: max global norm (0 = off);
  weight decay applies to matrices only (ndim >= 2), never to biases and norm scales;
  frozen: regexes matched (re.search) against '.'-joined parameter paths such as
  'visual.blocks.0.attn.qkv.kernel'; warmup_steps >= 0 overrides warmup_ratio; decay:
  "linear" (to 0 at the last step, the SFT recipe) or "constant" (verl's GRPO actor);
  offload_optimizer: keep the optimizer state (AdamW's two fp32 moments, 8 bytes per
  trainable parameter) in host memory between steps (engine/state.py state_shardings)."""
  learning_rate: float = 2e-5
  warmup_ratio: float = 0.06
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  frozen: tuple[str, ...] = ()
  warmup_steps: int = -1
  decay: str = "linear"
  offload_optimizer: bool = False

  def __post_init__(self):
    if self.decay not in ("linear", "constant"):
      raise ValueError(f"decay must be linear or constant, got {self.decay!r}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if not 0.0 <= self.warmup_ratio < 1.0:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.grad_clip < 0:
      raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
    for p in self.frozen:
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"frozen pattern {p!r} is not a valid regex: {e}") from None


def path_str(path: Sequence) -> str:
  """('visual', 'blocks', 0, 'attn', 'qkv', 'kernel') -> 'visual.blocks.0.attn.qkv.kernel'."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def frozen_filter(patterns: Sequence[str]):
  """An nnx filter `(path, value) -> bool` selecting Params whose path matches a pattern."""
  compiled = [re.compile(p) for p in patterns]

  def is_frozen(path, value) -> bool:
    s = path_str(path)
    return isinstance(value, nnx.Param) and any(c.search(s) for c in compiled)
  return is_frozen


def partition(model: nnx.Module, patterns: Sequence[str]
              ) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """model -> (graphdef, trainable params, frozen params, other state).

  Raises if a pattern matches no parameter (a misspelt pattern would silently train
  everything) or if everything is frozen."""
  frozen = frozen_filter(patterns)
  trainable = nnx.All(nnx.Param, nnx.Not(frozen))
  graphdef, train, fro, rest = nnx.split(model, trainable, frozen, ...)
  names = [path_str(p) for p, _ in nnx.to_flat_state(fro)]
  for p in patterns:
    if not any(re.search(p, n) for n in names):
      raise ValueError(f"frozen pattern {p!r} matches no parameter path "
                       "(paths look like 'visual.blocks.0.attn.qkv.kernel')")
  if not jax.tree.leaves(train):
    raise ValueError(f"frozen patterns {list(patterns)} freeze every parameter")
  return graphdef, train, fro, rest


def count_params(state: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(state))


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """0 -> peak over ceil(warmup_ratio * total) (or warmup_steps) steps, then linear to 0 at
  `total_steps` (HF's get_linear_schedule_with_warmup, which the release's SFT uses) or
  constant (decay="constant")."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warmup = (cfg.warmup_steps if cfg.warmup_steps >= 0
            else int(-(-cfg.warmup_ratio * total_steps // 1)))
  decay = max(total_steps - warmup, 1)
  after = (optax.constant_schedule(cfg.learning_rate) if cfg.decay == "constant"
           else optax.linear_schedule(cfg.learning_rate, 0.0, decay))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after],
                              [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip (global norm over the trainable leaves) -> AdamW with the schedule."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
