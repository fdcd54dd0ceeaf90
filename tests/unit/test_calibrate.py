"""The calibrator: readout positions, pooling, both losses against NumPy on the model's own
full-vocabulary logits / hidden states, the one-label-token check, and a train step that
moves only the head of the hidden-state calibrator."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepintuit_jax.algorithms import calibrator as calibrate
from deepintuit_jax.engine import optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.engine.step import TrainStep
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

CFG = tiny.micro_config()
LABELS = np.array([40, 41, 42], np.int32)  # three "label tokens" of the micro vocabulary


def _batch():
  """Two right-padded rows; row 0 reads out at 3 (label 41 at 4), row 1 at 5 (label 40)."""
  ids = np.array([[5, 6, 7, 8, 41, 2, 0, 0], [9, 46, 46, 10, 11, 12, 40, 2]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], np.int32)
  loss = np.zeros_like(ids)
  loss[0, 3] = 1
  loss[1, 5] = 1
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_positions_by_hand():
  b = _batch()
  pos, w = calibrate.readout_positions(jnp.asarray(b["loss_mask"]))
  assert pos.tolist() == [3, 5] and w.tolist() == [1.0, 1.0]
  pos, w = calibrate.readout_positions(jnp.zeros((1, 4), jnp.int32))  # a dummy row
  assert w.tolist() == [0.0]
  left = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
  assert calibrate.last_positions(left).tolist() == [3, 3, 2]


def test_pool_features_numpy():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 8, 3)).astype(np.float32)
  b = _batch()
  got = np.asarray(calibrate.pool_features(jnp.asarray(h), jnp.asarray(b["input_ids"]),
                                           jnp.asarray(b["attention_mask"]),
                                           jnp.asarray([3, 5]), video_token_id=46))
  # Row 0: positions 0..3 all text; row 1: 0, 3, 4, 5 (1 and 2 are video tokens).
  ref0 = np.concatenate([h[0, [0, 1, 2, 3]].mean(0), h[0, 3]])
  ref1 = np.concatenate([h[1, [0, 3, 4, 5]].mean(0), h[1, 5]])
  np.testing.assert_allclose(got, np.stack([ref0, ref1]), rtol=1e-6, atol=1e-6)


def _model():
  return Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))


def test_label_token_loss_matches_full_forward():
  model = _model()
  b = _batch()
  logits = np.asarray(model(jnp.asarray(b["input_ids"]),
                            jnp.asarray(b["attention_mask"])).logits)  # [2, 8, V]
  lp = _log_softmax(logits.astype(np.float64))
  ref = -(lp[0, 3, 41] + lp[1, 5, 40])
  lab = logits[[0, 1], [3, 5]][:, LABELS]
  correct = float(LABELS[lab[0].argmax()] == 41) + float(LABELS[lab[1].argmax()] == 40)
  graphdef, params, frozen, rest = optim.partition(model, ())
  fn = calibrate.make_loss_fn(graphdef, "label_token", LABELS)
  grouped = jax.tree.map(lambda x: jnp.asarray(x)[None], b)
  s, n, aux = fn(params, frozen, rest, grouped)
  np.testing.assert_allclose(float(s), ref, rtol=1e-5)
  assert float(n) == 2.0 and float(aux["label_accuracy"]) == correct


def test_hidden_state_loss_matches_numpy():
  vlm = _model()
  b = _batch()
  head = calibrate.ClassifierHead(CFG.text.hidden_size, 3, rngs=nnx.Rngs(1))
  hidden = np.asarray(vlm(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                          return_hidden=True).hidden, np.float64)
  k, bias = np.asarray(head.kernel[...], np.float64), np.asarray(head.bias[...], np.float64)
  feats = [np.concatenate([hidden[0, :4].mean(0), hidden[0, 3]]),
           np.concatenate([hidden[1, [0, 3, 4, 5]].mean(0), hidden[1, 5]])]
  lp = _log_softmax(np.stack(feats) @ k + bias)
  ref = -(lp[0, 1] + lp[1, 0])  # classes: 41 -> 1, 40 -> 0
  model = calibrate.HeadCalibrator(vlm, head)
  graphdef, params, frozen, rest = optim.partition(model, calibrate.HEAD_FROZEN)
  assert {p for p, _ in nnx.to_flat_state(params)} == {("head", "kernel"), ("head", "bias")}
  fn = calibrate.make_loss_fn(graphdef, "hidden_state", LABELS)
  s, n, _ = fn(params, frozen, rest, jax.tree.map(lambda x: jnp.asarray(x)[None], b))
  np.testing.assert_allclose(float(s), ref, rtol=1e-4)


def test_hidden_state_step_moves_only_the_head():
  model = calibrate.HeadCalibrator(_model(), calibrate.ClassifierHead(
      CFG.text.hidden_size, 3, rngs=nnx.Rngs(1)))
  tx = optax.sgd(0.1)
  graphdef, state = train_state.init_state(model, tx, calibrate.HEAD_FROZEN, seed=0)
  before = jax.tree.map(np.asarray, (state.params, state.frozen))
  step = TrainStep(calibrate.make_loss_fn(graphdef, "hidden_state", LABELS), tx,
                   lambda s: 0.1, count_name="rows")
  state, m = step(state, (_batch(),))
  assert bool(m["ok"]) and float(m["rows"]) == 2.0
  assert any(not np.array_equal(a, np.asarray(b_)) for a, b_ in zip(
      jax.tree.leaves(before[0]), jax.tree.leaves(state.params)))
  for a, b_ in zip(jax.tree.leaves(before[1]), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b_))


def test_check_targets():
  b = dict(_batch(), item_id=["a", "b"])
  calibrate.check_targets(b, LABELS)
  two = dict(b, loss_mask=b["loss_mask"].copy())
  two["loss_mask"][1, 4] = 1
  with pytest.raises(ValueError, match="'b'.*exactly one label token.*2 target"):
    calibrate.check_targets(two, LABELS)
  with pytest.raises(ValueError, match="'a'"):
    calibrate.check_targets(b, [42])  # the target is not a label token
  calibrate.check_targets(dict(b, item_id=["", "b"]), [40])  # dummy rows are not checked


def test_head_save_load_and_meta(tmp_path):
  head = calibrate.ClassifierHead(4, 3, rngs=nnx.Rngs(2))
  calibrate.save_head(str(tmp_path), head, classes=["a", "b", "c"], backbone="/m",
                      label_ids=[1, 2, 3])
  back = calibrate.load_head(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(back.kernel[...]), np.asarray(head.kernel[...]))
  meta = calibrate.read_meta(str(tmp_path))
  assert meta["head"] == "hidden_state" and meta["backbone"] == "/m"
  assert calibrate.read_meta(str(tmp_path / "none")) == {"head": "label_token"}
  with pytest.raises(ValueError, match="calibrate.head='x'"):
    calibrate.check_head("x")
