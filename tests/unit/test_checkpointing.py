"""Orbax checkpoints: exact round trip, keep-last-N, interrupted saves ignored, init_from."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.algorithms import sft
from deepintuit_jax.engine import checkpointing
from deepintuit_jax.engine import optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

from tests.unit.test_trainer import CFG, _batch


def _state(seed=0, frozen=(r"^visual\.",)):
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(seed))
  cfg = optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, frozen=frozen)
  tx = optim.make_optimizer(cfg, 10)
  graphdef, state = train_state.init_state(model, tx, frozen, seed)
  return graphdef, state, tx, optim.schedule(cfg, 10)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_round_trip_keep_and_interrupted_save(tmp_path):
  graphdef, state, tx, lr = _state()
  step = sft.make_train_step(graphdef, tx, lr)
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=2, keep=2)
  rng = np.random.default_rng(0)
  saved = {}
  for i in range(6):
    state, _ = step(state, (_batch(rng, 2, 8, [8, 5]),))
    if ck.save(state, {"epoch": 0, "pos": i + 1}):
      ck.wait()
      saved[int(state.step)] = jax.tree.map(np.asarray, state)
  assert not ck.save(state, {"pos": 0})  # step 6 already saved
  ck.wait()
  assert ck.all_steps() == [4, 6]  # keep=2
  # A save killed mid-way leaves an unfinalised temporary directory: never listed.
  os.makedirs(tmp_path / "ck" / "8.orbax-checkpoint-tmp-1234" / "params")
  ck2 = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=2, keep=2)
  assert ck2.latest_step() == 6
  _, fresh, _, _ = _state(seed=1)
  restored, data = ck2.restore(fresh)
  assert data == {"epoch": 0, "pos": 6}
  assert int(restored.step) == 6
  for a, b in zip(_leaves(saved[6]), _leaves(restored)):
    np.testing.assert_array_equal(a, b)
  restored4, data4 = ck2.restore(fresh, step=4)
  assert data4["pos"] == 4 and int(restored4.step) == 4
  # init_from another run's checkpoint dir: parameters only, fresh optimizer and step.
  _, other, _, _ = _state(seed=2, frozen=())  # a different trainable/frozen split
  loaded = checkpointing.load_params(str(tmp_path / "ck"), other)
  assert int(loaded.step) == 0
  for a, b in zip(_leaves(nnx.merge_state(saved[6].params, saved[6].frozen)),
                  _leaves(nnx.merge_state(loaded.params, loaded.frozen))):
    np.testing.assert_array_equal(a, b)
  ck.close(), ck2.close()


def test_restore_with_shardings(tmp_path):
  from deepintuit_jax.core.sharding import make_mesh
  graphdef, state, tx, lr = _state()
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=1)
  ck.save(state, {}, force=True)
  ck.wait()
  mesh = make_mesh((2, 2, 2))
  shard = train_state.state_shardings(state, mesh)
  restored, _ = ck.restore(state, shard)
  emb = restored.params["model"]["embed_tokens"]["embedding"][...]
  assert emb.sharding == shard.params["model"]["embed_tokens"]["embedding"]
  ck.close()


def test_init_from_missing_checkpoint_is_clear(tmp_path):
  _, state, _, _ = _state()
  with pytest.raises(FileNotFoundError, match="no complete Orbax checkpoint"):
    checkpointing.load_params(str(tmp_path), state)


def test_loop_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
  from deepintuit_jax.engine import loop
  graphdef, state, tx, lr = _state()
  step = sft.make_train_step(graphdef, tx, lr)
  rng = np.random.default_rng(5)
  good = [_batch(rng, 2, 8, [8, 6]) for _ in range(3)]
  poisoned = dict(good[0])

  def batches():
    for b in good:
      yield (b,), 16
    yield (poisoned,), 16

  def nan_step(st, micro):
    if micro[0] is poisoned:  # a NaN in the weights: loss and grads become NaN
      k = st.params["lm_head"]["kernel"]
      k.set_value(k[...] * jnp.nan)
    return step(st, micro)

  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=2, keep=3)
  writer = loop.MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(loop.NonFiniteError, match=r"step 4 .*last good checkpoint is step 2"):
    loop.train_loop(state, nan_step, batches(), total_steps=6, writer=writer, checkpointer=ck,
                    data_state=lambda: {"pos": 1})
  assert ck.all_steps() == [2]
  restored, data = ck.restore(_state()[1])
  assert int(restored.step) == 2 and data == {"pos": 1}
  assert all(np.isfinite(x).all() for x in _leaves(restored.params))
  ck.close()


def test_model_source_is_recorded_beside_the_first_save(tmp_path):
  """A stage starting from these checkpoints must build the model they were trained as: the
  HF source is written once, beside the first save, and read back from the workdir or its
  checkpoints/ dir; nothing is recorded before a save, or when no source was set."""
  _, state, _, _ = _state()
  work = tmp_path / "run"
  ck = checkpointing.Checkpointer(str(work / "checkpoints"), every_steps=1)
  ck.model_source, ck.rope_convention = "/models/base", "transformers_5.3"
  assert checkpointing.recorded_source(str(work)) is None
  assert checkpointing.recorded_rope_convention(str(work)) is None
  assert ck.save(state, {}, force=True)
  ck.wait()
  assert checkpointing.recorded_source(str(work)) == "/models/base"
  assert checkpointing.recorded_rope_convention(str(work)) == "transformers_5.3"
  assert checkpointing.recorded_source(str(work / "checkpoints")) == "/models/base"
  ck.model_source = "/models/other"  # the record is the first save's, not overwritten
  ck.save(state.replace(step=state.step + 1), {}, force=True)
  ck.wait()
  assert checkpointing.recorded_source(str(work)) == "/models/base"
  assert ck.all_steps() == [0, 1]  # the record is no step directory
  ck.close()
  bare = checkpointing.Checkpointer(str(tmp_path / "bare"), every_steps=1)
  bare.save(state, {}, force=True)
  bare.wait()
  assert checkpointing.recorded_source(str(tmp_path / "bare")) is None
  bare.close()
