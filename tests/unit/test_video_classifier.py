"""The imitation baseline's model (models/video_classifier.py): token geometry against the
preprocessing's patch order, the Fourier position features, the head telling orders apart
(and learning an order task a position-free pooling cannot), padding and batching
invariance, and the tower + head end to end."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepintuit_jax.data.video_preprocess import preprocess_video
from deepintuit_jax.models import video_classifier as vc
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
from deepintuit_jax.models.qwen2_5_vl.vision import vision_layout
from deepintuit_jax.models.tiny import micro_config

F32 = RuntimeOptions()  # float32 compute and storage
# Jitted calls (eager op-by-op dispatch of the tower is slow).
call = nnx.jit(lambda module, *args: module(*args))


def test_token_layout_hand_case():
  # Two videos in a group of three rows: merged grids (1, 1, 2) and (2, 1, 1).
  lay = vc.token_layout(np.array([[1, 2, 4], [2, 2, 2]]), rows=3, merge=2, length=4)
  np.testing.assert_array_equal(lay.num_tokens, [2, 2, 0])
  np.testing.assert_array_equal(lay.token_index, [[0, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(lay.token_coords[0, :2], [[0, 0, -0.5], [0, 0, 0.5]])
  np.testing.assert_allclose(lay.token_coords[1, :2], [[-0.5, 0, 0], [0.5, 0, 0]])
  assert not lay.token_coords[2].any()
  with pytest.raises(ValueError, match="more than length"):
    vc.token_layout(np.array([[1, 4, 4]]), rows=1, merge=2, length=3)
  with pytest.raises(ValueError, match="one video"):
    vc.token_layout(np.array([[1, 2, 2]] * 3), rows=2, merge=2, length=16)


def test_token_bucket():
  assert [vc.token_bucket(n) for n in (0, 1, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]


def test_coords_follow_the_preprocessed_pixels():
  """A bright 28 x 28 cell (one merged token) moves between the two temporal steps of a
  56 x 84 clip; the token whose patches are bright must sit where the pixels were drawn."""
  frames = np.zeros((4, 56, 84, 3), np.uint8)
  frames[:2, 28:56, 56:84] = 255   # t = 0: merged cell (h 1, w 2)
  frames[2:, 0:28, 0:28] = 255     # t = 1: merged cell (h 0, w 0)
  pixels, grid = preprocess_video(frames, min_pixels=28 * 28, max_pixels=56 * 84)
  assert grid.tolist() == [2, 4, 6]
  lay = vc.token_layout(grid[None], rows=1, merge=2, length=16)
  brightness = pixels.reshape(-1, 4, pixels.shape[1]).mean(axis=(1, 2))  # per merged token
  bright = np.flatnonzero(brightness > brightness.mean())
  got = lay.token_coords[0, bright]
  # (2i + 1) / n - 1 by hand: t in {-1/2, 1/2}; h of 2 cells; w of 3 cells.
  np.testing.assert_allclose(got, [(-0.5, 0.5, 2 / 3), (0.5, -0.5, -2 / 3)], atol=1e-6)
  # The tower's own patch positions agree: each merged token's 4 patches share an (h, w)
  # block, in the same order (vision_layout's rotary positions, original order).
  from deepintuit_jax.models.qwen2_5_vl.vision_layout import rotary_positions
  rot = rotary_positions(grid[None], 2).reshape(-1, 4, 2) // 2
  assert (rot == rot[:, :1]).all()
  np.testing.assert_allclose((2 * rot[:, 0] + 1) / np.array([2, 3]) - 1,
                             lay.token_coords[0, :12, 1:])


def test_fourier_features_golden():
  x = np.array([[-0.75, 0.1, 0.5]], np.float32)
  got = np.asarray(vc.fourier_features(jnp.asarray(x), 3))
  want = []
  for a in range(3):
    ang = [math.pi / 2 * 2 ** k * x[0, a] for k in range(3)]
    want += [math.sin(v) for v in ang] + [math.cos(v) for v in ang]
  np.testing.assert_allclose(got[0], want, atol=1e-6)


def _head(depth=1, width=32, classes=2, seed=0, in_features=8):
  cfg = vc.HeadConfig(num_classes=classes, width=width, depth=depth, num_heads=4)
  return vc.ClassifierHead(in_features, cfg, F32, rngs=nnx.Rngs(seed))


def _grid_coords(t, h, w) -> np.ndarray:
  """[t*h*w, 3] coordinates of a merged grid in the tower's row-major order."""
  return vc.token_layout(np.array([[t, 2 * h, 2 * w]]), 1, 2, t * h * w).token_coords[0]


