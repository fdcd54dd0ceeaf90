"""The decoder with the attention backends: packing, cached prefill, scan-over-layers, remat.

Oracles are independent of the code under test: separate forward passes of each packed
sequence, the explicit-mask ("reference") backend, the unrolled layer loop, and compiled
memory sizes compared between settings.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.core import sharding
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions, TextConfig
from deepintuit_jax.models.qwen2_5_vl.text import KVCache, TextModel

CFG = TextConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, mrope_section=(1, 1, 2))


def _model(opts=RuntimeOptions(), cfg=CFG) -> TextModel:
  m = TextModel(cfg, opts, rngs=nnx.Rngs(0))
  for path, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    if path[-1] in ("scale", "bias"):  # non-trivial, so that a wrong mask cannot hide
      p.set_value(1.0 * (path[-1] == "scale") + 0.3 * jax.random.normal(
          jax.random.key(len(path)), p.shape))
  return m


def _one_device_mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _embeds(b, t, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, CFG.hidden_size))


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_packed_rows_equal_separate_sequences(impl):
  m = _model(RuntimeOptions(attention_impl=impl, attention_block=8))
  x = _embeds(1, 20)
  lengths = (7, 9)  # then 4 padding tokens
  seg = np.zeros((1, 20), np.int32)
  seg[0, :7], seg[0, 7:16] = 1, 2
  pos = np.zeros((1, 20), np.int32)
  pos[0, :7], pos[0, 7:16] = np.arange(7), np.arange(9)
  h, _, _ = m(x, jnp.asarray(seg > 0), jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  start = 0
  for n in lengths:
    want, _, _ = _model()(x[:, start:start + n])
    np.testing.assert_allclose(np.asarray(h[:, start:start + n]), np.asarray(want),
                               rtol=2e-5, atol=2e-5)
    start += n


def test_blockwise_model_and_cached_prefill_equal_reference():
  """Multi-tile blockwise (block 4) in the full forward and in a cached prefill + decode,
  on right-padded, left-padded and holey rows, equals the explicit-mask model."""
  x = _embeds(3, 13, seed=1)
  mask = np.ones((3, 13), bool)
  mask[0, 9:] = False
  mask[1, :5] = False
  mask[2, 4:6] = False
  ref = _model(RuntimeOptions(attention_impl="reference"))
  blk = _model(RuntimeOptions(attention_impl="blockwise", attention_block=4))
  want, _, _ = ref(x, jnp.asarray(mask))
  got, _, _ = blk(x, jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=2e-5, atol=2e-5)
  for model in (ref, blk):
    cache = KVCache.create(CFG, 3, 16)
    h1, _, cache = model(x[:, :11], jnp.asarray(mask[:, :11]), cache=cache)  # prefill
    h2, _, cache = model(x[:, 11:12], jnp.asarray(mask[:, 11:12]), cache=cache)  # decode
    h = np.concatenate([np.asarray(h1), np.asarray(h2)], axis=1)
    np.testing.assert_allclose(h[mask[:, :12]], np.asarray(want)[:, :12][mask[:, :12]],
                               rtol=2e-5, atol=2e-5)


def test_scan_over_layers_equals_unrolled_loop():
  """With the mesh in context the decoder scans over stacked layers; without it (several
  devices) it unrolls: outputs, hidden states and gradients agree."""
  m = _model(RuntimeOptions(remat="full"))
  x = _embeds(2, 9, seed=2)
  gd, st = nnx.split(m)

  def run(st, x):
    h, hidden, _ = nnx.merge(gd, st)(x, output_hidden_states=True)
    return jnp.sum(h ** 2), hidden

  (l0, hid0), g0 = jax.value_and_grad(run, has_aux=True)(st, x)  # 8 devices: unrolled
  with jax.set_mesh(_one_device_mesh()):
    (l1, hid1), g1 = jax.jit(jax.value_and_grad(run, has_aux=True))(st, x)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  assert len(hid1) == len(hid0) == CFG.num_hidden_layers + 1
  for a, b in zip(hid1, hid0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_remat_full_keeps_only_layer_inputs():
  """Compiled temporaries of a 4-layer backward: remat full well below none (XLA:CPU
  included, thanks to the scan; unrolled, both were equal)."""
  cfg = TextConfig(vocab_size=61, hidden_size=64, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3))
  b, t = 1, 1024
  x = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.float32)

  def temp(remat):
    m = nnx.eval_shape(lambda: TextModel(cfg, RuntimeOptions(remat=remat), rngs=nnx.Rngs(0)))
    gd, st = nnx.split(m)
    loss = lambda st, x: jnp.sum(nnx.merge(gd, st)(x)[0])
    with jax.set_mesh(_one_device_mesh()):
      c = jax.jit(jax.grad(loss)).lower(st, x).compile()
    return c.memory_analysis().temp_size_in_bytes
  none, full = temp("none"), temp("full")
  mlp = b * t * cfg.intermediate_size * 4  # one [T, F] fp32 activation
  assert full < none / 2, (full, none)
  assert none > 4 * 2 * mlp  # none keeps (at least) two [T, F] per layer
