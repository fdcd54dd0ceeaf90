"""Data-parallel vision (grouped batches), multi-host batch assembly on one process, chunked
cross-entropy, and one compile per (length bucket, patch bucket)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepintuit_jax.algorithms import sft
from deepintuit_jax.core import sharding
from deepintuit_jax.core.sharding import make_mesh
from deepintuit_jax.data import batching, pipeline
from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.engine import optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

# Two vision blocks (one windowed, one full attention: window layouts are per group), one
# decoder layer: the compile-bound tests here only need the layouts and the math.
CFG = tiny.micro_config(vision_depth=2)
CFG = CFG.replace(text=dataclasses.replace(CFG.text, num_hidden_layers=1))
OPTS = PipelineOptions(length_buckets=(32, 48, 64), max_seq_len=64,
                       patch_buckets=(32, 64, 128), max_frame_patches=64)
PATCH_DIM = CFG.vision.patch_dim


def _example(rng, i, h, w, t=1):
  """One example with a t x h x w patch grid (t temporal patches), its video pad tokens,
  random text around them and the second half of the text as targets."""
  n_tokens = t * h * w // 4
  pre = rng.integers(1, 40, 3 + i % 3)
  post = rng.integers(1, 40, 6 + (i * 5) % 7)
  ids = np.concatenate([pre, [47], np.full(n_tokens, 46), [48], post]).astype(np.int32)
  loss = np.zeros(len(ids), np.int32)
  loss[len(ids) - len(post) - 1:len(ids) - 1] = 1
  return dict(input_ids=ids, loss_mask=loss,
              video_grid_thw=np.array([[t, h, w]], np.int32),
              second_per_grid_ts=np.array([1.0], np.float32),
              pixel_values_videos=rng.normal(size=(t * h * w, PATCH_DIM)).astype(np.float32),
              label="x", item_id=f"item{i}")


def _examples(seed=0, n=8):
  rng = np.random.default_rng(seed)
  grids = [(4, 4), (2, 4), (4, 2), (2, 2), (4, 4), (2, 6), (2, 2), (4, 4)]
  return [_example(rng, i, *grids[i % len(grids)], t=1 + i % 2) for i in range(n)]


def _collate(examples, **kw):
  return batching.collate(examples, batch_size=8, options=OPTS, model_config=CFG, pad_id=0, **kw)


def _setup(seed=0):
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(seed))
  cfg = optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, grad_clip=0.0)
  tx = optim.make_optimizer(cfg, 10)
  graphdef, state = train_state.init_state(model, tx, (), seed)
  return graphdef, state, tx, optim.schedule(cfg, 10)


def _loss_and_grads(graphdef, state, batch, loss_chunk=0):
  loss_fn = sft.make_loss_fn(graphdef, loss_chunk)
  sum_and_count = lambda *a: loss_fn(*a)[:2]  # noqa: E731 (the aux dict of SFT is empty)
  f = jax.jit(jax.value_and_grad(sum_and_count, has_aux=True))
  (s, n), g = f(state.params, state.frozen, state.rest, batch)
  return float(s), float(n), jax.tree.map(np.asarray, g)


def _assert_trees_close(a, b, tol):
  """Every leaf within `tol` of the other, relative to the leaf's largest magnitude (an
  element-wise rtol would fail on entries that are sums cancelling to near zero)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    scale = max(float(np.abs(y).max()), 1e-30)
    assert float(np.abs(x - y).max()) <= tol * scale, (x.shape, np.abs(x - y).max(), scale)


def test_grouped_collate_holds_only_each_groups_videos():
  ex = _examples()
  flat, grouped = _collate(ex), _collate(ex, groups=4)
  assert grouped["input_ids"].shape == (4, 2, flat["input_ids"].shape[1])
  assert grouped["position_ids"].shape == (4, 3, 2, flat["input_ids"].shape[1])
  np.testing.assert_array_equal(grouped["input_ids"].reshape(8, -1), flat["input_ids"])
  np.testing.assert_array_equal(
      grouped["position_ids"].transpose(1, 0, 2, 3).reshape(3, 8, -1), flat["position_ids"])
  # Patches per row: 16 16 8 8 16 24 4 32; the largest group (rows 4, 5: 40 patches) sets
  # the common bucket 64; the flat batch pads all 124 patches to 128.
  assert grouped["pixel_values_videos"].shape == (4, 64, PATCH_DIM)
  assert flat["pixel_values_videos"].shape == (128, PATCH_DIM)
  for g in range(4):
    mine = np.concatenate([ex[r]["pixel_values_videos"] for r in (2 * g, 2 * g + 1)])
    pv = grouped["pixel_values_videos"][g]
    np.testing.assert_array_equal(pv[:len(mine)], mine)
    assert not pv[len(mine):].any()
  assert grouped["video_layout"].window_perm.shape == (4, 64)
  # Forced larger shapes (what several processes agree on); too small is refused.
  big = _collate(ex, groups=4, length=64, patches=128)
  assert big["input_ids"].shape == (4, 2, 64) and big["pixel_values_videos"].shape[1] == 128
  with pytest.raises(ValueError, match="patches=32 is smaller"):
    _collate(ex, groups=4, patches=32)
  with pytest.raises(ValueError, match="groups=3"):
    _collate(ex, groups=3)


