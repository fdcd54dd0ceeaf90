"""KV cache: prefill + one-token / multi-token steps reproduce the full forward exactly, also
under a prompt prefix shared by G rows (`KVCache.share_prefix`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.models.qwen2_5_vl.config import TextConfig
from deepintuit_jax.models.qwen2_5_vl.text import KVCache, TextModel, default_position_ids

CFG = TextConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=(1, 1, 2))


@pytest.fixture(scope="module")
def model() -> TextModel:
  m = TextModel(CFG, rngs=nnx.Rngs(0))
  # Non-trivial norms so that a wrong mask or position cannot hide behind unit weights.
  for path, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    if path[-1] == "scale":
      p.set_value(1.0 + 0.3 * jax.random.normal(jax.random.key(len(path)), p.shape))
    elif path[-1] == "bias":
      p.set_value(0.3 * jax.random.normal(jax.random.key(7), p.shape))
  return m


def _batch(pad: str, p: int = 7, n: int = 5, b: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, CFG.vocab_size, (b, p + n))
  mask = np.ones((b, p + n), bool)
  if pad == "left":
    mask[1, :3] = False
    mask[2, :1] = False
  elif pad == "right":
    mask[1, p - 2:p] = False
    mask[2, p - 4:p] = False
  return ids, mask


def _full(model, ids, mask):
  h, _, _ = model(model.embed_tokens(jnp.asarray(ids)), jnp.asarray(mask))
  return np.asarray(h)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _step(graphdef, state, ids, mask, cache):
  model = nnx.merge(graphdef, state)
  h, _, cache = model(model.embed_tokens(ids), mask, cache=cache)
  return h, cache


@pytest.mark.parametrize("pad", ["none", "left", "right"])
@pytest.mark.parametrize("chunks", [(7, 1, 1, 1, 1, 1), (7, 2, 3), (4, 3, 1, 4)])
def test_cached_steps_equal_full_forward(model, pad, chunks):
  ids, mask = _batch(pad)
  expected = _full(model, ids, mask)
  graphdef, state = nnx.split(model)
  cache = KVCache.create(CFG, ids.shape[0], ids.shape[1] + 3)
  outs, start = [], 0
  for c in chunks:
    h, cache = _step(graphdef, state, jnp.asarray(ids[:, start:start + c]),
                     jnp.asarray(mask[:, start:start + c]), cache)
    outs.append(np.asarray(h))
    start += c
  got = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(got[mask], expected[mask], rtol=2e-5, atol=2e-5)
  assert int(cache.index) == ids.shape[1]
  np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(-1))
  np.testing.assert_array_equal(np.asarray(cache.rope_deltas), 0)


@nnx.jit
def _fwd(model, ids, mask, pos, cache):
  return model(model.embed_tokens(ids), mask, pos, cache=cache)


def test_explicit_mrope_positions_set_rope_deltas(model):
  """Prefill with explicit 3-row positions (as for video); steps continue at max + 1."""
  ids, mask = _batch("left", p=6, n=3)
  pos = np.asarray(default_position_ids(jnp.asarray(mask)))
  # A fake "vision span": tokens 2..4 of each row share temporal position, positions jump.
  pos = pos.copy()
  pos[:, :, 4:] += 5
  pos[0, :, 2:5] = pos[0, :, 2:3]
  pos = np.where(mask[None], pos, 0)
  full_h, _, _ = _fwd(model, ids, mask, pos, None)
  cache = KVCache.create(CFG, 3, 9)
  h0, _, cache = _fwd(model, ids[:, :6], mask[:, :6], pos[:, :, :6], cache)
  expected_next = pos[:, :, :6].max(axis=(0, 2)) + 1
  np.testing.assert_array_equal(np.asarray(cache.next_position), expected_next)
  np.testing.assert_array_equal(np.asarray(cache.rope_deltas), expected_next - mask[:, :6].sum(-1))
  hs = [np.asarray(h0)]
  for i in range(6, 9):  # automatic positions from the cache
    h, _, cache = _fwd(model, ids[:, i:i + 1], mask[:, i:i + 1], None, cache)
    hs.append(np.asarray(h))
  np.testing.assert_allclose(np.concatenate(hs, 1)[mask], np.asarray(full_h)[mask],
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_shared_prefix_steps_equal_full_forward(model, pad):
  """Two prompts prefilled once; G = 3 rows each continue their prompt with their own
  tokens (steps of 1, 2 and 1 tokens) under the shared prefix: every row's hidden states
  equal the full forward of prompt ++ its own tokens (no cache)."""
  g, p, n = 3, 7, 4
  ids, mask = _batch(pad, p=p, n=0, b=3)
  ids, mask = ids[1:], mask[1:]  # rows 1 and 2 carry the padding
  own = np.random.default_rng(1).integers(0, CFG.vocab_size, (2 * g, n))
  graphdef, state = nnx.split(model)
  _, prompt = _step(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                    KVCache.create(CFG, 2, p))
  cache = KVCache.share_prefix(prompt, g, n + 1)
  assert cache.batch == 2 * g and cache.max_len == n + 1
  assert cache.prefix_k[0].shape == (2, p, CFG.num_key_value_heads, CFG.head_dim)
  outs, start = [], 0
  for c in (1, 2, 1):
    h, cache = _step(graphdef, state, jnp.asarray(own[:, start:start + c]),
                     jnp.ones((2 * g, c), bool), cache)
    outs.append(np.asarray(h))
    start += c
  full_ids = np.concatenate([np.repeat(ids, g, 0), own], 1)
  full_mask = np.concatenate([np.repeat(mask, g, 0), np.ones((2 * g, n), bool)], 1)
  expected = _full(model, full_ids, full_mask)[:, p:]
  np.testing.assert_allclose(np.concatenate(outs, 1), expected, rtol=2e-5, atol=2e-5)
  assert int(cache.index) == n
  np.testing.assert_array_equal(np.asarray(cache.lengths), full_mask.sum(-1))
  # Rows of one prompt decoding different tokens do differ (no row reads another's slots).
  assert np.abs(expected[0] - expected[1]).max() > 1e-3


def test_shared_prefix_stores_the_prompt_once():
  """The prompt part is stored once per prompt: B*P + B*G*N slots, not B*G*(P + N)."""
  b, g, p, n = 2, 4, 10, 3
  prompt = KVCache.create(CFG, b, p)
  cache = KVCache.share_prefix(prompt, g, n)
  slots = lambda arrays: sum(a.shape[0] * a.shape[1] for a in arrays)
  assert slots(cache.prefix_k) == CFG.num_hidden_layers * b * p
  assert slots(cache.k) == CFG.num_hidden_layers * b * g * n
  assert cache.prefix_k[0] is prompt.k[0]  # shared, not copied
  with pytest.raises(ValueError, match="prefix"):
    KVCache.share_prefix(cache, 2, n)
  with pytest.raises(ValueError, match="group"):
    KVCache.share_prefix(prompt, 0, n)


def test_cache_overflow_and_batch_mismatch_raise(model):
  cache = KVCache.create(CFG, 2, 4)
  emb = model.embed_tokens(jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="overflow"):
    model(emb, cache=cache)
  with pytest.raises(ValueError, match="batch"):
    model(emb[:1, :2], cache=cache)
  with pytest.raises(ValueError, match="max_len"):
    KVCache.create(CFG, 2, 0)


def test_cache_layout_and_dtype():
  cache = KVCache.create(CFG, 2, 10, jnp.bfloat16)
  assert len(cache.k) == len(cache.v) == CFG.num_hidden_layers
  assert cache.k[0].shape == (2, 10, CFG.num_key_value_heads, CFG.head_dim)
  assert cache.k[0].dtype == jnp.bfloat16
  assert cache.max_len == 10 and cache.batch == 2
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 2 * CFG.num_hidden_layers + 4  # a pytree, jit/donation friendly