def test_head_tells_token_orders_apart():
  """Two inputs holding the same tokens in different places (left/right mirrored) give
  different logits; with the position embedding zeroed they give the same ones (so it is
  the positions that tell them apart: a pooled head without them cannot)."""
  head = _head()
  rng = np.random.default_rng(0)
  coords = _grid_coords(2, 1, 4)[None]  # [1, 8, 3]
  tokens = rng.normal(size=(1, 8, 8)).astype(np.float32)
  mirrored = tokens.reshape(1, 2, 4, 8)[:, :, ::-1].reshape(1, 8, 8)
  n = np.array([8], np.int32)
  a, b = (np.asarray(call(head, jnp.asarray(x), coords, n)) for x in (tokens, mirrored))
  assert np.abs(a - b).max() > 1e-3
  head.pos.kernel[...] = jnp.zeros_like(head.pos.kernel[...])
  a, b = (np.asarray(call(head, jnp.asarray(x), coords, n)) for x in (tokens, mirrored))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_head_ignores_padding_and_other_rows():
  head = _head(depth=2)
  rng = np.random.default_rng(1)
  short_c, long_c = _grid_coords(1, 1, 4), _grid_coords(2, 2, 2)  # 4 and 8 tokens
  short_t = rng.normal(size=(4, 8)).astype(np.float32)
  long_t = rng.normal(size=(8, 8)).astype(np.float32)
  alone = np.asarray(call(head, short_t[None], short_c[None], np.array([4], np.int32)))
  # In a batch with a longer video, padded to 16 with garbage tokens and coordinates.
  tok = rng.normal(size=(2, 16, 8)).astype(np.float32) * 100
  crd = rng.uniform(-1, 1, size=(2, 16, 3)).astype(np.float32)
  tok[0, :4], crd[0, :4], tok[1, :8], crd[1, :8] = short_t, short_c, long_t, long_c
  both = np.asarray(call(head, tok, crd, np.array([4, 8], np.int32)))
  np.testing.assert_allclose(both[0], alone[0], rtol=1e-5, atol=1e-5)
  long_alone = np.asarray(call(head, long_t[None], long_c[None], np.array([8], np.int32)))
  np.testing.assert_allclose(both[1], long_alone[0], rtol=1e-5, atol=1e-5)
  # A row with no video still gives finite logits ([CLS] is always a key).
  assert np.isfinite(np.asarray(call(head, tok[:1], crd[:1], np.array([0], np.int32)))).all()


def _direction_task(rng, n):
  """Merged grid (t 3, h 1, w 4): a marker token moves one cell right (label 1) or left
  (label 0) per time step on noise tokens. Both classes use the same columns and times, and
  the marker looks the same at every step: only how place and time go together differs."""
  marker = np.linspace(-1, 1, 8).astype(np.float32) * 2
  x = rng.normal(size=(n, 3, 4, 8)).astype(np.float32) * 0.5
  y = rng.integers(0, 2, n)
  start = rng.integers(0, 2, n)  # right: columns s, s+1, s+2; left: 3-s, 2-s, 1-s
  for i in range(n):
    for t in range(3):
      col = start[i] + t if y[i] else 3 - start[i] - t
      x[i, t, col] += marker
  return x.reshape(n, 12, 8), y.astype(np.int32)


