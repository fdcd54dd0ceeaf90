"""Qwen2 language decoder of Qwen2.5-VL (GQA, qkv bias, SwiGLU, multimodal RoPE) + KV cache.

Parameter paths (relative to this module, which the full model holds as `model`):
`embed_tokens.embedding`, `layers.{i}.self_attn.{q,k,v,o}_proj`, `layers.{i}.mlp.{gate,up,down}_proj`,
`layers.{i}.{input,post_attention}_layernorm.scale`, `norm.scale` (see docs/ARCHITECTURE.md).

Attention is stated as the fast kernels take it (attention.py): causal over slots plus
segment ids, never an explicit [T, T] mask. Without a cache a token's segment is its
`segment_ids` entry (packed rows) or 1, and padding is segment 0, wherever it sits (left,
right or both); with a cache the keys' segments are the slots' validity and queries sit
at slots `index + arange(T)`. Without a cache the decoder scans over its layers (stacked
per call), so remat keeps only block inputs on every backend. Rotary positions are separate
from slots: position ids `[3, B, T]` (temporal, height,
width rows) come from `rope.get_rope_index` or, for text, from the running count of real
tokens, so a left-padded row has the same positions as the unpadded sequence.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.models.qwen2_5_vl import attention as attn_lib
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions, TextConfig
from deepintuit_jax.models.qwen2_5_vl.layers import (Embed, Linear, RMSNorm, maybe_remat,
                                                    remat_policy)

# Logical axes of each cache array (for sharding a cache with `sharding.logical_to_spec`).
CACHE_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
# Cached calls with at most this many new tokens (decode steps) use direct masked
# attention over the cache ([B, H, T, S] scores); longer ones (prefill) the blockwise kernel.
DECODE_MAX_TOKENS = 16


@flax.struct.dataclass
class AttentionInputs:
  """What every layer's attention needs besides q/k/v (see attention.py's contract).

  q_segments [B, T] / kv_segments [B, S] int32; q_positions [T] int32 slots of the queries
  (None = arange, no cache); valid [B, T] bool real tokens (for the cuDNN backend);
  impl: the resolved backend; block: blockwise block length; prefix_segments: see
  KVCache's shared prefix.
  """
  q_segments: jax.Array
  kv_segments: jax.Array
  q_positions: jax.Array | None
  valid: jax.Array
  impl: str = flax.struct.field(pytree_node=False, default="blockwise")
  block: int | None = flax.struct.field(pytree_node=False, default=None)  # None: by platform
  prefix_segments: jax.Array | None = None  # [Bp, P] int32, a shared prefix's validity


# ------------------------------------------------------------------------------- rotary
def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Multimodal rotary tables, as HF's Qwen2.5-VL text rotary embedding.

  Frequency j (of head_dim/2) takes its position from row `i % 3` of `position_ids`, where i
  is the mrope_section chunk holding j; the half table is then duplicated (rotate-half layout).

  Args:
    position_ids: [3, B, T] int (a [B, T] array is broadcast to the three rows).
  Returns:
    cos, sin: [B, T, head_dim] float32.
  """
  position_ids = jnp.asarray(position_ids)
  if position_ids.ndim == 2:
    position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  rows = np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])
  pos = jnp.moveaxis(position_ids, 0, -1)[..., rows].astype(jnp.float32)  # [B, T, hd/2]
  freqs = pos * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, hd] rotated by cos/sin [B, T, hd] (rotate-half), computed in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# ------------------------------------------------------------------------------- KV cache
