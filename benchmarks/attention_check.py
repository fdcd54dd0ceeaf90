"""cuDNN flash attention against the blockwise kernel, numerics and time (a gpu_check check).

Both run causal self-attention with grouped-query heads on the same bf16 q, k, v, where row
1 is left-padded (the sampler's layout; cuDNN shifts rows, models/qwen2_5_vl/attention.py),
and are compared with an fp32 oracle (the explicit-mask reference on the upcast inputs,
"highest" matmuls): the output and the gradients dq, dk, dv of sum(out * c) for a random c,
at real tokens only. On CPU `cudnn_attention(implementation="xla")` runs the same shifting
code around XLA's attention, so the check cannot rot before a GPU is lent.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.parity_check import rel_err


def compare(b: int, t: int, h: int, kh: int, hd: int, pad: int, block: int,
            repeats: int = 3) -> dict:
  """q [b, t, h, hd], k / v [b, t, kh, hd]; row 1's first `pad` tokens are padding.
  Returns `{impl}_{out,dq,dk,dv}` relative L2 errors against the oracle (impl: cudnn,
  blockwise) and `{impl}_ms`: best forward + backward milliseconds of `repeats` calls."""
  import jax
  import jax.numpy as jnp
  from deepintuit_jax.models.qwen2_5_vl import attention as attn
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  k0, k1, k2, k3 = jax.random.split(jax.random.key(0), 4)
  qkv = (jax.random.normal(k0, (b, t, h, hd), jnp.bfloat16),
         jax.random.normal(k1, (b, t, kh, hd), jnp.bfloat16),
         jax.random.normal(k2, (b, t, kh, hd), jnp.bfloat16))
  valid = jnp.ones((b, t), bool).at[1 % b, :pad].set(False)
  seg = valid.astype(jnp.int32)  # padding is a segment of its own (the kernels' contract)
  c = jnp.where(valid[..., None, None], jax.random.normal(k3, (b, t, h, hd)), 0.0)
  kernels = {
      "oracle": lambda q, k, v: attn.reference_attention(q, k, v, seg, seg, causal=True),
      "cudnn": lambda q, k, v: attn.cudnn_attention(q, k, v, valid, implementation=impl),
      "blockwise": lambda q, k, v: attn.blockwise_attention(q, k, v, seg, seg, causal=True,
                                                            block=block),
  }

  def grad_fn(kernel):
    def loss(q, k, v):
      out = kernel(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * c), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

  with jax.default_matmul_precision("highest"):
    (dq, dk, dv), out = grad_fn(kernels["oracle"])(*(x.astype(jnp.float32) for x in qkv))
  want = dict(out=out, dq=dq, dk=dk, dv=dv)
  rows = np.asarray(valid)
  res = {}
  for name in ("cudnn", "blockwise"):
    fn = grad_fn(kernels[name])
    (dq, dk, dv), out = jax.block_until_ready(fn(*qkv))
    for key, x in dict(out=out, dq=dq, dk=dk, dv=dv).items():
      res[f"{name}_{key}"] = rel_err(np.asarray(x, np.float32)[rows], np.asarray(want[key])[rows])
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*qkv))
      best = min(best, time.perf_counter() - t0)
    res[f"{name}_ms"] = 1e3 * best
  return res
