"""Attention kernels that never build `[T, T]` scores, behind one contract.

Contract (every backend): query i of row b attends key j iff

    q_segments[b, i] == kv_segments[b, j]  and  (not causal or kv_positions[j] <= q_positions[i])

with softmax scale 1/sqrt(head_dim). Shapes: q [B, T, H, hd]; k, v [B, S, K, hd] with
H % K == 0 (grouped-query attention, no repetition of k/v); segments int32 [B, T] / [B, S];
positions int32 [T] / [S] (shared by the rows: slots, not rotary positions) defaulting to
arange. Padding is a segment of its own (the text model gives padding id 0, real tokens
their sequence id; the vision tower -1 for empty entries), so padding rows attend padding
keys and stay finite; their outputs are unspecified and never read.

Backends (`resolve_impl` maps `RuntimeOptions.attention_impl` and the platform to one):
* "reference": today's path, `jax.nn.dot_product_attention(implementation="xla")` with an
  explicit `[B, 1, T, S]` mask. Exact oracle for tests and small shapes (vision windows).
* "blockwise": flash-attention-style online softmax in pure jnp: scans over query and
  key/value blocks with a custom VJP (forward keeps out + log-sum-exp; backward recomputes
  each block), so forward and backward hold O(T * block) memory. Causal blocks entirely in
  the future are skipped (`lax.cond`). Runs anywhere; the CPU default.
* "cudnn": cuDNN flash attention via `jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True, query_seq_lengths=, key_value_seq_lengths=)`. cuDNN only knows right
  padding, so each row is shifted left by its first real token (a gather, O(T)) and shifted
  back: left-padded prompts and [left pad | prompt | completion | right pad] rows work. It
  needs one contiguous run of real tokens per row: other masks give NaN outputs (loud: the
  trainer's NaN check stops), and explicit segment ids (packing) fall back to blockwise.
* "pallas": TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with
  segment ids, under `jax.shard_map` over the mesh in context (XLA cannot partition a
  Mosaic kernel); `interpret=True` runs it on CPU for tests.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deepintuit_jax.core import sharding as sharding_lib

IMPLS = ("auto", "reference", "xla", "blockwise", "cudnn", "pallas")
# Segment ids of the padding that blockwise / splash add to reach a block multiple: query
# padding never matches a key, so those rows are empty (output 0).
_PAD_Q = np.iinfo(np.int32).min
_PAD_KV = np.iinfo(np.int32).min + 1
SPLASH_MIN_BLOCK = 128  # splash pads rows to a multiple of this
# Blockwise block length when none is given: on XLA:CPU small tiles are much cheaper (more
# causal tiles skipped, tiles that stay in cache: the tiny model's GRPO update step at 416
# tokens, forward + backward, 0.39 s at 512 -> 0.28 s at 64, its forward 0.125 -> 0.073 s);
# on GPU / TPU (where blockwise is a fallback) big tiles keep the matmuls efficient.
DEFAULT_BLOCK = 512
CPU_BLOCK = 64


def default_block(platform: str | None = None) -> int:
  """The blockwise block length for `platform` (default: the mesh in context's, see
  `sharding.mesh_platform`): CPU_BLOCK on CPU, DEFAULT_BLOCK elsewhere."""
  platform = platform or sharding_lib.mesh_platform()
  return CPU_BLOCK if platform == "cpu" else DEFAULT_BLOCK


def check_impl(impl: str | None) -> str:
  """`impl` or "auto" (None / ""); raises on unknown names."""
  impl = impl or "auto"
  if impl not in IMPLS:
    raise ValueError(f"attention_impl {impl!r} not one of {IMPLS} (or None / '' = auto)")
  return impl


def resolve_impl(impl: str | None, *, dtype: Any, head_dim: int, causal_text: bool,
                 packed: bool = False, platform: str | None = None) -> str:
  """The backend to run: "auto" -> cudnn on GPU (bf16/fp16, head_dim % 8 == 0 and <= 128,
  causal text without packing), pallas on TPU, blockwise elsewhere; "xla" = "reference";
  an explicit "cudnn" where cuDNN cannot take the case (packing, vision segments) ->
  blockwise. The platform is that of the mesh in context (a TPU program compiled on a CPU
  host gets TPU kernels), else the default backend's."""
  impl = check_impl(impl)
  if impl == "xla":
    return "reference"
  cudnn_ok = (causal_text and not packed and head_dim % 8 == 0 and head_dim <= 128
              and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
  if impl == "cudnn":
    return "cudnn" if causal_text and not packed else "blockwise"
  if impl != "auto":
    return impl
  platform = platform or sharding_lib.mesh_platform()
  if platform == "gpu" and cudnn_ok:
    return "cudnn"
  if platform == "tpu":
    return "pallas"
  return "blockwise"


def attention(q, k, v, q_segments, kv_segments, *, causal: bool, impl: str,
              q_positions=None, kv_positions=None, block: int | None = None, valid=None,
              interpret: bool = False) -> jax.Array:
  """Dispatches to a backend (a resolved name, see `resolve_impl`) -> [B, T, H, hd].

  block: the blockwise block length; None = `default_block()` (by platform).
  valid: [B, T] bool real tokens, needed by "cudnn" (self-attention without a cache only).
  "blockwise" on a problem that fits one [block, block] tile, and "pallas" on rows shorter
  than splash's smallest block (the vision windows), run the reference instead (the same
  memory, no padded work).
  """
  block = block or default_block()
  if impl == "blockwise" and q.shape[1] <= block and k.shape[1] <= block:
    impl = "reference"
  if impl == "pallas" and q.shape[1] < SPLASH_MIN_BLOCK:
    # The vision tower's 64-token windows: splash would pad each to its smallest block, 128
    # (4x the score and value work); the explicit mask on [S, 64, 64] does the exact work.
    impl = "reference"
  if impl == "reference":
    return reference_attention(q, k, v, q_segments, kv_segments, causal=causal,
                               q_positions=q_positions, kv_positions=kv_positions)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, q_segments, kv_segments, causal=causal,
                               q_positions=q_positions, kv_positions=kv_positions, block=block)
  if impl == "cudnn":
    if valid is None or q_positions is not None or kv_positions is not None:
      raise ValueError("cudnn attention takes self-attention without a cache (pass valid=)")
    return cudnn_attention(q, k, v, valid)
  if impl == "pallas":
    if q_positions is not None or kv_positions is not None or q.shape[1] != k.shape[1]:
      raise ValueError("pallas attention takes self-attention without a cache")
    return splash_attention(q, k, v, q_segments, kv_segments, causal=causal,
                            interpret=interpret)
  raise ValueError(f"unresolved attention backend {impl!r} (see resolve_impl)")


