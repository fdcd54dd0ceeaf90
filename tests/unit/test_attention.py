"""Attention backends against a NumPy transcription of the contract (attention.py), fp32.

Golden values: `numpy_attention` below (float64 softmax over the allowed keys), written
from the contract, independent of the kernels. Gradients are checked against
`jax.nn.dot_product_attention` with an explicit mask (XLA's own implementation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepintuit_jax.models.qwen2_5_vl import attention as A


def numpy_attention(q, k, v, qs, ks, causal, qp=None, kp=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, hd = q.shape
  s, kh = k.shape[1], k.shape[2]
  qp = np.arange(t) if qp is None else np.asarray(qp)
  kp = np.arange(s) if kp is None else np.asarray(kp)
  out = np.zeros((b, t, h, hd))
  for bi in range(b):
    for hi in range(h):
      kv = hi // (h // kh)  # query head hi reads key/value head hi // group
      sc = q[bi, :, hi] @ k[bi, :, kv].T / np.sqrt(hd)
      ok = np.asarray(qs)[bi][:, None] == np.asarray(ks)[bi][None, :]
      if causal:
        ok &= kp[None, :] <= qp[:, None]
      sc = np.where(ok, sc, -np.inf)
      for i in range(t):
        if ok[i].any():
          w = np.exp(sc[i] - sc[i].max())
          out[bi, i, hi] = (w / w.sum()) @ v[bi, :, kv]
  return out


def _qkv(b, t, s, h, kh, hd, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return f(b, t, h, hd), f(b, s, kh, hd), f(b, s, kh, hd)


def _segments(kind: str, b: int, t: int) -> np.ndarray:
  """[B, T] int32: 0 = padding, >0 = sequence id (text convention)."""
  seg = np.ones((b, t), np.int32)
  if kind in ("right", "mixed"):
    seg[1, t - 9:] = 0
  if kind in ("left", "mixed"):
    seg[-1, :7] = 0
  if kind == "packed":
    seg[0, 10:25], seg[0, 25:] = 2, 0
    seg[1, 3:], seg[1, t - 4:] = 3, 0
  return seg


def _check(out, want, seg):
  real = seg != 0  # padding rows' outputs are unspecified (finite)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out)[real], want[real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["right", "left", "mixed", "packed"])
@pytest.mark.parametrize("t,block,h,kh", [(37, 8, 4, 2), (19, 64, 6, 1)])
def test_blockwise_and_reference_match_numpy(kind, t, block, h, kh):
  q, k, v = _qkv(3, t, t, h, kh, 8)
  seg = _segments(kind, 3, t)
  want = numpy_attention(q, k, v, seg, seg, True)
  _check(A.blockwise_attention(q, k, v, seg, seg, causal=True, block=block), want, seg)
  _check(A.reference_attention(q, k, v, seg, seg, causal=True), want, seg)


def test_blockwise_non_causal_vision_segments():
  """Vision blocks: non-causal, -1 = empty entries that attend each other."""
  q, k, v = _qkv(2, 29, 29, 2, 2, 4, seed=3)
  seg = np.array([[0] * 5 + [1] * 11 + [2] * 9 + [-1] * 4, [3] * 20 + [-1] * 9], np.int32)
  want = numpy_attention(q, k, v, seg, seg, False)
  out = A.blockwise_attention(q, k, v, seg, seg, causal=False, block=8)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


def test_blockwise_gradients_equal_xla_attention():
  t = 27
  q, k, v = _qkv(2, t, t, 4, 2, 8, seed=1)
  seg = _segments("packed", 2, t)
  real = jnp.asarray(seg != 0)[:, :, None, None]
  mask = jnp.asarray((seg[:, :, None] == seg[:, None, :]) & np.tri(t, dtype=bool)[None])
  cot = jax.random.normal(jax.random.key(0), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0) * cot)
  want = jax.jit(jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask[:, None], implementation="xla")), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(jax.grad(loss(lambda q, k, v: A.blockwise_attention(
      q, k, v, seg, seg, causal=True, block=8)), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_cache_slots_blockwise_and_decode():
  """Queries at slots 10..14 of a 23-slot cache whose rows are left-padded / have holes."""
  q, k, v = _qkv(2, 5, 23, 4, 2, 8, seed=2)
  kv_seg = np.ones((2, 23), np.int32)
  kv_seg[0, :4] = 0     # left padding of the prompt
  kv_seg[1, 6:8] = 0    # right-padded prompt followed by new tokens
  kv_seg[:, 15:] = 0    # empty future slots
  q_seg = np.ones((2, 5), np.int32)
  qp = np.arange(10, 15)
  want = numpy_attention(q, k, v, q_seg, kv_seg, True, qp)
  out = A.blockwise_attention(q, k, v, q_seg, kv_seg, causal=True, q_positions=qp, block=4)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
  one = A.decode_attention(q[:, 2:3], k, v, q_seg[:, :1], kv_seg, q_positions=qp[2:3])
  np.testing.assert_allclose(np.asarray(one), want[:, 2:3], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["right", "left", "mixed"])
def test_cudnn_shift_with_xla_kernel(kind):
  """The cuDNN backend's left shift to right padding, run through XLA's seq-length path."""
  t = 21
  q, k, v = _qkv(3, t, t, 4, 2, 8, seed=4)
  seg = _segments(kind, 3, t)
  seg[1, :2] = 0 if kind == "mixed" else seg[1, :2]  # both-sided padding in one row
  out = A.cudnn_attention(q, k, v, jnp.asarray(seg != 0), implementation="xla")
  _check(out, numpy_attention(q, k, v, seg, seg, True), seg)


def test_cudnn_shift_flags_holes_and_keeps_empty_rows_finite():
  t = 12
  q, k, v = _qkv(3, t, t, 2, 2, 8, seed=5)
  valid = np.ones((3, t), bool)
  valid[0, 4:6] = False   # a hole: not expressible with sequence lengths
  valid[1] = False        # an all-padding row
  out = np.asarray(A.cudnn_attention(q, k, v, jnp.asarray(valid), implementation="xla"))
  assert np.isnan(out[0]).all()
  assert np.isfinite(out[1:]).all()
  _check(out[2:], numpy_attention(q, k, v, valid, valid, True)[2:], valid[2:])


def test_splash_attention_in_interpret_mode():
  """The Pallas TPU kernel, interpreted on CPU: GQA, packed + padded rows, T % 128 != 0."""
  t = 150
  q, k, v = _qkv(1, t, t, 4, 2, 64, seed=6)
  seg = np.ones((1, t), np.int32)
  seg[0, 60:140], seg[0, 140:] = 2, 0
  out = A.splash_attention(q, k, v, seg, seg, causal=True, interpret=True)
  _check(out, numpy_attention(q, k, v, seg, seg, True), seg)
  real = jnp.asarray(seg != 0)[:, :, None, None]
  g = jax.grad(lambda q: jnp.sum(jnp.where(real, A.splash_attention(
      q, k, v, seg, seg, causal=True, interpret=True), 0)))(q)
  want = jax.grad(lambda q: jnp.sum(jnp.where(real, A.reference_attention(
      q, k, v, seg, seg, causal=True), 0)))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-4)


def _mesh(shape):
  from deepintuit_jax.core import sharding
  return sharding.make_mesh(shape)


@pytest.mark.parametrize("mesh_shape,h,kh,grouped", [
    ((2, 2, 2), 4, 2, False),  # rows over data x fsdp, kv heads over tensor
    ((1, 2, 4), 8, 2, False),  # tensor 4 divides the 8 query heads only: kv heads selected
    ((2, 4, 1), 4, 2, True),   # inside a group vmap that takes data x fsdp (spmd_axis_name)
])
def test_splash_under_shard_map_on_a_mesh(mesh_shape, h, kh, grouped):
  """Splash on 8 devices (interpret mode) under shard_map, inputs sharded as the model's
  are (rows over the data axes, heads over tensor), inside jit: forward against the NumPy
  contract, the gradient against XLA's attention. Without shard_map XLA would have to
  partition the kernel (on TPU: "Mosaic kernels cannot be automatically partitioned")."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from deepintuit_jax.core import sharding
  mesh = _mesh(mesh_shape)
  b, t = (8, 130) if grouped else (4, 130)
  q, k, v = _qkv(b, t, t, h, kh, 32, seed=7)
  seg = np.ones((b, t), np.int32)
  seg[0, 60:120], seg[0, 120:] = 2, 0
  seg[-1, :9] = 0
  real = jnp.asarray(seg != 0)[:, :, None, None]

  def run(fn, q, k, v, seg):
    if not grouped:
      return fn(q, k, v, seg)
    g = lambda *xs: xs[0].reshape((b // 2, 2) + xs[0].shape[1:])  # 4 groups of 2 rows
    out = sharding.vmap_groups(fn, 0, b // 2)(g(q), g(k), g(v), g(seg))
    return out.reshape((b,) + out.shape[2:])

  splash = lambda q, k, v, s: A.splash_attention(q, k, v, s, s, causal=True, interpret=True)
  ref = lambda q, k, v, s: A.reference_attention(q, k, v, s, s, causal=True)
  loss = lambda f: lambda q, k, v, s: jnp.sum(jnp.where(real, run(f, q, k, v, s), 0) ** 2)
  rows = P(("data", "fsdp"), None, "tensor", None)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(q, rows), put(k, rows if kh % mesh_shape[2] == 0 else P(("data", "fsdp"))),
          put(v, P(("data", "fsdp"))), put(jnp.asarray(seg), P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: run(splash, *a))(*args)
    grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(*args)
  _check(out, numpy_attention(q, k, v, seg, seg, True), seg)
  for got, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_pallas_leaves_vision_windows_to_the_exact_path():
  """64-token windows (the vision tower's) would be padded to splash's 128 block: 4x the
  work. They run the explicit-mask path (no Pallas call in the program) and still equal
  the contract; 128-token segments (full-attention vision layers, text) keep splash."""
  q, k, v = _qkv(3, 64, 64, 4, 4, 32, seed=8)
  seg = np.ones((3, 64), np.int32)
  seg[2, 40:] = -1  # a window's empty entries
  run = lambda q: A.attention(q, k, v, seg, seg, causal=False, impl="pallas", interpret=True)
  assert "pallas_call" not in str(jax.make_jaxpr(run)(q))
  _check(run(q), numpy_attention(q, k, v, seg, seg, False), seg)
  q2, k2, v2 = _qkv(1, 128, 128, 2, 2, 32, seed=9)
  s2 = np.ones((1, 128), np.int32)
  assert "pallas_call" in str(jax.make_jaxpr(lambda q: A.attention(
      q, k2, v2, s2, s2, causal=False, impl="pallas", interpret=True))(q2))


def test_resolve_impl_follows_the_mesh_platform():
  """"auto" asks the mesh in context, not the host: on this CPU host a CPU mesh gives
  blockwise; a TPU platform (as a topology mesh compiled ahead of time has) gives pallas."""
  from deepintuit_jax.core import sharding
  assert sharding.mesh_platform() == "cpu"
  with jax.set_mesh(_mesh((1, -1, 1))):
    assert sharding.mesh_platform() == "cpu"
    assert A.resolve_impl(None, dtype=jnp.bfloat16, head_dim=128, causal_text=True) == "blockwise"

  class FakeTPUMesh:
    platform = "tpu"
  assert sharding.mesh_platform(FakeTPUMesh()) == "tpu"


def test_resolve_impl():
  r = lambda impl, **kw: A.resolve_impl(impl, **{**dict(dtype=jnp.bfloat16, head_dim=128,
                                                        causal_text=True), **kw})
  assert r(None, platform="gpu") == "cudnn" and r("", platform="tpu") == "pallas"
  assert r("auto", platform="cpu") == "blockwise"
  assert r(None, platform="gpu", dtype=jnp.float32) == "blockwise"  # cuDNN: half precision
  assert r(None, platform="gpu", packed=True) == "blockwise"
  assert r(None, platform="gpu", causal_text=False) == "blockwise"  # vision segments
  assert r("cudnn", packed=True) == "blockwise" and r("xla") == "reference"
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    A.check_impl("flash")


def test_blockwise_backward_never_holds_t_by_t():
  """Compiled memory of value_and_grad: blockwise stays far below one [T, T] fp32 score
  matrix per head; the explicit-mask reference does not (so the bound can fail)."""
  b, t, h, hd = 1, 2048, 2, 16
  spec = jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp(fn):
    f = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s, s, causal=True)),
                         argnums=(0, 1, 2)))
    return f.lower(spec, spec, spec, seg).compile().memory_analysis().temp_size_in_bytes
  scores = h * t * t * 4
  assert temp(lambda *a, **kw: A.blockwise_attention(*a, **kw, block=256)) < scores / 4
  assert temp(A.reference_attention) > scores
