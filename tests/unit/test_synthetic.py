"""The generated benchmark: determinism, real decodable mp4s, motion that matches the label
(tracked by colour in the decoded frames, independently of the generator), disjoint open
attributes, and files that the annotation readers accept."""
from __future__ import annotations

import filecmp
import json
import os

import cv2
import numpy as np
import pytest

from deepintuit_jax.data import annotations as A
from deepintuit_jax.data import prompts
from deepintuit_jax.data import synthetic as S

N_TRAIN, N_TEST = 12, 12
SPLITS = ("train", "test_close", "test_open")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  paths = S.generate(out, seed=3, num_train=N_TRAIN, num_test=N_TEST)
  return str(out), paths


def _decode(path: str) -> np.ndarray:
  cap = cv2.VideoCapture(path)
  frames = []
  while True:
    ok, f = cap.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
  cap.release()
  return np.stack(frames)


def _raw(bench, split):
  with open(bench[1][split]) as f:
    return json.load(f)


def test_paths_and_determinism(bench, tmp_path):
  out, paths = bench
  assert set(paths) == {"train", "test_close", "test_open", "classes"}
  again = S.generate(tmp_path / "again", seed=3, num_train=N_TRAIN, num_test=N_TEST)
  for key in paths:
    with open(paths[key], "rb") as a, open(again[key], "rb") as b:
      assert a.read() == b.read(), key
  for split in SPLITS:  # same OpenCV build, same process: the mp4 bytes are identical too
    d1, d2 = os.path.join(out, "videos", split), str(tmp_path / "again" / "videos" / split)
    names = sorted(os.listdir(d1))
    assert names == sorted(os.listdir(d2)) and len(names) == (N_TRAIN if split == "train"
                                                              else N_TEST)
    _, mismatch, errors = filecmp.cmpfiles(d1, d2, names, shallow=False)
    assert not mismatch and not errors
  other = S.generate(tmp_path / "other", seed=4, num_train=N_TRAIN, num_test=0)
  with open(other["train"], "rb") as a, open(paths["train"], "rb") as b:
    assert a.read() != b.read()


def test_prefix_does_not_depend_on_size(bench, tmp_path):
  small = S.generate(tmp_path, seed=3, num_train=5, num_test=2)
  for split, n in (("train", 5), ("test_open", 2)):
    with open(small[split]) as f:
      assert json.load(f) == _raw(bench, split)[:n]


def test_readers_accept_outputs(bench):
  out, paths = bench
  classes = A.load_class_file(paths["classes"])
  assert classes == S.CLASSES
  for split in SPLITS:
    recs = A.load_records(paths[split], labels=list(classes))
    assert len(recs) == (N_TRAIN if split == "train" else N_TEST)
    assert A.labels_from_records(recs) == list(S.CLASSES)  # 12 items: every class, twice
    counts = {c: sum(r.label == c for r in recs) for c in classes}
    assert set(counts.values()) == {2}
    for r in recs:
      assert os.path.isfile(A.resolve_video_path(r.video, out, item_id=r.item_id))
      assert r.label_index == list(classes).index(r.label)
      materials = r.prompt.split("Title:")[1]
      assert materials.startswith(" clip " + r.item_id.rsplit("_", 1)[1])
      for word in list(classes) + ["train", "test", "open", "close"]:
        assert word not in materials  # the materials leak neither the label nor the split
      if split == "train":
        assert prompts.is_well_formatted(r.response)
        assert prompts.answer_matches(r.response, r.label)
        assert 40 <= len(r.response.split()) <= 90
        for c in classes:
          assert f"{c}: {'Yes' if c == r.label else 'No'}" in r.response
      else:
        assert r.response == r.label


def test_videos_decode_to_declared_shape(bench):
  out, _ = bench
  for split in SPLITS:
    for rec in _raw(bench, split):
      meta = rec["synthetic"]
      frames = _decode(os.path.join(out, rec["conversations"][0]["content"][0]["video"]))
      assert frames.shape == (meta["frames"], meta["height"], meta["width"], 3)
      assert 8 <= meta["frames"] <= 16 and meta["height"] in S.SIDES