@flax.struct.dataclass
class KVCache:
  """Per-layer keys/values plus the bookkeeping that makes padded batches decode exactly.

  k, v: tuples (one per layer) of [B, S, K, hd]; slot s of every row was written by the same
    call, so all rows share `index` (the next free slot).
  valid: [B, S] bool, slots holding real (non-padding) tokens.
  lengths: [B] int32, number of real tokens per row.
  next_position: [B] int32, rotary position of the row's next text token (max position + 1).
  `rope_deltas = next_position - lengths` (HF's definition).
  prefix_k, prefix_v, prefix_valid (optional, `share_prefix`): a read-only prefix shared by
    groups of B / Bp consecutive rows, e.g. a prompt's cache under its G sampled responses:
    per layer [Bp, P, K, hd], and [Bp, P] bool. Row b attends all valid slots of prefix row
    b // (B / Bp) (they precede every own slot), then its own slots causally; `lengths`
    and `next_position` count the prefix in. Own slots `k`, `v`, `valid`, `index` are the
    rest (S = the new tokens' room).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array
  lengths: jax.Array
  next_position: jax.Array
  prefix_k: tuple[jax.Array, ...] | None = None
  prefix_v: tuple[jax.Array, ...] | None = None
  prefix_valid: jax.Array | None = None

  @classmethod
  def create(cls, config: TextConfig, batch: int, max_len: int, dtype: Any = jnp.float32
             ) -> "KVCache":
    """An empty cache for `batch` rows and `max_len` slots (prompt + new tokens)."""
    if batch < 1 or max_len < 1:
      raise ValueError(f"KVCache.create: batch={batch} and max_len={max_len} must be >= 1")
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
               valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32),
               next_position=jnp.zeros((batch,), jnp.int32))

  @classmethod
  def share_prefix(cls, prefix: "KVCache", group: int, max_len: int) -> "KVCache":
    """A cache whose rows b*group .. b*group + group-1 continue row b of the filled `prefix`
    cache (read-only, stored once, not `group` times), each with `max_len` own empty slots.
    This is the G-sample rollout's cache: one prompt prefill, G responses."""
    if prefix.prefix_valid is not None:
      raise ValueError("KVCache.share_prefix: the prefix cache has a prefix itself")
    if group < 1 or max_len < 1:
      raise ValueError(f"KVCache.share_prefix: group={group} and max_len={max_len} must be >= 1")
    b = prefix.batch * group
    shape = (b, max_len) + prefix.k[0].shape[2:]
    dtype = prefix.k[0].dtype
    repeat = lambda x: jnp.repeat(x, group, axis=0)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in prefix.k),
               v=tuple(jnp.zeros(shape, dtype) for _ in prefix.v),
               valid=jnp.zeros((b, max_len), bool), index=jnp.zeros((), jnp.int32),
               lengths=repeat(prefix.lengths), next_position=repeat(prefix.next_position),
               prefix_k=prefix.k, prefix_v=prefix.v, prefix_valid=prefix.valid)

  @property
  def max_len(self) -> int:
    """Own slots (the prefix's excluded)."""
    return self.valid.shape[1]

  @property
  def batch(self) -> int:
    return self.valid.shape[0]

  @property
  def rope_deltas(self) -> jax.Array:
    """[B] int32: next_position - lengths."""
    return self.next_position - self.lengths


def _concrete_int(x) -> int | None:
  """int(x) when x is concrete, None under tracing (so checks run eagerly only)."""
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
    return None


def default_position_ids(attention_mask: jax.Array, cache: KVCache | None = None) -> jax.Array:
  """Text positions [3, B, T]: running count of real tokens (continuing the cache's rows).

  Padding tokens get position 0 (as HF's get_rope_index); they are never attended to.
  """
  mask = attention_mask.astype(jnp.int32)
  pos = jnp.cumsum(mask, axis=-1) - 1
  if cache is not None:
    pos = pos + cache.next_position[:, None]
  pos = jnp.where(mask > 0, pos, 0).astype(jnp.int32)
  return jnp.broadcast_to(pos[None], (3,) + pos.shape)