def test_grouped_step_equals_ungrouped_and_shards_vision_by_group():
  """8 groups of one row on 8 devices == the same 8 rows un-grouped (loss, grads)."""
  ex = _examples()
  flat, grouped = sft.device_batch(_collate(ex)), sft.device_batch(_collate(ex, groups=8))
  graphdef, state, tx, lr = _setup()
  s_ref, n_ref, g_ref = _loss_and_grads(graphdef, state, sharding.as_groups(flat))

  mesh = make_mesh((4, 2, 1))
  assert sharding.local_data_groups(mesh) == 8
  assert sharding.local_data_groups(make_mesh((2, 1, 4))) == 2
  placed = sharding.place_batch(grouped, mesh)
  pv = placed["pixel_values_videos"]
  assert pv.shape == (8, 32, PATCH_DIM)
  assert pv.sharding.spec == P(("data", "fsdp"), None, None)
  for shard in pv.addressable_shards:  # each device holds exactly its group's patches
    g = shard.index[0].start
    assert shard.data.shape == (1, 32, PATCH_DIM)
    mine = ex[g]["pixel_values_videos"]
    np.testing.assert_array_equal(np.asarray(shard.data)[0, :len(mine)], mine)
  perm = placed["video_layout"].full.gather
  assert perm.sharding.spec[0] == ("data", "fsdp")
  assert placed["position_ids"].sharding.spec == P(("data", "fsdp"), None, None, None)

  shard_state = jax.device_put(state, train_state.state_shardings(state, mesh))
  s, n, g = _loss_and_grads(graphdef, shard_state, placed)
  assert n == n_ref == sum(int(e["loss_mask"].sum()) for e in ex)
  np.testing.assert_allclose(s, s_ref, rtol=1e-5)
  _assert_trees_close(g, g_ref, 1e-5)

  # The full sharded train step on the grouped batch == the un-sharded step un-grouped.
  ref = sft.make_train_step(graphdef, tx, lr)
  step = sft.make_train_step(graphdef, tx, lr, mesh=mesh,
                             state_sharding=train_state.state_shardings(state, mesh))
  s1, m1 = ref(jax.tree.map(jnp.copy, state), (flat,))
  s2, m2 = step(jax.tree.map(jnp.copy, state), (grouped,))
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  assert int(s2.step) == 1 and bool(m2["ok"])
  # (Parameters after one Adam step are not compared: its first update g / (|g| + eps)
  # amplifies 1e-9 noise in near-zero gradients; the gradients themselves match above.)


def test_chunked_ce_equals_unchunked_loss_and_grads():
  batch = sharding.as_groups(sft.device_batch(_collate(_examples(seed=1))))
  graphdef, state, _, _ = _setup(seed=1)
  s0, n0, g0 = _loss_and_grads(graphdef, state, batch)
  t = batch["input_ids"].shape[-1]
  for chunk in (7, 8 * t + 5):  # uneven chunks (padded last one); one chunk bigger than B*T
    s, n, g = _loss_and_grads(graphdef, state, batch, loss_chunk=chunk)
    assert n == n0
    np.testing.assert_allclose(s, s0, rtol=1e-6)
    _assert_trees_close(g, g0, 1e-6)


def test_chunked_ce_matches_next_token_ce_and_ignores_last_position():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 11, (3, 5)))
  mask = jnp.asarray(rng.integers(0, 2, (3, 5)))  # a (contract-breaking) 1 at t = -1 too
  ref = sft.next_token_ce(hidden @ w, ids, mask)
  got = sft.chunked_next_token_ce(hidden, ids, mask, lambda h: h @ w, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
  with pytest.raises(ValueError, match="chunk 0"):
    sft.chunked_next_token_ce(hidden, ids, mask, lambda h: h @ w, 0)


def test_step_compiles_once_per_bucket_pair():
  graphdef, state, tx, lr = _setup()
  step = sft.make_train_step(graphdef, tx, lr, loss_chunk=16)
  shapes = []
  for seed in range(3):  # different rows, same (length, patch) buckets
    b = _collate(_examples(seed=seed), groups=2, length=48, patches=128)
    shapes.append((b["input_ids"].shape, b["pixel_values_videos"].shape))
    state, m = step(state, (sft.device_batch(b),))
    assert bool(m["ok"])
  assert len(set(shapes)) == 1 and step.num_traces() == 1
  other = _collate(_examples(seed=5), groups=2, length=64, patches=128)
  state, _ = step(state, (sft.device_batch(other),))
  state, _ = step(state, (sft.device_batch(_collate(_examples(seed=6), groups=2, length=48,
                                                    patches=128)),))
  assert step.num_traces() == 2
  # Two grouped micro-batches (accumulated by scan): one more program, tokens add up.
  two = [_collate(_examples(seed=s), groups=2, length=48, patches=128) for s in (7, 8)]
  state, m = step(state, tuple(sft.device_batch(b) for b in two))
  assert step.num_traces() == 3 and int(state.step) == 6
  assert float(m["tokens"]) == sum(int(b["loss_mask"].sum()) for b in two)


def test_process_max_takes_the_elementwise_max_over_processes(monkeypatch):
  """Two simulated processes: the gathered (length, patch) pairs [[48, 64], [64, 32]] give
  (64, 64), computed by hand; one process returns its values without any collective."""
  from jax.experimental import multihost_utils
  calls = []

  def gather(x):
    calls.append(np.asarray(x).tolist())
    return np.array([[48, 64], [64, 32]], np.int32)

  monkeypatch.setattr(multihost_utils, "process_allgather", gather)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert pipeline.process_max((48, 64)) == (64, 64)
  assert calls == [[48, 64]]
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  got = pipeline.process_max((np.int64(48), 32))
  assert got == (48, 32) and all(type(v) is int for v in got) and len(calls) == 1