def _track(frames: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
  """Centroid [T, 2] (x, y) and radius of gyration [T] of the pixels close to colour `rgb`.

  The radius of gyration scales linearly with the object's size for filled and hollow
  shapes alike (the area of a ring with a fixed rim would not).
  """
  dist = np.linalg.norm(frames.astype(np.float32) - np.array(rgb, np.float32), axis=-1)
  mask = dist < 60
  area = mask.sum(axis=(1, 2)).astype(np.float64)
  assert area.min() > 3, "object not visible"
  ys, xs = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
  cx = (mask * xs).sum(axis=(1, 2)) / area
  cy = (mask * ys).sum(axis=(1, 2)) / area
  var = (mask * ((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2)).sum(
      axis=(1, 2)) / area
  return np.stack([cx, cy], 1), np.sqrt(var)


def _fit_ends(v: np.ndarray) -> np.ndarray:
  """Least-squares line through v [T, ...] over time, evaluated at the first and last frame
  (robust to one badly coded frame)."""
  t = np.linspace(0.0, 1.0, len(v))
  coef = np.polyfit(t, v.reshape(len(v), -1), 1)  # [2, K]
  return np.stack([coef[1], coef[0] + coef[1]]).reshape((2,) + v.shape[1:])


def _check_motion(frames: np.ndarray, meta: dict, where: str, tol_px: float, tol_log: float):
  c, radius = _track(frames, S.COLOURS[meta["colour"]])
  c_ends, r_ends = _fit_ends(c), np.exp(_fit_ends(np.log(radius)))
  (dx, dy), growth = c_ends[1] - c_ends[0], r_ends[1] / r_ends[0]
  label, w, h = meta["label"], meta["width"], meta["height"]
  where += f" dx={dx:.1f} dy={dy:.1f} growth={growth:.2f}"
  # The measured centre agrees with the generator's ground truth.
  assert np.abs(c_ends[0] - meta["start"][:2]).max() < tol_px, where
  assert np.abs(c_ends[1] - meta["end"][:2]).max() < tol_px, where
  if label.startswith("moving_"):
    assert abs(np.log(growth)) < tol_log, where
    along, across, extent = {"moving_left": (-dx, dy, w), "moving_right": (dx, dy, w),
                             "moving_up": (-dy, dx, h), "moving_down": (dy, dx, h)}[label]
    assert along > 0.1 * extent and abs(across) < tol_px, where
    assert abs(along / extent - meta["distance"]) < tol_px / extent, where
  else:
    assert np.abs(c_ends[1] - c_ends[0]).max() < tol_px, where
    want = meta["scale"] if label == "growing" else 1 / meta["scale"]
    assert growth > 1.2 if label == "growing" else growth < 1 / 1.2, where
    assert abs(np.log(growth / want)) < tol_log, where


def test_rendered_geometry_follows_ground_truth():
  """Noise-free rendering (no codec): the tracked object follows the ground truth closely."""
  for pool in ("train", "open"):
    for k, label in enumerate(S.CLASSES):
      for j in range(3):
        scene = S.sample_scene(np.random.default_rng([99, k, j, pool == "open"]), label, pool)
        scene["noise"] = 0.0
        meta = dict(scene, start=[scene["x"][0], scene["y"][0]],
                    end=[scene["x"][-1], scene["y"][-1]])
        # Size is measured on a few-pixel shape with an anti-aliased rim: within ~18%.
        _check_motion(S.render(scene), meta, f"{pool} {label} #{j}", 0.6, 0.18)


def test_object_moves_as_labelled(bench):
  """Decoded mp4s (4:2:0 chroma, lossy): looser tolerances."""
  out, _ = bench
  for split in SPLITS:
    for rec in _raw(bench, split):
      frames = _decode(os.path.join(out, rec["conversations"][0]["content"][0]["video"]))
      _check_motion(frames, rec["synthetic"], rec["item_id"], 1.5, 0.25)


def test_open_attributes_disjoint_from_train(bench):
  train, close, open_ = (_raw(bench, s) for s in SPLITS)
  for key in ("shape", "colour", "background", "distractor"):
    seen = {r["synthetic"][key] for r in train + close}
    new = {r["synthetic"][key] for r in open_}
    assert not seen & new, key
    assert seen <= set(S.POOLS["train"][key + "s"]) and new <= set(S.POOLS["open"][key + "s"])
  for r in train + close:
    m = r["synthetic"]
    assert 0.25 <= m["distance"] <= 0.45 if "distance" in m else 1.8 <= m["scale"] <= 2.6
  for r in open_:
    m = r["synthetic"]
    if "distance" in m:
      assert m["distance"] < 0.2 or m["distance"] > 0.5
    else:
      assert m["scale"] <= 1.6 or m["scale"] >= 2.9
  for r in train + close + open_:  # distractors never share the target's colour
    for d in r["synthetic"].get("distractor_objects", []):
      assert d["colour"] != r["synthetic"]["colour"]


def test_cli(tmp_path, capsys):
  S.main(["--out", str(tmp_path), "--num_train", "2", "--num_test", "1", "--seed", "1"])
  assert "wrote the benchmark" in capsys.readouterr().out
  assert len(A.load_records(tmp_path / "train.json")) == 2
  assert len(A.load_records(tmp_path / "test_open.json")) == 1
  with pytest.raises(ValueError, match="sides"):
    S.generate(tmp_path / "x", sides=(50,))


def test_frame_rate_gives_distinct_temporal_rope_positions(bench):
  """Qwen2.5-VL's temporal rope position of grid step t is int(t * (2 / fps) * 2); the
  container's rate must keep the 4 steps of 8 sampled frames apart (at 8 fps they collide)."""
  out, _ = bench
  rec = _raw(bench, "train")[0]
  cap = cv2.VideoCapture(os.path.join(out, rec["conversations"][0]["content"][0]["video"]))
  fps = cap.get(cv2.CAP_PROP_FPS)
  cap.release()
  assert fps == pytest.approx(S.FPS)
  positions = [int(t * (2 / fps) * 2) for t in range(4)]
  assert positions == [0, 2, 4, 6]
  assert len({int(t * (2 / 8.0) * 2) for t in range(4)}) < 4  # why not 8 fps