# ------------------------------------------------------------------------------- blocks
class Attention(nnx.Module):
  """Grouped-query self-attention with q/k/v bias and multimodal RoPE."""

  def __init__(self, config: TextConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    d, h, k, hd = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_dim)
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
    kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.q_proj = Linear(d, h * hd, use_bias=True, axes=("embed", "heads"), **kw)
    self.k_proj = Linear(d, k * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(d, k * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(h * hd, d, use_bias=False, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, att: AttentionInputs,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
               prefix: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x [B, T, D]; att: segments / slots; kv: cache ([B, S, K, hd] x2) written at `index`;
    prefix: a shared read-only prefix ([Bp, P, K, hd] x2, see KVCache).

    Returns (out [B, T, D], updated kv or None). Without a cache S == T.
    """
    q, k, v = self._qkv(x, cos, sin)
    if kv is not None:
      ck, cv = kv
      start = (0, index, 0, 0)
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
      kv = (ck, cv)
      k, v = ck.astype(q.dtype), cv.astype(q.dtype)
    out = _attend(q, k, v, att, cached=kv is not None, prefix=prefix)
    return self._out(out), kv

  def _qkv(self, x, cos, sin):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

  def _out(self, out):
    b, t = out.shape[:2]
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

  def prompt_and_responses(self, xp, xr, rope_p, rope_r, att_p: AttentionInputs,
                           att_r: AttentionInputs) -> tuple[jax.Array, jax.Array]:
    """Prompts xp [Bp, P, D] and their responses xr [Bp * n, L, D] (rows r*n .. r*n+n-1
    answer prompt r): the prompts attend as in `__call__` without a cache; each response
    attends its prompt's keys (computed once per prompt, read by its n responses) and its
    own, causally, in one softmax: the keys of prompt ++ response at slots [0, P + L),
    its queries at slots P + arange(L) (att_r.q_positions). rope_p / rope_r: (cos, sin).
    The responses run the blockwise kernel (or the reference on one tile) whatever the
    backend: cuDNN and splash take no queries at an offset."""
    qp, kp, vp = self._qkv(xp, *rope_p)
    qr, kr, vr = self._qkv(xr, *rope_r)
    out_p = _attend(qp, kp, vp, att_p, cached=False)
    n = xr.shape[0] // xp.shape[0]
    k = jnp.concatenate([jnp.repeat(kp, n, axis=0), kr], axis=1)
    v = jnp.concatenate([jnp.repeat(vp, n, axis=0), vr], axis=1)
    impl = "reference" if att_r.impl == "reference" else "blockwise"
    out_r = attn_lib.attention(qr, k, v, att_r.q_segments, att_r.kv_segments, causal=True,
                               impl=impl, q_positions=att_r.q_positions, block=att_r.block)
    return self._out(out_p), self._out(out_r)


def _attend(q, k, v, att: AttentionInputs, *, cached: bool, prefix=None) -> jax.Array:
  seg = dict(q_segments=att.q_segments, kv_segments=att.kv_segments)
  if prefix is not None:
    # Decode under a shared prefix: one softmax over [prefix keys, own keys], direct.
    pk, pv = (x.astype(q.dtype) for x in prefix)
    return attn_lib.decode_attention(q, k, v, **seg, q_positions=att.q_positions,
                                     prefix=(pk, pv, att.prefix_segments))
  if not cached:
    return attn_lib.attention(q, k, v, **seg, causal=True, impl=att.impl, valid=att.valid,
                              block=att.block)
  if att.impl == "reference":
    return attn_lib.reference_attention(q, k, v, **seg, causal=True,
                                        q_positions=att.q_positions)
  if q.shape[1] <= DECODE_MAX_TOKENS:
    return attn_lib.decode_attention(q, k, v, **seg, q_positions=att.q_positions)
  # Prefill: cuDNN / splash take neither cache slots past the queries nor left-padded keys
  # at an offset; the blockwise kernel takes both (and skips the empty future slots).
  return attn_lib.attention(q, k, v, **seg, causal=True, impl="blockwise",
                            q_positions=att.q_positions, block=att.block)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, config: TextConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TextConfig, opts: RuntimeOptions, *, rngs: nnx.Rngs):
    kw = dict(eps=config.rms_norm_eps, dtype=opts.dtype, param_dtype=opts.param_dtype)
    self.self_attn = Attention(config, opts, rngs=rngs)
    self.mlp = MLP(config, opts, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **kw)

  def __call__(self, x, cos, sin, att: AttentionInputs, kv=None, index=None, prefix=None):
    """x [B, T, D] -> ([B, T, D], kv); see Attention for the other arguments."""
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, att, kv, index, prefix)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv

  def prompt_and_responses(self, xs, rope_p, rope_r, att_p, att_r):
    """(prompts [Bp, P, D], responses [Bp * n, L, D]) -> the same; see
    Attention.prompt_and_responses."""
    xp, xr = xs
    hp, hr = self.self_attn.prompt_and_responses(
        self.input_layernorm(xp), self.input_layernorm(xr), rope_p, rope_r, att_p, att_r)
    xp, xr = xp + hp, xr + hr
    return (xp + self.mlp(self.post_attention_layernorm(xp)),
            xr + self.mlp(self.post_attention_layernorm(xr)))


def _gather_fsdp(state, mesh):
  """Each parameter of one layer constrained to its sharding minus the `fsdp` axis."""
  def one(v):
    spec = sharding_lib.logical_to_spec(sharding_lib.variable_axes(v), sharding_lib.GATHER_RULES, mesh,
                                        v.shape)
    return v.replace(jax.lax.with_sharding_constraint(v.get_value(), spec))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class TextModel(nnx.Module):
  """The Qwen2 decoder stack (HF `model.*` / `model.language_model.*`), without the LM head."""

  def __init__(self, config: TextConfig, opts: RuntimeOptions = RuntimeOptions(), *,
               rngs: nnx.Rngs):
    self.config, self.opts = config, opts
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=opts.dtype,
                              param_dtype=opts.param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, opts, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=opts.dtype,
                        param_dtype=opts.param_dtype)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None,
               output_hidden_states: bool = False, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, ...] | None, KVCache | None]:
    """Runs the decoder.

    Args:
      inputs_embeds: [B, T, D].
      attention_mask: [B, T] (1/True = real token); None = all real.
      position_ids: [3, B, T] or [B, T] int; None = `default_position_ids` (continuing
        the cache when given).
      cache: a KVCache with room for T more slots; the new keys/values go to slots
        [cache.index, cache.index + T). A cache with a shared prefix (`share_prefix`) takes
        few-token (decode) steps: its attention is direct ([B, H, T, P + S] scores).
      output_hidden_states: also return HF's hidden-state tuple (L + 1 arrays [B, T, D]:
        embeddings, outputs of layers 0..L-2, and the final-normed output of layer L-1).
      segment_ids: [B, T] int, packed rows (no cache): tokens attend earlier tokens of the
        same id (ids >= 1; 0 is padding); pass matching `position_ids` (restarting per
        sequence).
    Returns:
      (final-normed hidden [B, T, D], hidden states tuple or None, updated cache or None).
    """
    b, t, _ = inputs_embeds.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask shape {attention_mask.shape} != inputs ({b}, {t})")
    if cache is not None and cache.batch != b:
      raise ValueError(f"cache batch {cache.batch} != input batch {b}")
    if position_ids is None:
      position_ids = default_position_ids(attention_mask, cache)
    position_ids = jnp.asarray(position_ids, jnp.int32)
    if position_ids.ndim == 2:
      position_ids = jnp.broadcast_to(position_ids[None], (3, b, t))
    if position_ids.shape != (3, b, t):
      raise ValueError(f"position_ids shape {position_ids.shape} != (3, {b}, {t})")
    if segment_ids is not None and jnp.shape(segment_ids) != (b, t):
      raise ValueError(f"segment_ids shape {jnp.shape(segment_ids)} != inputs ({b}, {t})")
    cfg = self.config
    cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    x = inputs_embeds.astype(self.opts.dtype)
    if cache is None:
      if segment_ids is None:
        segments = attention_mask.astype(jnp.int32)
      else:
        segments = jnp.where(attention_mask, jnp.asarray(segment_ids, jnp.int32), 0)
      att = AttentionInputs(q_segments=segments, kv_segments=segments, q_positions=None,
                            valid=attention_mask, impl=self._impl(segment_ids is not None),
                            block=self.opts.attention_block)
      x, hidden = self._layers(x, lambda layer, x: layer(x, cos, sin, att)[0],
                               output_hidden_states)
      index = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids (packed rows) are not supported with a KV cache")
      start = _concrete_int(cache.index)
      if start is not None and start + t > cache.max_len:
        raise ValueError(f"KV cache overflow: {start} slots used + {t} new tokens > max_len "
                         f"{cache.max_len}; create the cache with a larger max_len")
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
      shared = cache.prefix_valid is not None
      att = AttentionInputs(q_segments=attention_mask.astype(jnp.int32),
                            kv_segments=key_valid.astype(jnp.int32),
                            q_positions=index + jnp.arange(t, dtype=jnp.int32),
                            valid=attention_mask, impl=self._impl(False),
                            block=self.opts.attention_block,
                            prefix_segments=(cache.prefix_valid.astype(jnp.int32) if shared
                                             else None))
      hidden = [] if output_hidden_states else None
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        if hidden is not None:
          hidden.append(x)
        x, kv = layer(x, cos, sin, att, (cache.k[i], cache.v[i]), index,
                      (cache.prefix_k[i], cache.prefix_v[i]) if shared else None)
        new_k.append(kv[0])
        new_v.append(kv[1])
    x = self.norm(x)
    if hidden is not None:
      hidden = tuple(hidden) + (x,)

    if cache is not None:
      n_new = attention_mask.sum(-1).astype(jnp.int32)
      # Positions of real tokens only: max over the 3 rope rows and the valid tokens.
      last = jnp.max(jnp.where(attention_mask[None], position_ids, -1), axis=(0, 2)) + 1
      cache = cache.replace(k=tuple(new_k), v=tuple(new_v), valid=key_valid,
                            index=cache.index + t, lengths=cache.lengths + n_new,
                            next_position=jnp.maximum(cache.next_position,
                                                      last.astype(jnp.int32)))
    return x, hidden, cache

  def _impl(self, packed: bool) -> str:
    return attn_lib.resolve_impl(self.opts.attention_impl, dtype=self.opts.dtype,
                                 head_dim=self.config.head_dim, causal_text=True, packed=packed)

  def prompt_and_responses(self, prompt_embeds: jax.Array, prompt_mask: jax.Array,
                           prompt_positions: jax.Array, response_embeds: jax.Array,
                           response_mask: jax.Array, response_positions: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """The decoder over prompts and their responses without repeating the prompts.

    prompt_embeds [Bp, P, D], prompt_mask [Bp, P], prompt_positions [3, Bp, P];
    response_embeds [Bp * n, L, D] (rows r*n .. r*n+n-1 answer prompt r, each starting at
    slot P whatever its prompt's length), response_mask [Bp * n, L], response_positions
    [3, Bp * n, L] (rotary positions continuing the prompt's). Response row i gets what the
    row prompt ++ response i gives under `__call__` (to float rounding), at n times less
    prompt work. Returns final-normed (prompt hidden [Bp, P, D], response hidden).
    """
    bp, p, _ = prompt_embeds.shape
    br, l, _ = response_embeds.shape
    if br % bp:
      raise ValueError(f"{br} response rows do not group over {bp} prompts")
    cfg, dt = self.config, self.opts.dtype
    rope_p = mrope_cos_sin(jnp.asarray(prompt_positions, jnp.int32), cfg.head_dim,
                           cfg.rope_theta, cfg.mrope_section)
    rope_r = mrope_cos_sin(jnp.asarray(response_positions, jnp.int32), cfg.head_dim,
                           cfg.rope_theta, cfg.mrope_section)
    seg_p = jnp.asarray(prompt_mask).astype(jnp.int32)
    seg_r = jnp.asarray(response_mask).astype(jnp.int32)
    impl, block = self._impl(False), self.opts.attention_block
    att_p = AttentionInputs(q_segments=seg_p, kv_segments=seg_p, q_positions=None,
                            valid=seg_p > 0, impl=impl, block=block)
    kv_seg = jnp.concatenate([jnp.repeat(seg_p, br // bp, axis=0), seg_r], axis=1)
    att_r = AttentionInputs(q_segments=seg_r, kv_segments=kv_seg,
                            q_positions=p + jnp.arange(l, dtype=jnp.int32), valid=seg_r > 0,
                            impl=impl, block=block)
    xs = (prompt_embeds.astype(dt), response_embeds.astype(dt))
    (xp, xr), _ = self._layers(
        xs, lambda layer, xs: layer.prompt_and_responses(xs, rope_p, rope_r, att_p, att_r),
        False)
    return self.norm(xp), self.norm(xr)

  def _layers(self, x, call, output_hidden_states: bool):
    """`x = call(layer, x)` through every layer: scanned (`_scan_layers`) with a mesh in
    context or on one device, else unrolled. Returns (x, layer inputs | None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty or jax.device_count() == 1:
      return self._scan_layers(x, call, output_hidden_states, mesh)
    return self._unrolled_layers(x, call, output_hidden_states)

  def _unrolled_layers(self, x, call, output_hidden_states: bool):
    """One call per layer, each under `maybe_remat` (remat effective on GPU / TPU only)."""
    call = maybe_remat(call, self.opts.remat)
    hidden = [] if output_hidden_states else None
    for layer in self.layers:
      if hidden is not None:
        hidden.append(x)
      x = call(layer, x)
    return x, hidden

  def _scan_layers(self, x, call, output_hidden_states: bool, mesh):
    """All layers as one `lax.scan` over their parameters stacked per call: the carry `x`
    (an array or a tuple of them) goes through `call(layer, x)`.

    The scan is what makes remat real on every backend: its backward loop recomputes one
    layer at a time from the saved layer inputs (unrolled, XLA:CPU merges recomputation and
    forward again). The stack holds the parameters in the compute dtype: every decoder
    parameter is cast to `opts.dtype` at use (Linear, RMSNorm), so this is exact and halves
    the copy (and the FSDP all-gathers) for bf16. Inside the loop each layer's parameters
    are constrained to their sharding without the `fsdp` axis (the FSDP all-gather, one
    layer at a time): without that hint XLA keeps the weights sharded and replicates the
    activations instead. Needs the mesh in context (`jax.set_mesh`) on several devices
    (TextModel falls back to `_unrolled_layers` otherwise). Returns (x, layer inputs | None).
    """
    graphdef, _ = nnx.split(self.layers[0])
    dt = self.opts.dtype
    cast = lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a
    stacked = jax.tree.map(lambda *xs: jnp.stack([cast(a) for a in xs]),
                           *[nnx.state(layer) for layer in self.layers])

    def body(x, state):
      if not mesh.empty:
        state = _gather_fsdp(state, mesh)
      return call(nnx.merge(graphdef, state), x), (x if output_hidden_states else None)

    if self.opts.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(self.opts.remat))
    x, inputs = jax.lax.scan(body, x, stacked)
    hidden = None if inputs is None else [inputs[i] for i in range(len(self.layers))]
    return x, hidden