def _positions(p, n):
  return jnp.arange(n, dtype=jnp.int32) if p is None else jnp.asarray(p, jnp.int32)


def allowed(q_segments, kv_segments, *, causal: bool, q_positions=None, kv_positions=None):
  """[B, T, S] bool: the contract's mask (for the reference and the decode path)."""
  qp = _positions(q_positions, q_segments.shape[1])
  kp = _positions(kv_positions, kv_segments.shape[1])
  m = q_segments[:, :, None] == kv_segments[:, None, :]
  if causal:
    m = m & (kp[None, :] <= qp[:, None])[None]
  return m


def reference_attention(q, k, v, q_segments, kv_segments, *, causal: bool,
                        q_positions=None, kv_positions=None) -> jax.Array:
  """The explicit-mask path ([B, 1, T, S] bool); O(T * S) memory."""
  mask = allowed(q_segments, kv_segments, causal=causal, q_positions=q_positions,
                 kv_positions=kv_positions)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


# ----------------------------------------------------------------------------- blockwise
def _pad_to(x, n, axis, value=0):
  pad = n - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_segments, kv_segments, *, causal: bool,
                        q_positions=None, kv_positions=None, block: int = 512) -> jax.Array:
  """Online-softmax attention over [block, block] tiles (see the module docstring)."""
  b, t, h, hd = q.shape
  s, kh = k.shape[1], k.shape[2]
  if h % kh:
    raise ValueError(f"query heads {h} not a multiple of key/value heads {kh}")
  bq, bk = min(block, t), min(block, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  qp = _pad_to(_positions(q_positions, t), tp, 0)
  kp = _pad_to(_positions(kv_positions, s), sp, 0)
  qs = _pad_to(jnp.asarray(q_segments, jnp.int32), tp, 1, _PAD_Q)
  ks = _pad_to(jnp.asarray(kv_segments, jnp.int32), sp, 1, _PAD_KV)
  # [B, T, H, hd] -> [nq, B, bq, K, G, hd]; k, v -> [nk, B, bk, K, hd].
  qb = _pad_to(q, tp, 1).reshape(b, tp // bq, bq, kh, h // kh, hd).swapaxes(0, 1)
  kb = _pad_to(k, sp, 1).reshape(b, sp // bk, bk, kh, hd).swapaxes(0, 1)
  vb = _pad_to(v, sp, 1).reshape(b, sp // bk, bk, kh, hd).swapaxes(0, 1)
  out = _flash((bool(causal), 1.0 / float(np.sqrt(hd))), qb, kb, vb,
               qs.reshape(b, -1, bq).swapaxes(0, 1), ks.reshape(b, -1, bk).swapaxes(0, 1),
               qp.reshape(-1, bq), kp.reshape(-1, bk))
  return out.swapaxes(0, 1).reshape(b, tp, h, hd)[:, :t]


def _scores(static, qi, kj, qsi, ksj, qpi, kpj):
  """Masked fp32 scores of one tile: [B, K, G, bq, bk] and the mask."""
  causal, scale = static
  sc = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  mask = qsi[:, :, None] == ksj[:, None, :]  # [B, bq, bk]
  if causal:
    mask = mask & (kpj[None, :] <= qpi[:, None])[None]
  mask = mask[:, None, None]
  return jnp.where(mask, sc, -jnp.inf), mask


def _skip(static, qpi, kpj):
  """A tile wholly in the future of its queries (causal only): nothing to compute."""
  return jnp.asarray(static[0]) & (jnp.min(kpj) > jnp.max(qpi))


def _tie(qi, qsi, qpi):
  """Makes the tile masks depend on the queries. Otherwise, inside a scan over layers under
  autodiff, JAX finds the masks loop-invariant (they depend on segment ids only) and hoists
  them out of the loop, stacked for every tile: an [nq, nk, bq, bk] array, the [T, T]
  this kernel exists to avoid."""
  return jax.lax.optimization_barrier((qi, qsi, qpi))


def _forward(static, qb, kb, vb, qs, ks, qp, kp):
  """-> out [nq, B, bq, K, G, hd] (q dtype), lse [nq, B, K, G, bq] fp32 (+inf on empty rows)."""

  def q_block(xs):
    qi, qsi, qpi = _tie(*xs)
    shape = qi.shape[:1] + qi.shape[2:4] + qi.shape[1:2]  # [B, K, G, bq]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + qi.shape[-1:], jnp.float32))

    def kv_block(carry, ys):
      kj, vj, ksj, kpj = ys

      def compute(carry):
        m, l, acc = carry
        sc, _ = _scores(static, qi, kj, qsi, ksj, qpi, kpj)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(sc - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vj.dtype), vj,
                        preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

      return jax.lax.cond(_skip(static, qpi, kpj), lambda c: c, compute, carry), None

    (m, l, acc), _ = jax.lax.scan(kv_block, init, (kb, vb, ks, kp))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    # [B, K, G, bq, hd] -> [B, bq, K, G, hd]
    return jnp.moveaxis(out, 3, 1).astype(qi.dtype), lse

  return jax.lax.map(q_block, (qb, qs, qp))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, qb, kb, vb, qs, ks, qp, kp):
  return _forward(static, qb, kb, vb, qs, ks, qp, kp)[0]


def _flash_fwd(static, qb, kb, vb, qs, ks, qp, kp):
  out, lse = _forward(static, qb, kb, vb, qs, ks, qp, kp)
  return out, (qb, kb, vb, qs, ks, qp, kp, out, lse)


def _flash_bwd(static, res, dout):
  qb, kb, vb, qs, ks, qp, kp, out, lse = res
  scale = static[1]
  # D_i = rowsum(dO * O): [nq, B, K, G, bq]
  delta = jnp.moveaxis(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), 2, -1)

  def kv_block(dq, ys):
    kj, vj, ksj, kpj = ys

    def q_block(carry, xs):
      qi, doi, qsi, qpi, lsei, di = xs
      qi, qsi, qpi = _tie(qi, qsi, qpi)

      def compute(carry):
        dk, dv = carry
        sc, _ = _scores(static, qi, kj, qsi, ksj, qpi, kpj)
        p = jnp.exp(sc - lsei[..., None])  # masked or empty rows -> 0
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - di[..., None]) * scale
        dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qi.dtype), qi,
                             preferred_element_type=jnp.float32)
        dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(kj.dtype), kj,
                         preferred_element_type=jnp.float32)
        return (dk, dv), dqi

      def skip(carry):
        return carry, jnp.zeros(qi.shape, jnp.float32)

      return jax.lax.cond(_skip(static, qpi, kpj), skip, compute, carry)

    zeros = jnp.zeros(kj.shape, jnp.float32)
    (dk, dv), dq_parts = jax.lax.scan(q_block, (zeros, zeros),
                                      (qb, dout, qs, qp, lse, delta))
    return dq + dq_parts, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, ks, kp))
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
          None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cuDNN
