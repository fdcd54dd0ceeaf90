"""SFT trainer: CE against a NumPy reference, token-weighted accumulation, frozen params,
schedule, NaN guard."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepintuit_jax.algorithms import sft
from deepintuit_jax.engine import optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

CFG = tiny.micro_config()


def _batch(rng, b, t, n_real):
  ids = rng.integers(1, 40, (b, t)).astype(np.int32)
  mask = np.zeros((b, t), np.int32)
  loss = np.zeros((b, t), np.int32)
  for i, n in enumerate(n_real):
    mask[i, :n] = 1
    loss[i, n // 2 - 1:n - 1] = 1  # predicts the "assistant" half (logit-aligned)
  ids[mask == 0] = 0
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss)


def test_next_token_ce_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  s, n = sft.next_token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  ref, cnt = 0.0, 0
  for b in range(2):
    for t in range(4):
      if mask[b, t]:
        row = logits[b, t].astype(np.float64)
        ref += np.log(np.exp(row).sum()) - row[ids[b, t + 1]]
        cnt += 1
  assert int(n) == cnt == 5
  np.testing.assert_allclose(float(s), ref, rtol=1e-5)


def test_schedule_warmup_then_linear_decay():
  f = optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup_ratio=0.06), 100)
  # HF's linear schedule: ceil(6) warmup steps, step/6 then (100 - step) / 94.
  for step, want in [(0, 0.0), (3, 0.5), (6, 1.0), (53, 47 / 94), (100, 0.0)]:
    assert float(f(step)) == pytest.approx(want, abs=1e-6)


def _setup(frozen=(), lr=1e-2, seed=0, sgd=False):
  """sgd: plain SGD instead of the stages' AdamW (whose first step, lr * g / (|g| + eps),
  turns a gradient entry at rounding level into a full-size update of either sign)."""
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(seed))
  cfg = optim.OptimConfig(learning_rate=lr, warmup_ratio=0.0, grad_clip=0.0, frozen=frozen)
  tx = optax.sgd(lr) if sgd else optim.make_optimizer(cfg, 10)
  graphdef, state = train_state.init_state(model, tx, frozen, seed)
  return graphdef, state, tx, optim.schedule(cfg, 10)


def test_grad_accumulation_equals_one_big_batch_token_weighted():
  rng = np.random.default_rng(1)
  # Unequal token counts per micro-batch: a mean of micro-batch means would differ.
  a = _batch(rng, 2, 12, [12, 5])
  b = _batch(rng, 2, 12, [3, 4])
  big = {k: np.concatenate([a[k], b[k]]) for k in a}
  graphdef, state, tx, lr = _setup(sgd=True)  # params move by lr x the gradients
  step = sft.make_train_step(graphdef, tx, lr)
  s1, m1 = step(jax.tree.map(jnp.copy, state), (big,))
  s2, m2 = step(jax.tree.map(jnp.copy, state), (a, b))  # scan path (same shapes)
  c = {k: v[:, :8] for k, v in b.items()}             # shorter: unrolled path
  big3 = {k: np.concatenate([a[k], np.pad(c[k], ((0, 0), (0, 4)))]) for k in a}
  s3, m3 = step(jax.tree.map(jnp.copy, state), (big3,))
  s4, m4 = step(jax.tree.map(jnp.copy, state), (a, c))
  assert float(m1["tokens"]) == float(m2["tokens"]) == (6 + 3 + 2 + 2)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
  np.testing.assert_allclose(float(m3["loss"]), float(m4["loss"]), rtol=1e-5)
  for x, y in [(s1.params, s2.params), (s3.params, s4.params)]:
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-7)  # lr 1e-2 x 1e-5
  assert int(s1.step) == 1 and bool(m1["ok"])


def test_frozen_params_have_no_optimizer_state_and_do_not_change():
  graphdef, state, tx, lr = _setup(frozen=(r"^visual\.", r"embed_tokens"))
  names = [optim.path_str(p) for p, _ in nnx.to_flat_state(state.frozen)]
  assert names and all(n.startswith("visual.") or "embed_tokens" in n for n in names)
  n_train = optim.count_params(state.params)
  n_frozen = optim.count_params(state.frozen)
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))
  assert n_train + n_frozen == model.num_params()
  # Adam moments exist only for trainable leaves: 2 * trainable + the step counters.
  moments = sum(int(x.size) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * n_train
  before = jax.tree.map(np.asarray, state.frozen)
  before_train = jax.tree.map(np.asarray, state.params)
  step = sft.make_train_step(graphdef, tx, lr)
  rng = np.random.default_rng(2)
  for _ in range(2):
    state, m = step(state, (_batch(rng, 2, 10, [10, 7]),))
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(u, np.asarray(v))
  changed = [not np.array_equal(u, np.asarray(v))
             for u, v in zip(jax.tree.leaves(before_train), jax.tree.leaves(state.params))]
  assert all(changed)


def test_bad_frozen_pattern_is_named():
  with pytest.raises(ValueError, match="visul"):
    _setup(frozen=(r"^visul\.",))


def test_nan_loss_leaves_state_unchanged_and_reports_not_ok():
  graphdef, state, tx, lr = _setup()
  kernel = state.params["lm_head"]["kernel"]
  kernel.set_value(kernel[...].at[0, 0].set(jnp.nan))
  before = jax.tree.map(np.asarray, state.params)
  step = sft.make_train_step(graphdef, tx, lr)
  new, m = step(state, (_batch(np.random.default_rng(3), 2, 8, [8, 8]),))
  assert not bool(m["ok"])
  assert int(new.step) == 0
  for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(u, np.asarray(v))


def test_sharded_step_runs_on_mesh():
  from deepintuit_jax.core.sharding import make_mesh
  mesh = make_mesh((2, 2, 2))
  graphdef, state, tx, lr = _setup()
  shard = train_state.state_shardings(state, mesh)
  step = sft.make_train_step(graphdef, tx, lr, mesh=mesh, state_sharding=shard)
  ref = sft.make_train_step(graphdef, tx, lr)
  batch = _batch(np.random.default_rng(4), 4, 8, [8, 6, 5, 8])
  s_ref, m_ref = ref(jax.tree.map(jnp.copy, state), (batch,))
  s, m = step(state, (batch,))
  np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
  emb = s.params["model"]["embed_tokens"]["embedding"][...]
  assert emb.sharding == shard.params["model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
