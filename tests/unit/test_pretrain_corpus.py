"""The tiny base's pretraining corpus: determinism, pools disjoint from the benchmark's
open-instance pools, and every answer's facts read back from the rendered pixels."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from deepintuit_jax.data import synthetic as S
from tools import tiny_base_corpus as C

ALL_COLOURS = {**S.COLOURS, **C.COLOURS}


def _scenes(n: int, seed: int = 3):
  return [C.clip(seed, "corpus", i) for i in range(n)]


def test_same_seed_same_scenes_other_seed_differs():
  a, b = _scenes(24), _scenes(24)
  assert json.dumps(a) == json.dumps(b)
  c = [C.clip(4, "corpus", i) for i in range(24)]
  assert json.dumps(a) != json.dumps(c)
  # Every motion appears in each block of len(MOTIONS) clips (balanced).
  assert sorted(s["motion"] for s, _ in a[:len(C.MOTIONS)]) == sorted(C.MOTIONS)


def test_generate_is_deterministic(tmp_path):
  p1 = C.generate(tmp_path / "a", seed=5, num_clips=6, num_heldout=2, min_frames=4,
                  max_frames=5)
  p2 = C.generate(tmp_path / "b", seed=5, num_clips=6, num_heldout=2, min_frames=4,
                  max_frames=5)
  for split in ("corpus", "heldout"):
    assert open(p1[split], "rb").read() == open(p2[split], "rb").read()
  recs = json.load(open(p1["heldout"]))
  assert len(recs) == 2 * len(C.HELDOUT_REQUESTS)
  assert (tmp_path / "a" / recs[0]["conversations"][0]["content"][0]["video"]).is_file()


def test_pools_disjoint_from_open_and_broader_than_train():
  o, t = S.POOLS["open"], S.POOLS["train"]
  for key in ("shapes", "colours", "backgrounds", "distractors"):
    assert not set(C.POOLS[key]) & set(o[key]), key
  for key in ("shapes", "colours", "backgrounds"):
    assert set(t[key]) < set(C.POOLS[key]), key
  for key in ("distance", "scale"):
    lo, hi = C.POOLS[key]
    assert all(hi < a or lo > b for a, b in o[key]), key
    assert all(lo <= a and b <= hi for a, b in t[key]), key  # covers the train range
  # New colours are far (RGB) from every open colour: no near-duplicate leaks.
  for name, rgb in C.NEW_COLOURS.items():
    for other in o["colours"]:
      assert np.linalg.norm(np.subtract(rgb, S.COLOURS[other])) > 90, (name, other)
  # Motions beyond the benchmark's six classes.
  assert {"still", "spinning", "up_left", "down_right"} <= set(C.MOTIONS)


def test_sampled_scenes_stay_in_the_pools():
  o = S.POOLS["open"]
  for scene, _ in _scenes(240):
    assert scene["shape"] in C.POOLS["shapes"] and scene["shape"] not in o["shapes"]
    assert scene["colour"] in C.POOLS["colours"] and scene["background"] in C.POOLS["backgrounds"]
    for d in scene.get("distractor_objects", ()):
      assert d["colour"] != scene["colour"] and d["colour"] not in o["colours"]
      assert d["shape"] not in o["shapes"]
    if "distance" in scene:
      assert 0.2 <= scene["distance"] <= 0.5
    if "scale" in scene:
      assert 1.7 <= scene["scale"] <= 2.8


def _region(x, y, w, h):
  """Independent transcription of the 3 x 3 region words."""
  col = "left" if x < w / 3 else ("right" if x > 2 * w / 3 else "centre")
  row = "top" if y < h / 3 else ("bottom" if y > 2 * h / 3 else "middle")
  if col == "centre" and row == "middle":
    return "centre"
  if row == "middle":
    return col
  if col == "centre":
    return row
  return f"{row} {col}"


def _near_border(x, y, w, h, tol=2.5):
  return any(abs(x - k * w / 3) < tol for k in (1, 2)) or any(
      abs(y - k * h / 3) < tol for k in (1, 2))


def _object_track(scene):
  """Per frame (centroid x, y, area, mask) of the main object, found in the pixels: the
  clip rendered without noise and distractors minus its background."""
  clean = dict(scene, noise=0.0)
  clean.pop("distractor_objects", None)
  frames = C.render(clean).astype(np.int32)
  bg = C.background(np.random.default_rng(scene["seed_background"]), scene["background"],
                    scene["height"], scene["width"]).astype(np.int32)
  out = []
  for f in frames:
    mask = np.abs(f - bg).max(-1) > 10
    yy, xx = np.nonzero(mask)
    out.append((xx.mean(), yy.mean(), mask.sum(), mask, f))
  return out


def test_answers_match_the_pixels():
  checked = 0
  for scene, _ in _scenes(96, seed=11):
    ans = C.answers(scene)
    w, h = scene["width"], scene["height"]
    track = _object_track(scene)
    (x0, y0, a0, m0, f0), (x1, y1, a1, m1, _) = track[0], track[-1]
    # Colour: the median colour of the object's core pixels is nearest the named colour.
    core = m0 & (np.abs(f0 - np.median(f0[m0], 0)).max(-1) < 40)
    rgb = np.median(f0[core], 0)
    nearest = min(ALL_COLOURS, key=lambda c: np.linalg.norm(rgb - np.array(ALL_COLOURS[c])))
    assert ans["colour"] == f"It is {nearest}.", (scene["motion"], rgb)
    desc = ans["describe"]
    assert re.match(rf"An? {nearest} {scene['shape']} on an? {scene['background']} background ",
                    desc), desc
    # Motion: displacement and size change of the pixel blob.
    dx, dy = (x1 - x0) / w, (y1 - y0) / h
    ratio = a1 / a0
    if abs(dx) > 0.1 or abs(dy) > 0.1:
      way = " and ".join(([("up" if dy < 0 else "down")] if abs(dy) > 0.1 else []) +
                         ([("left" if dx < 0 else "right")] if abs(dx) > 0.1 else []))
      assert f"moves {way}," in desc and ans["direction"] == f"It moves {way}.", desc
      assert 0.8 < ratio < 1.25 and "keeping its size" in desc
      assert ("a long way" if max(abs(dx), abs(dy)) >= 0.35 else "a short way") in desc or (
          abs(max(abs(dx), abs(dy)) - 0.35) < 0.03)
    else:
      assert "moves" not in desc and "does not move" in ans["direction"], desc
      if ratio > 2.0:
        assert " grows to about " in desc and ans["size"].startswith("Yes")
      elif ratio < 0.5:
        assert " shrinks to about " in desc and ans["size"].startswith("Yes")
      else:
        assert "stays still" in desc and ans["size"].startswith("No")
        if "spins" not in desc:  # still: the same pixels at the start and the end
          assert (m0 & m1).sum() / (m0 | m1).sum() > 0.95
    # Where it starts and ends (skipped within 2.5 px of a region border).
    for (x, y, *_), key in ((track[0], "start"), (track[-1], "end")):
      if not _near_border(x, y, w, h):
        assert ans[key] == f"At the {_region(x, y, w, h)}.", (key, x, y, w, h)
        checked += 1
    others = scene.get("distractor_objects", ())
    assert ("Also: nothing else." in desc) == (not others)
    assert desc.split(" Also: ")[1].count(" at the ") == len(others)
  assert checked > 100  # most regions were checked (192 in all)


def test_unknown_motion_and_shape_raise():
  with pytest.raises(ValueError, match="unknown motion"):
    C.sample_scene(np.random.default_rng(0), "jumping")
  with pytest.raises(ValueError, match="unknown shape"):
    C.draw(np.zeros((8, 8, 3), np.uint8), "blob", (1, 2, 3), 4, 4, 2, 0)
