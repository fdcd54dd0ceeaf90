"""Outcome-reward advantage estimators (one scalar reward per response), as verl defines them.

`compute(name, rewards [N*G], group_size=G) -> [N*G] float32`: rows g*G .. g*G+G-1 are the
G responses to prompt g (the sampler's `num_samples` layout). Every estimator is a pure
jnp function, jit-able with `name` and `group_size` static; the learner broadcasts the
result over each response's tokens (RECIPE: "on every token").

Estimators (`register(name)` adds one: `fn(rewards [N, G] float32, **kw) -> [N, G]`):
* `grpo` (RECIPE): A = (R - mean_g) / (std_g + eps), std unbiased (ddof=1), eps=1e-6.
  A group whose rewards are all equal gets A = 0.
* `dr_grpo` (Dr. GRPO, verl's `norm_adv_by_std_in_grpo=False`): A = R - mean_g.
* `rloo`: A_i = R_i - mean of the other G-1 rewards = G/(G-1) * (R_i - mean_g).
* `reinforce_plus_plus_baseline`: R - mean_g, then whitened over the whole batch
  ((x - mean) * rsqrt(var + 1e-8), var unbiased), each response weighted by its token
  count when `lengths` [N*G] is given (verl whitens over tokens), else equally.

Groups of one (G = 1) follow verl: there is no group statistic, so the group mean is taken
as 0 and the std as 1, i.e. `grpo` gives R / (1 + eps), `dr_grpo` and `rloo` give R itself,
and `reinforce_plus_plus_baseline` whitens R. Such a batch is plain REINFORCE without a
baseline; use G >= 2 for GRPO proper.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from deepintuit_jax.algorithms.grpo.registry import Registry

Estimator = Callable[..., jax.Array]
ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")
register = ESTIMATORS.register
get = ESTIMATORS.get
names = ESTIMATORS.names


def compute(name: str, rewards, group_size: int, **kwargs) -> jax.Array:
  """Advantages of `rewards` [N*G] (float) with estimator `name`; returns [N*G] float32.

  Extra keyword arguments go to the estimator (`epsilon` for grpo, `lengths` for
  reinforce_plus_plus_baseline).
  """
  fn = get(name)
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"advantages.compute: group_size must be a positive int, got {group_size!r}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f"advantages.compute: rewards must be 1-D [N*G], got shape {rewards.shape}")
  if rewards.shape[0] % group_size:
    raise ValueError(f"advantages.compute: {rewards.shape[0]} rewards is not a multiple of "
                     f"group_size={group_size}")
  if "lengths" in kwargs and kwargs["lengths"] is not None:
    lengths = jnp.asarray(kwargs["lengths"], jnp.float32)
    if lengths.shape != rewards.shape:
      raise ValueError(f"advantages.compute: lengths shape {lengths.shape} != rewards shape "
                       f"{rewards.shape}")
    kwargs["lengths"] = lengths.reshape(-1, group_size)
  out = fn(rewards.reshape(-1, group_size), **kwargs)
  return out.reshape(-1).astype(jnp.float32)


def _group_mean(r: jax.Array) -> jax.Array:
  """[N, G] -> [N, 1] group mean; 0 for groups of one (verl)."""
  return jnp.mean(r, axis=1, keepdims=True) if r.shape[1] > 1 else jnp.zeros_like(r[:, :1])


@register("grpo")
def grpo(r: jax.Array, *, epsilon: float = 1e-6) -> jax.Array:
  g = r.shape[1]
  std = jnp.std(r, axis=1, keepdims=True, ddof=1) if g > 1 else jnp.ones_like(r[:, :1])
  return (r - _group_mean(r)) / (std + epsilon)


@register("dr_grpo")
def dr_grpo(r: jax.Array) -> jax.Array:
  return r - _group_mean(r)


@register("rloo")
def rloo(r: jax.Array) -> jax.Array:
  g = r.shape[1]
  if g == 1:
    return r
  return (r - _group_mean(r)) * (g / (g - 1))


@register("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(r: jax.Array, *, lengths: jax.Array | None = None,
                                 eps: float = 1e-8) -> jax.Array:
  x = r - _group_mean(r)
  w = jnp.ones_like(x) if lengths is None else lengths
  n = jnp.sum(w)
  mean = jnp.sum(w * x) / n
  var = jnp.sum(w * (x - mean) ** 2) / n * (n / (n - 1))
  return (x - mean) * jax.lax.rsqrt(var + eps)