def cudnn_attention(q, k, v, valid, *, implementation: str = "cudnn") -> jax.Array:
  """Causal self-attention over one contiguous run of real tokens per row (see module doc).

  q [B, T, H, hd]; k, v [B, T, K, hd]; valid [B, T] bool. `implementation="xla"` runs the
  same shifting on any platform (tests). Rows whose real tokens are not contiguous -> NaN.
  """
  b, t = valid.shape
  valid = jnp.asarray(valid, bool)
  n = jnp.sum(valid, axis=1).astype(jnp.int32)
  start = jnp.where(n > 0, jnp.argmax(valid, axis=1), 0).astype(jnp.int32)
  last = (t - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)
  contiguous = (n == 0) | (last - start + 1 == n)
  idx = jnp.minimum(start[:, None] + jnp.arange(t)[None], t - 1)  # row-left shift
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  lengths = jnp.maximum(n, 1)  # an all-padding row attends its first token: finite
  out = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=True,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  back = jnp.clip(jnp.arange(t)[None] - start[:, None], 0, t - 1)
  out = jnp.take_along_axis(out, back[:, :, None, None], axis=1)
  out = jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)
  return jnp.where(contiguous[:, None, None, None], out, jnp.nan)


# ----------------------------------------------------------------------------- Pallas TPU
# Not cached here: the kernel holds its mask tables as arrays of the trace that builds it (a
# cached one would leak them into the next trace); splash caches the NumPy mask processing.
def _splash_kernel(t: int, heads: int, causal: bool, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = sm.CausalMask((t, t)) if causal else sm.FullMask((t, t))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mqa(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, q_segments, kv_segments, *, causal: bool, block: int = 512,
                     interpret: bool = False) -> jax.Array:
  """TPU splash attention. A Mosaic kernel cannot be partitioned by XLA, so with a mesh in
  context (`jax.set_mesh`) it runs under `jax.shard_map`: rows split over the data-parallel
  axes that an enclosing group vmap has not taken (`sharding.row_axes`), heads over
  "tensor" (see `_head_specs` for grouped-query heads), each device on its own block.
  Without a mesh (one device) the kernel is called directly."""
  mesh = sharding_lib.context_mesh()
  local = functools.partial(_splash_local, causal=causal, block=block, interpret=interpret)
  if mesh is None or int(np.prod(list(mesh.shape.values()))) == 1:
    return local(q, k, v, q_segments, kv_segments)
  rows = sharding_lib.row_axes(mesh, q.shape[0])
  rows = rows if len(rows) > 1 else (rows[0] if rows else None)
  q_heads, kv_heads, select = _head_specs(mesh, q.shape[2], k.shape[2])
  qspec, kvspec, segspec = P(rows, None, q_heads, None), P(rows, None, kv_heads, None), P(rows)

  def body(q, k, v, qs, ks):
    if select:  # each device's query heads meet the key/value heads they read
      groups = q.shape[2] * mesh.shape["tensor"] // k.shape[2]  # H / K (global)
      first = jax.lax.axis_index("tensor") * q.shape[2]
      idx = (first + jnp.arange(q.shape[2])) // groups
      k, v = jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=2)
    return local(q, k, v, qs, ks)

  return jax.shard_map(body, mesh=mesh, in_specs=(qspec, kvspec, kvspec, segspec, segspec),
                       out_specs=qspec, check_vma=False)(q, k, v, q_segments, kv_segments)


