"""Dense per-token targets of the tower pretraining, worked by hand; a short training run."""
from __future__ import annotations

import numpy as np

from tools import tiny_base_tower as tp


def _meta(**kw):
  m = dict(height=56, width=56, frames=8, start=[10.0, 10.0, 5.0], end=[46.0, 10.0, 5.0],
           motion="right", colour="red", shape="square")
  m.update(kw)
  return m


def test_token_targets_moving_right_by_hand():
  # 56 x 56 px -> a 4 x 4 patch grid (no resize: sx = sy = 1), 2 x 2 merged cells of 28 px,
  # 8 frames -> 4 tokens in time. The object's box half-extent is 1.15 * 5 = 5.75 px.
  # t=0 (frames 0, 1): centres x = 10 and 10 + 36/7 = 15.14, y = 10: only cell (0, 0)
  #   (box 11.5 x 11.5 inside it: cover 132.25 / 784 = 0.169 >= 0.12).
  # t=3 (frames 6, 7): x = 40.86 and 46: cell (0, 1) only.
  t = tp.token_targets(_meta(), np.arange(8), (4, 4, 4))
  kind = t["kind"].reshape(4, 2, 2)
  np.testing.assert_array_equal(kind[0], [[1, 0], [0, 0]])
  np.testing.assert_array_equal(kind[3], [[0, 1], [0, 0]])
  k0 = 0  # (t=0, row 0, col 0)
  assert t["colour"][k0] == tp.COLOURS.index("red")
  assert t["shape"][k0] == tp.SHAPES.index("square")
  assert t["motion"][k0] == tp.MOTIONS.index("right")
  # flow: dx = 36/7 px per frame in 2-px units, no vertical motion, no size change
  np.testing.assert_allclose(t["flow"][k0], [36 / 7 / 2, 0.0, 0.0], atol=1e-5)
  assert t["flow_mask"][k0] == 1.0
  bg = 1  # (t=0, row 0, col 1): background: no colour / shape / motion target
  assert (t["kind"][bg], t["colour"][bg], t["motion"][bg], t["flow_mask"][bg]) == (0, -1, -1, 0)


def test_token_targets_benchmark_label_distractor_and_resize():
  # A benchmark clip (label, no motion key) 112 x 56 px resized to a 4 x 8 patch grid of a
  # 56 x 112 frame (sx = 1, sy = 0.5); a growing object and one still distractor.
  meta = dict(height=112, width=112, frames=4, label="growing", colour="blue", shape="circle",
              start=[20.0, 20.0, 4.0], end=[20.0, 20.0, 8.0],
              distractor_objects=[dict(shape="triangle", colour="green", x=90.0, y=90.0,
                                       size=6.0, angle=0.0)])
  t = tp.token_targets(meta, np.array([0, 1, 2, 3]), (2, 8, 8), patch=7)
  # patch 7 on purpose: grid 8 x 8 of 7 px = 56 px frame, sx = sy = 0.5; cells of 14 px.
  rows = cols = 4
  k = lambda tt, r, c: (tt * rows + r) * cols + c
  # object centre (10, 10) in resized px: cell (0, 0); distractor (45, 45): cell (3, 3)
  assert t["kind"][k(0, 0, 0)] == 1 and t["motion"][k(0, 0, 0)] == tp.MOTIONS.index("growing")
  assert t["kind"][k(0, 3, 3)] == 2
  assert t["colour"][k(0, 3, 3)] == tp.COLOURS.index("green")
  assert t["motion"][k(0, 3, 3)] == tp.MOTIONS.index("still")
  assert t["flow_mask"][k(0, 3, 3)] == 0.0
  # size 4 -> 4 + 4/3 between frames 0 and 1: 10 * log(16/3 / 4)
  np.testing.assert_allclose(t["flow"][k(0, 0, 0), 2], 10 * np.log((4 + 4 / 3) / 4), rtol=1e-5)


def test_ridge_probe_separates_linear_classes():
  rng = np.random.default_rng(0)
  y = ["a", "b"] * 50
  x = rng.normal(0, 1, (100, 3))
  x[:, 0] += np.where(np.array(y) == "a", 3.0, -3.0)
  assert tp.ridge_probe(x[:80], y[:80], x[80:], y[80:]) == 1.0
  # the same features with the labels shuffled: no better than chance by much
  shuffled = list(np.random.default_rng(1).permutation(y))
  assert tp.ridge_probe(x[:80], shuffled[:80], x[80:], shuffled[80:]) < 0.8
