"""Invariants of the host-side vision layout and of block attention (no torch needed)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepintuit_jax.models.qwen2_5_vl.config import VisionConfig
from deepintuit_jax.models.qwen2_5_vl.vision import block_attention
from deepintuit_jax.models.qwen2_5_vl.vision_layout import (
    pack_segments, rotary_positions, vision_layout)


def _cfg(window=112):
  return VisionConfig(depth=1, hidden_size=32, num_heads=4, window_size=window,
                      fullatt_block_indexes=(), out_hidden_size=8)


def _random_grids(rng, n):
  return np.stack([rng.integers(1, 4, n), 2 * rng.integers(1, 13, n),
                   2 * rng.integers(1, 13, n)], -1)


def _frame_and_window(grid, cfg):
  """Per original patch: (frame id, window id) from first principles."""
  m, side = cfg.spatial_merge_size, cfg.window_size // cfg.patch_size
  frames, wins, f0 = [], [], 0
  for t, h, w in grid:
    pos = rotary_positions(np.array([[1, h, w]]), m)
    win = (pos[:, 0] // side) * 1000 + pos[:, 1] // side
    for k in range(t):
      frames.append(np.full(h * w, f0 + k))
      wins.append(win)
    f0 += t
  return np.concatenate(frames), np.concatenate(wins)


def _check_blocks(blocks, n, n_real, same_group):
  """Every real token exactly once; scatter inverts gather; one group per segment."""
  s, l = blocks.gather.shape
  assert blocks.valid.shape == blocks.segment.shape == (s, l) and blocks.scatter.shape == (n,)
  got = np.sort(blocks.gather[blocks.valid])
  np.testing.assert_array_equal(got, np.arange(n_real))  # each token exactly once
  flat_gather, flat_valid = blocks.gather.ravel(), blocks.valid.ravel()
  sc = blocks.scatter[:n_real]
  np.testing.assert_array_equal(flat_gather[sc], np.arange(n_real))  # scatter o gather = id
  assert flat_valid[sc].all()
  assert (blocks.scatter[n_real:] == s * l).all()  # padding tokens point past the end
  assert ((blocks.segment >= 0) == blocks.valid).all()
  for seg in np.unique(blocks.segment[blocks.valid]):
    rows = np.unique(np.nonzero(blocks.segment == seg)[0])
    assert rows.size == 1, "a segment spans several rows"
    toks = blocks.gather[blocks.segment == seg]
    np.testing.assert_array_equal(np.sort(toks), np.arange(toks.min(), toks.max() + 1))
    assert len(np.unique(same_group[toks])) == 1
  return s, l


@pytest.mark.parametrize("window", [56, 112, 224])
def test_layout_invariants(window):
  rng = np.random.default_rng(window)
  cfg = _cfg(window)
  for _ in range(10):
    grid = _random_grids(rng, int(rng.integers(1, 5)))
    n = int(grid.prod(-1).sum())
    for pad_to in (None, n + 4 * int(rng.integers(0, 40))):
      lay = vision_layout(grid, cfg, pad_to=pad_to, max_frame_patches=24 * 24 if pad_to else None)
      total = n if pad_to is None else pad_to
      perm, inv = lay.window_perm, lay.merge_inverse
      np.testing.assert_array_equal(np.sort(perm), np.arange(total))
      assert (perm[n:] == np.arange(n, total)).all()
      # patches move in merge groups of 4; merge_inverse undoes the merged permutation
      groups = perm.reshape(-1, 4)
      assert (groups // 4 == groups[:, :1] // 4).all() and (groups % 4 == np.arange(4)).all()
      np.testing.assert_array_equal(groups[inv, 0] // 4, np.arange(total // 4))
      assert lay.num_merged_tokens == n // 4 and lay.merged_valid.shape == (total // 4,)
      # rotary positions follow the permutation
      np.testing.assert_array_equal(lay.rotary_pos[:n],
                                    rotary_positions(grid, 2)[perm[:n]])
      frame, win = _frame_and_window(grid, cfg)
      frame_p, win_p = frame[perm[:n]], win[perm[:n]]
      s_w, l_w = _check_blocks(lay.windowed, total, n, frame_p * 10 ** 6 + win_p)
      s_f, l_f = _check_blocks(lay.full, total, n, frame_p)
      assert l_w == (window // 14) ** 2
      # bounded memory: next-fit never needs more than 2 * ceil(N / L) rows
      for s, l in ((s_w, l_w), (s_f, l_f)):
        assert s <= max(1, 2 * math.ceil(total / l))
        if pad_to is not None:
          assert s == max(1, 2 * math.ceil(total / l))
      # full attention: one segment per frame
      assert len(np.unique(lay.full.segment[lay.full.valid])) == grid[:, 0].sum()


def test_bucketed_shapes_depend_only_on_bucket():
  cfg = _cfg()
  a = vision_layout(np.array([[2, 8, 8], [1, 4, 12]]), cfg, pad_to=400, max_frame_patches=256)
  b = vision_layout(np.array([[1, 16, 16], [3, 6, 8]]), cfg, pad_to=400, max_frame_patches=256)
  shapes = lambda lay: jax.tree.map(np.shape, lay)
  assert shapes(a) == shapes(b)


def test_pack_segments_errors():
  with pytest.raises(ValueError, match="does not fit"):
    pack_segments(np.array([4, 9]), 13, 8, kind="full")
  with pytest.raises(ValueError, match="needs 3 rows"):
    pack_segments(np.array([6, 6, 6]), 18, 8, num_rows=2, kind="windowed")
  with pytest.raises(ValueError, match="max_frame_patches"):
    vision_layout(np.array([[1, 20, 20]]), _cfg(), pad_to=400, max_frame_patches=256)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_block_attention_equals_dense_masked_attention(impl):
  rng = np.random.default_rng(0)
  lengths = np.array([3, 5, 1, 8, 2, 6])
  n_real, n = int(lengths.sum()), int(lengths.sum()) + 3
  blocks = pack_segments(lengths, n, 8)
  q, k, v = (jnp.asarray(rng.normal(size=(n, 2, 4)), jnp.float32) for _ in range(3))
  out = block_attention(q, k, v, blocks, impl, block=4)
  seg = np.repeat(np.arange(lengths.size), lengths)
  dense_mask = jnp.asarray(seg[:, None] == seg[None, :])[None, None]
  ref = jax.nn.dot_product_attention(q[None, :n_real], k[None, :n_real], v[None, :n_real],
                                     mask=dense_mask)[0].reshape(n_real, -1)
  np.testing.assert_allclose(np.asarray(out[:n_real]), np.asarray(ref), rtol=1e-5, atol=1e-6)
  assert (np.asarray(out[n_real:]) == 0).all()