def test_head_learns_direction_a_pooled_readout_cannot():
  rng = np.random.default_rng(0)
  xs, ys = _direction_task(rng, 2048)
  xt, yt = _direction_task(rng, 512)
  coords = jnp.asarray(_grid_coords(3, 1, 4))
  # The per-column multiset of tokens (time order dropped) is the same in distribution for
  # both classes, so the mean over time of each class agrees: a pooled head sees nothing.
  mean_by_class = [xs[ys == c].reshape(-1, 3, 4, 8).mean(axis=(0, 1)) for c in (0, 1)]
  np.testing.assert_allclose(*mean_by_class, atol=0.1)
  head = _head(width=32, in_features=8)
  graphdef, params = nnx.split(head, nnx.Param)
  # lr 1e-3: at 3e-3 the run is chaotic (it learns on jax 0.10 but falls back to chance on
  # jax 0.12 from a 1e-7 difference at step 50); at 1e-3 it learns by step 100 on both.
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x, jnp.broadcast_to(coords, x.shape[:2] + (3,)),
                                    jnp.full((x.shape[0],), 12, jnp.int32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, o, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  for i in range(300):
    sl = slice((i * 64) % 2048, (i * 64) % 2048 + 64)
    params, opt, _ = step(params, opt, jnp.asarray(xs[sl]), jnp.asarray(ys[sl]))
  logits = nnx.merge(graphdef, params)(
      jnp.asarray(xt), jnp.broadcast_to(coords, (512, 12, 3)), jnp.full((512,), 12, jnp.int32))
  acc = float((np.asarray(logits).argmax(-1) == yt).mean())
  assert acc > 0.95, acc


def test_classifier_end_to_end_two_grids():
  """Tower + head on one group holding two videos of different grids (and a dummy row):
  each row's logits equal those of its video alone."""
  cfg = micro_config().vision
  head_cfg = vc.HeadConfig(num_classes=3, width=16, depth=1, num_heads=2)
  model = vc.VideoClassifier(cfg, head_cfg, F32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  grids = np.array([[1, 4, 4], [2, 2, 4]])
  pix = [rng.normal(size=(int(g.prod()), cfg.patch_dim)).astype(np.float32) for g in grids]

  def run(grid, pixels, rows, pad_to):
    p = np.zeros((pad_to, cfg.patch_dim), np.float32)
    p[:len(pixels)] = pixels
    lay = vc.token_layout(grid, rows, cfg.spatial_merge_size, 16)
    return np.asarray(call(model, jnp.asarray(p), vision_layout(grid, cfg, pad_to=pad_to),
                           lay.token_index, lay.token_coords, lay.num_tokens))

  both = run(grids, np.concatenate(pix), 3, 64)
  assert both.shape == (3, 3) and np.isfinite(both).all()
  for r in range(2):
    np.testing.assert_allclose(both[r], run(grids[r:r + 1], pix[r], 1, 32)[0],
                               rtol=1e-4, atol=1e-5)


def test_tower_is_kept_and_head_init_does_not_depend_on_it():
  cfg = micro_config().vision
  head_cfg = vc.HeadConfig(num_classes=2, width=16, depth=1, num_heads=2)
  scratch = vc.VideoClassifier(cfg, head_cfg, F32, rngs=nnx.Rngs(3))
  given = vc.VideoClassifier(cfg, head_cfg, F32, rngs=nnx.Rngs(3), tower=scratch.visual)
  assert given.visual is scratch.visual
  for a, b in zip(jax.tree.leaves(nnx.state(scratch.head)), jax.tree.leaves(nnx.state(given.head))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="num_heads"):
    vc.HeadConfig(num_classes=2, width=10, num_heads=4)
  with pytest.raises(ValueError, match="depth"):
    vc.HeadConfig(num_classes=2, depth=0)
