"""The imitation stage's own parts (algorithms/imitation.py, stages/imitation.py): loader batch -> classifier batch
(labels to indices, one video per row, groups), the cross-entropy loss against a NumPy
transcription, grouping invariance, and one placed step on an 8-device mesh."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from deepintuit_jax.algorithms import imitation
from deepintuit_jax.core import sharding
from deepintuit_jax.engine import optim
from deepintuit_jax.engine.state import init_state
from deepintuit_jax.engine.step import TrainStep
from deepintuit_jax.models import video_classifier as vc
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
from deepintuit_jax.models.qwen2_5_vl.vision import vision_layout
from deepintuit_jax.models.tiny import micro_config
from deepintuit_jax.stages import imitation as imitation_stage

CLASSES = ["left", "right", "up"]
VCFG = micro_config().vision
GRIDS = np.array([[1, 4, 4], [2, 2, 4], [1, 2, 2]])  # 4, 4 and 1 merged tokens


def _loader_batch(groups: int, labels=("right", "up", "left", ""), grids=GRIDS, seed=0):
  """A loader batch as pipeline.collate makes it: 4 rows (the last a dummy), `groups`
  groups, each group's videos concatenated and padded to 64 patches."""
  rng = np.random.default_rng(seed)
  pix = [rng.normal(size=(int(g.prod()), VCFG.patch_dim)).astype(np.float32) for g in grids]
  per, n_real = 4 // groups, len(grids)
  pv, lays = [], []
  for k in range(groups):
    mine = list(range(k * per, min((k + 1) * per, n_real)))
    p = np.zeros((64, VCFG.patch_dim), np.float32)
    if mine:
      cat = np.concatenate([pix[i] for i in mine])
      p[:len(cat)] = cat
    pv.append(p)
    lays.append(vision_layout(grids[mine].reshape(-1, 3), VCFG, pad_to=64,
                              max_frame_patches=16))
  b = dict(video_grid_thw=grids.astype(np.int32), labels=list(labels),
           item_id=[f"i{r}" if r < n_real else "" for r in range(4)], num_real=n_real)
  if groups == 1:
    b.update(pixel_values_videos=pv[0], video_layout=lays[0])
  else:
    b.update(pixel_values_videos=np.stack(pv), num_groups=groups,
             video_layout=jax.tree.map(lambda *xs: np.stack(xs), *lays))
  return b


def test_device_batch_grouped():
  idx = imitation.label_index(CLASSES)
  db = imitation.device_batch(_loader_batch(2), idx, merge=2)
  assert db["pixel_values_videos"].shape == (2, 64, VCFG.patch_dim)
  np.testing.assert_array_equal(db["class_ids"], [[1, 2], [0, 0]])
  np.testing.assert_array_equal(db["row_weight"], [[1, 1], [1, 0]])
  np.testing.assert_array_equal(db["num_tokens"], [[4, 4], [1, 0]])
  assert db["token_index"].shape == (2, 2, 16)  # the smallest bucket
  np.testing.assert_array_equal(db["token_index"][0, 1, :4], [4, 5, 6, 7])  # after video 0
  np.testing.assert_array_equal(db["token_index"][1, 0, :1], [0])  # group 1 starts anew
  one = imitation.device_batch(_loader_batch(1), idx, merge=2, length=32)
  assert one["token_index"].shape == (1, 4, 32) and one["class_ids"].shape == (1, 4)


def test_device_batch_errors_name_the_item():
  idx = imitation.label_index(CLASSES)
  with pytest.raises(ValueError, match="'i1'.*'down'"):
    imitation.device_batch(_loader_batch(1, labels=("right", "down", "left", "")), idx, 2)
  bad = _loader_batch(1)
  bad["video_grid_thw"] = GRIDS[:2]
  with pytest.raises(ValueError, match="exactly one video"):
    imitation.device_batch(bad, idx, 2)


def _model(seed=0):
  head = vc.HeadConfig(num_classes=3, width=16, depth=1, num_heads=2)
  return vc.VideoClassifier(VCFG, head, RuntimeOptions(), rngs=nnx.Rngs(seed))


def test_loss_is_the_weighted_cross_entropy_and_ignores_grouping():
  model = _model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  frozen = nnx.State({})
  loss_fn = jax.jit(imitation.make_loss_fn(graphdef))
  idx = imitation.label_index(CLASSES)
  grouped = imitation.device_batch(_loader_batch(2), idx, 2, length=16)
  flat = imitation.device_batch(_loader_batch(1), idx, 2, length=16)
  s2, n2, aux2 = loss_fn(params, frozen, rest, grouped)
  s1, n1, aux1 = loss_fn(params, frozen, rest, flat)
  # NumPy transcription: -sum_r w_r log softmax(z_r)[y_r], from each row's logits alone.
  g = jax.tree.map(lambda x: x[0], flat)
  z = np.asarray(imitation.group_logits(graphdef, params, frozen, rest, g), np.float64)
  logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(
      1, keepdims=True)
  y, w = np.array([1, 2, 0, 0]), np.array([1, 1, 1, 0])
  want = -(logp[np.arange(4), y] * w).sum()
  assert float(n1) == float(n2) == 3
  np.testing.assert_allclose(float(s1), want, rtol=1e-5)
  np.testing.assert_allclose(float(s2), want, rtol=1e-5)
  assert float(aux1["accuracy"]) == float(aux2["accuracy"]) == float(
      ((z.argmax(1) == y) * w).sum())


def test_one_placed_step_on_a_mesh():
  mesh = sharding.make_mesh((-1, 1, 1))  # 8 host devices (conftest)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), 10)
  graphdef, state = init_state(_model(), tx, (), seed=0)
  shard = sharding.state_shardings(state, mesh)
  step = TrainStep(imitation.make_loss_fn(graphdef), tx, lambda s: 1e-2, mesh=mesh,
                   state_sharding=shard, row_axes=imitation.ROW_AXES, count_name="examples")
  idx = imitation.label_index(CLASSES)
  mb = step.place(imitation.device_batch(_loader_batch(1), idx, 2))  # G = 1: rows split
  assert step.place(mb) is mb  # placed batches pass through
  state, m = step(jax.device_put(state, shard), (mb,))
  assert bool(m["ok"]) and float(m["examples"]) == 3 and int(state.step) == 1
  assert np.isfinite(float(m["loss"])) and 0 <= float(m["accuracy"]) <= 1


def test_build_classifier_keeps_or_replaces_the_base_tower():
  from deepintuit_jax.models.qwen2_5_vl import Qwen2_5_VL
  base = Qwen2_5_VL(micro_config(), RuntimeOptions(), rngs=nnx.Rngs(5))
  want = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(base.visual, nnx.Param))}
  mesh = sharding.make_mesh((-1, 1, 1))
  kw = dict(seed=1, mesh=mesh)
  head = vc.HeadConfig(num_classes=3, width=16, depth=1, num_heads=2, mlp_ratio=2,
                       pos_frequencies=2)
  pre = imitation.build_classifier(base, "pretrained", head, **kw)
  got = dict(nnx.to_flat_state(nnx.state(pre.visual, nnx.Param)))
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)
  scratch = imitation.build_classifier(base, "scratch", head, **kw)
  kernel = ("patch_embed", "proj", "kernel")
  assert not np.allclose(np.asarray(dict(nnx.to_flat_state(nnx.state(
      scratch.visual, nnx.Param)))[kernel]), want[kernel])
  with pytest.raises(ValueError, match="imitation.init"):
    imitation_stage.ImitationSpec(init="random", head_width=16, head_depth=1, head_heads=2,
                                  head_mlp_ratio=2, pos_frequencies=2)
