"""Small shared layers: Linear, Embed and RMSNorm with logical-axis metadata.

Parameter leaf names follow the HF mapping rule of `hf_io` (`kernel`, `bias`, `scale`,
`embedding`). Parameters are stored in `param_dtype`; compute happens in `dtype`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepintuit_jax.core import sharding as sharding_lib

# HF's `initializer_range` for Qwen2.5-VL; only matters for models built from scratch.
INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: Sequence[int], dtype: Any, std: float = INIT_STD) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel `[in, out]` (HF stores `[out, in]`).

  Args:
    axes: logical axis names of the kernel, e.g. ("embed", "mlp"); the bias gets axes[1].
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
               axes: tuple[str | None, str | None], dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), param_dtype),
                            logical_axes=tuple(axes))
    if use_bias:
      self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] -> [..., out] in `dtype`."""
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `embedding [V, D]`, also usable as a tied output layer."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.num_embeddings, self.features = num_embeddings, features
    self.dtype = dtype
    self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), param_dtype),
                               logical_axes=("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [...] int -> [..., D] in `dtype`. Out-of-range ids are clipped (as jnp.take)."""
    return jnp.take(self.embedding[...], ids, axis=0, mode="clip").astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x [..., D] -> logits [..., V] float32 (fp32 accumulation)."""
    w = sharding_lib.gathered(self.embedding[...], ("vocab", "embed"), self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), w,
                      preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, normalised in float32 as HF does.

  HF casts the normalised activations back to the input dtype before multiplying by the
  weight; we do the same (in `dtype`) so bf16 runs round like the reference.
  """

  def __init__(self, features: int, *, eps: float = 1e-6, axes: tuple[str | None] = ("embed",),
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init (ones); kept for a uniform constructor signature.
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=tuple(axes))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> [..., D] in `dtype`."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * y


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a RuntimeOptions.remat name ("full" = save nothing)."""
  return None if remat == "full" else getattr(jax.checkpoint_policies, remat)


def maybe_remat(fn, remat: str):
  """`fn` itself (remat "none") or `nnx.remat(fn)` with the named policy (see RuntimeOptions).

  Unrolled blocks only: XLA:CPU drops the optimization barriers that keep the recomputation
  apart from the forward, so there remat of unrolled blocks saves nothing (GPU/TPU keep
  them); the text decoder scans over its layers instead (text.py).
  """
  if remat == "none":
    return fn
  return nnx.remat(fn, policy=remat_policy(remat))