def _head_specs(mesh, h: int, kh: int) -> tuple[str | None, str | None, bool]:
  """(query-head axis, key/value-head axis, select): heads over "tensor" when it divides the
  key/value heads (each device keeps whole groups); when it divides only the query heads
  (e.g. 16 heads, 2 kv heads, tensor 4), the key/value heads are replicated and each
  device selects those of its query heads (select=True); otherwise heads are replicated."""
  tp = mesh.shape.get("tensor", 1)
  if tp == 1:
    return None, None, False
  if kh % tp == 0:
    return "tensor", "tensor", False
  if h % tp == 0:
    return "tensor", None, True
  return None, None, False


def _splash_local(q, k, v, q_segments, kv_segments, *, causal: bool, block: int,
                  interpret: bool) -> jax.Array:
  """The kernel on one device's arrays: an MQA kernel per key/value head, vmapped over rows
  and key/value heads. T is padded to a multiple of 128 with one extra segment (padding
  attends padding)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, t, h, hd = q.shape
  kh = k.shape[2]
  tp = -(-t // 128) * 128
  blk = min(block, tp) if tp % min(block, tp) == 0 else 128
  kernel = _splash_kernel(tp, h // kh, bool(causal), blk, bool(interpret))
  # Splash does not scale: q / sqrt(hd) first. [B, T, H, hd] -> [B, K, G, T, hd].
  qh = (_pad_to(q, tp, 1) * (1.0 / np.sqrt(hd))).astype(q.dtype)
  qh = qh.reshape(b, tp, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)
  kh_ = _pad_to(k, tp, 1).transpose(0, 2, 1, 3)  # [B, K, T, hd]
  vh = _pad_to(v, tp, 1).transpose(0, 2, 1, 3)
  pad = np.iinfo(np.int32).min
  qs = _pad_to(jnp.asarray(q_segments, jnp.int32), tp, 1, pad)
  ks = _pad_to(jnp.asarray(kv_segments, jnp.int32), tp, 1, pad)

  def one_row(qr, kr, vr, qsr, ksr):
    per_head = lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=sk.SegmentIds(q=qsr, kv=ksr))
    return jax.vmap(per_head)(qr, kr, vr)

  out = jax.vmap(one_row)(qh, kh_, vh, qs, ks)  # [B, K, G, T, hd]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, hd)[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------- decode
def decode_attention(q, k, v, q_segments, kv_segments, *, q_positions, kv_positions=None,
                     prefix=None) -> jax.Array:
  """A few query tokens against a KV cache: direct masked attention, [B, H, T, S] scores
  for small T (one token per decode step), no [S, S] anything. Same contract.

  prefix: optional (k, v [Bp, P, K, hd], segments [Bp, P] int32), keys shared by groups of
  n = B / Bp consecutive rows (a prompt's cache under its n sampled responses). Row b also
  attends prefix row b // n where its segments match (slots all before the own keys, so
  no causal test), in one softmax over [prefix keys, own keys]; the prefix is read once
  per group, never copied n times.
  """
  b, t, h, hd = q.shape
  kh = k.shape[2]
  mask = allowed(q_segments, kv_segments, causal=True, q_positions=q_positions,
                 kv_positions=kv_positions)  # [B, T, S]
  qg = q.reshape(b, t, kh, h // kh, hd)
  sc = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  sc = jnp.where(mask[:, None, None], sc / np.sqrt(hd), -jnp.inf)
  if prefix is not None:
    pk, pv, pseg = prefix
    bp, p = pk.shape[0], pk.shape[1]
    if b % bp:
      raise ValueError(f"decode_attention: {b} query rows do not group over {bp} prefix rows")
    n = b // bp
    qp = qg.reshape(bp, n, t, kh, h // kh, hd)
    psc = jnp.einsum("bnqkgd,bpkd->bnkgqp", qp, pk, preferred_element_type=jnp.float32)
    pmask = (q_segments.reshape(bp, n, t)[..., None]
             == jnp.asarray(pseg, jnp.int32)[:, None, None, :])  # [Bp, n, T, P]
    psc = jnp.where(pmask[:, :, None, None], psc / np.sqrt(hd), -jnp.inf)
    sc = jnp.concatenate([psc.reshape(b, kh, h // kh, t, p), sc], axis=-1)
  m = jnp.max(sc, axis=-1, keepdims=True)
  p_all = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
  p_all = p_all / jnp.maximum(jnp.sum(p_all, axis=-1, keepdims=True), 1e-30)
  own = p_all if prefix is None else p_all[..., p:]
  out = jnp.einsum("bkgqs,bskd->bqkgd", own.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  if prefix is not None:
    pp = p_all[..., :p].reshape(bp, n, kh, h // kh, t, p).astype(pv.dtype)
    out = out + jnp.einsum("bnkgqp,bpkd->bnqkgd", pp, pv,
                           preferred_element_type=jnp.float32).reshape(out.shape)
  return out.reshape(b, t, h, hd).astype(q.dtype)
