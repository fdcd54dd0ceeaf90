"""A generated open-instance video benchmark: classes defined by what happens over time.

    python -m deepintuit_jax.data.synthetic --out DIR [--seed 0] [--num_train 300] ...

writes real mp4 files (OpenCV, fourcc 'mp4v') and release-format annotations:

    DIR/classes.json        the class file in the release's format (label -> [policy dict])
    DIR/train.json          teacher traces (three-step shape) from the generator's ground truth
    DIR/test_close.json     bare labels; instances from the training distribution
    DIR/test_open.json      bare labels; instances never seen in training (see below)
    DIR/info.json           the generator's settings and attribute pools per split
    DIR/videos/<split>/<item_id>.mp4

Six classes (single lowercase tokens): moving_left, moving_right, moving_up, moving_down
(the object travels, keeping its size) and growing, shrinking (it stays in place and changes
size). Inside each class: shape, colour, size, rotation, speed, start position, background
texture and tint, distractor objects, pixel noise, frame count (8-16) and resolution (48-96 px
sides) all vary. The open split draws shapes, colours, backgrounds, distractor behaviours and
speeds from pools disjoint from training (`POOLS`): ring/cross/star vs circle/square/triangle;
orange/purple/cyan/pink vs red/green/blue/yellow; stripes/checker vs plain/gradient/grid;
jittering/blinking distractors vs none/static; distances of 12-18% or 55-65% of the frame
(scale factors 1.45-1.6 or 2.9-3.4) vs 25-45% (1.8-2.6).

Determinism: every item draws from its own `np.random.default_rng([seed, split, index])`, so
the same seed gives the same annotation bytes, and split prefixes do not depend on the split
sizes. The mp4 bytes were also checked to be identical across runs with OpenCV 5.0 (its mp4
muxer writes no timestamp); other OpenCV/FFmpeg builds may differ in the container bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence

import cv2
import numpy as np

from deepintuit_jax.data import prompts

# Bump when the generated files change for the same arguments (cache keys can include it).
VERSION = 2
CLASSES = {
    "moving_left": "An object travels towards the left of the frame, keeping its size.",
    "moving_right": "An object travels towards the right of the frame, keeping its size.",
    "moving_up": "An object travels towards the top of the frame, keeping its size.",
    "moving_down": "An object travels towards the bottom of the frame, keeping its size.",
    "growing": "An object stays in place and becomes larger.",
    "shrinking": "An object stays in place and becomes smaller.",
}
_CODES = {"moving_left": "ML01", "moving_right": "MR01", "moving_up": "MU01",
          "moving_down": "MD01", "growing": "GR01", "shrinking": "SH01"}
COLOURS = {  # RGB; saturated, far from the grey backgrounds and from each other
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
    "yellow": (230, 210, 40), "orange": (245, 140, 20), "purple": (150, 50, 200),
    "cyan": (40, 210, 210), "pink": (240, 100, 180)}
POOLS = {
    "train": dict(shapes=("circle", "square", "triangle"),
                  colours=("red", "green", "blue", "yellow"),
                  backgrounds=("plain", "gradient", "grid"),
                  distractors=("none", "static"),
                  distance=((0.25, 0.45),), scale=((1.8, 2.6),)),
    "open": dict(shapes=("ring", "cross", "star"),
                 colours=("orange", "purple", "cyan", "pink"),
                 backgrounds=("stripes", "checker"),
                 distractors=("jittering", "blinking"),
                 distance=((0.12, 0.18), (0.55, 0.65)), scale=((1.45, 1.6), (2.9, 3.4))),
}
SPLITS = (("train", "train"), ("test_close", "train"), ("test_open", "open"))
SIDES = (48, 64, 80, 96)
_SHIFT = 4  # cv2 sub-pixel drawing: coordinates in 1/16 px
# Smallest half-extent in px: thinner shapes lose their colour to mp4's 4:2:0 chroma.
_MIN_SIZE = 4.5
# The container's frame rate. Qwen2.5-VL's temporal rope position of a grid step is
# t * (temporal_patch / fps) * tokens_per_second (2), truncated to an integer: at 8 fps the
# steps are 0.5 apart and neighbours share a position (4 steps of 8 frames -> 3 positions,
# measured); at 2 fps they are 2 apart, as for real videos sampled at Qwen's usual 2 fps.
FPS = 2.0
MOVING_SIZE = (0.08, 0.13)  # half-extent of a travelling object, x min(h, w)
SCALING_SIZE = (0.06, 0.08)  # smallest half-extent of a growing / shrinking one


# ----------------------------------------------------------------------------- drawing
def _shape_points(shape: str, cx: float, cy: float, s: float, angle: float) -> list[np.ndarray]:
  """Polygons (float [K, 2] x, y) of a filled shape of half-extent `s` centred at (cx, cy)."""
  if shape == "square":
    pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
  elif shape == "triangle":
    pts = [(math.cos(a) * 1.2, math.sin(a) * 1.2) for a in np.deg2rad([-90, 30, 150])]
  elif shape == "star":
    pts = [((1.25 if k % 2 == 0 else 0.5) * math.cos(a), (1.25 if k % 2 == 0 else 0.5) *
            math.sin(a)) for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))]
  elif shape == "cross":
    w = 0.42
    bars = [[(-1, -w), (1, -w), (1, w), (-1, w)], [(-w, -1), (w, -1), (w, 1), (-w, 1)]]
    return [_place(np.array(b, float), cx, cy, s, angle) for b in bars]
  else:
    raise ValueError(f"unknown polygon shape {shape!r}")
  return [_place(np.array(pts, float), cx, cy, s, angle)]


def _place(unit: np.ndarray, cx: float, cy: float, s: float, angle: float) -> np.ndarray:
  c, si = math.cos(angle), math.sin(angle)
  rot = unit @ np.array([[c, si], [-si, c]])
  return rot * s + np.array([cx, cy])


def _draw(img: np.ndarray, shape: str, colour: tuple[int, int, int], cx: float, cy: float,
          s: float, angle: float) -> None:
  """Draws one shape into `img` (uint8 RGB [H, W, 3]) in place, anti-aliased, sub-pixel."""
  k = 1 << _SHIFT
  if shape in ("circle", "ring"):
    centre, r = (int(round(cx * k)), int(round(cy * k))), int(round(s * k))
    thick = -1 if shape == "circle" else max(2, int(round(0.4 * s)))
    cv2.circle(img, centre, r if shape == "circle" else int(round(s * 0.8 * k)), colour, thick,
               cv2.LINE_AA, _SHIFT)
    return
  for p in _shape_points(shape, cx, cy, s, angle):  # one call each: fillPoly is even-odd
    cv2.fillPoly(img, [np.round(p * k).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
  """A grey-ish, low-saturation background (uint8 RGB [H, W, 3])."""
  base = rng.uniform(70, 170)
  tint = rng.uniform(-12, 12, 3)
  lo, hi = base - rng.uniform(15, 35), base + rng.uniform(15, 35)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  if kind == "plain":
    val = np.full((h, w), base, np.float32)
  elif kind == "gradient":
    a = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(a) + yy * math.sin(a))
    val = lo + (hi - lo) * (t - t.min()) / max(float(np.ptp(t)), 1.0)
  elif kind == "grid":
    step = int(rng.integers(8, 16))
    val = np.where((xx.astype(int) % step == 0) | (yy.astype(int) % step == 0), hi, lo)
  elif kind == "stripes":
    a, period = rng.uniform(0, math.pi), rng.uniform(6, 14)
    val = np.where(np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0,
                   hi, lo)
  elif kind == "checker":
    step = int(rng.integers(5, 12))
    val = np.where(((xx.astype(int) // step) + (yy.astype(int) // step)) % 2 == 0, hi, lo)
  else:
    raise ValueError(f"unknown background {kind!r}")
  img = val[..., None] + tint[None, None, :]
  return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes
def _pick(rng: np.random.Generator, ranges: Sequence[tuple[float, float]]) -> float:
  lo, hi = ranges[int(rng.integers(len(ranges)))]
  return float(rng.uniform(lo, hi))


def sample_scene(rng: np.random.Generator, label: str, pool: str, *,
                 min_frames: int = 8, max_frames: int = 16,
                 sides: Sequence[int] = SIDES) -> dict:
  """The ground truth of one clip: attributes and per-frame centre/size of the object."""
  p = POOLS[pool]
  h, w = int(rng.choice(sides)), int(rng.choice(sides))
  t = int(rng.integers(min_frames, max_frames + 1))
  m = min(h, w)
  scene = dict(label=label, pool=pool, height=h, width=w, frames=t,
               shape=str(rng.choice(p["shapes"])), colour=str(rng.choice(p["colours"])),
               background=str(rng.choice(p["backgrounds"])),
               distractor=str(rng.choice(p["distractors"])),
               angle=float(rng.uniform(0, 2 * math.pi)), noise=float(rng.uniform(0, 6)))
  if label.startswith("moving_"):
    dist = _pick(rng, p["distance"])
    dx, dy = {"moving_left": (-1, 0), "moving_right": (1, 0), "moving_up": (0, -1),
              "moving_down": (0, 1)}[label]
    extent = w if dx else h  # the path and the object's margins must fit along the motion
    s = min(max(float(rng.uniform(*MOVING_SIZE)) * m, _MIN_SIZE),
            ((1 - dist) * extent - 2.5) / 2.6)
    span_x, span_y = dist * w * abs(dx), dist * h * abs(dy)
    margin = 1.3 * s + 1
    x0 = rng.uniform(margin + (span_x if dx < 0 else 0), w - margin - (span_x if dx > 0 else 0))
    y0 = rng.uniform(margin + (span_y if dy < 0 else 0), h - margin - (span_y if dy > 0 else 0))
    x1, y1 = x0 + dx * span_x, y0 + dy * span_y
    s0 = s1 = s
    scene.update(distance=round(dist, 4))
  else:
    factor = _pick(rng, p["scale"])
    small = max(float(rng.uniform(*SCALING_SIZE)) * m, _MIN_SIZE)
    big = small * factor
    s0, s1 = (small, big) if label == "growing" else (big, small)
    margin = 1.3 * big + 1
    x0 = x1 = float(rng.uniform(margin, w - margin)) if w > 2 * margin else w / 2
    y0 = y1 = float(rng.uniform(margin, h - margin)) if h > 2 * margin else h / 2
    scene.update(scale=round(factor, 4))
  f = np.linspace(0.0, 1.0, t)
  scene.update(x=(x0 + (x1 - x0) * f).round(3).tolist(), y=(y0 + (y1 - y0) * f).round(3).tolist(),
               size=(s0 + (s1 - s0) * f).round(3).tolist())
  # Distractors never travel or change size: static, jittering in place, or blinking.
  if scene["distractor"] != "none":
    colours = [c for c in p["colours"] if c != scene["colour"]]
    scene["distractor_objects"] = [dict(
        shape=str(rng.choice(p["shapes"])), colour=str(rng.choice(colours)),
        x=float(rng.uniform(0.15, 0.85) * w), y=float(rng.uniform(0.15, 0.85) * h),
        size=max(float(rng.uniform(0.05, 0.09) * m), _MIN_SIZE - 1),
        angle=float(rng.uniform(0, 2 * math.pi)),
        phase=int(rng.integers(0, 2)))
        for _ in range(int(rng.integers(1, 3)))]
  scene["seed_noise"] = int(rng.integers(0, 2**31 - 1))
  scene["seed_background"] = int(rng.integers(0, 2**31 - 1))
  return scene


def render(scene: dict) -> np.ndarray:
  """The clip of a scene: uint8 RGB [T, H, W, 3]."""
  h, w, t = scene["height"], scene["width"], scene["frames"]
  bg = _background(np.random.default_rng(scene["seed_background"]), scene["background"], h, w)
  noise_rng = np.random.default_rng(scene["seed_noise"])
  frames = np.empty((t, h, w, 3), np.uint8)
  for i in range(t):
    img = bg.copy()
    for d in scene.get("distractor_objects", ()):
      dx = dy = 0.0
      if scene["distractor"] == "jittering":
        dx, dy = (0.08 * d["size"] * np.array([math.sin(2.3 * i + d["phase"]),
                                               math.cos(1.7 * i)]) * 4).tolist()
      if scene["distractor"] == "blinking" and (i + d["phase"]) % 2 == 1:
        continue
      _draw(img, d["shape"], COLOURS[d["colour"]], d["x"] + dx, d["y"] + dy, d["size"],
            d["angle"])
    _draw(img, scene["shape"], COLOURS[scene["colour"]], scene["x"][i], scene["y"][i],
          scene["size"][i], scene["angle"])
    if scene["noise"] > 0:
      img = np.clip(img + noise_rng.normal(0, scene["noise"], img.shape), 0, 255)
    frames[i] = img.astype(np.uint8)
  return frames


def write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
  """Writes uint8 RGB [T, H, W, 3] with OpenCV's 'mp4v' and checks the frame count back."""
  t, h, w, _ = frames.shape
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
  if not writer.isOpened():
    raise RuntimeError(f"OpenCV cannot write mp4v video {path!r} (no FFmpeg backend?)")
  for f in frames:
    writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  writer.release()
  cap = cv2.VideoCapture(path)
  n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
  cap.release()
  if n != t:
    raise RuntimeError(f"{path!r}: wrote {t} frames but OpenCV reports {n}")


# ----------------------------------------------------------------------------- traces
def _where(x: float, y: float, w: int, h: int) -> str:
  col = "left" if x < w / 3 else "right" if x > 2 * w / 3 else "centre"
  row = "top" if y < h / 3 else "bottom" if y > 2 * h / 3 else "middle"
  return "centre" if (col, row) == ("centre", "middle") else (
      col if row == "middle" else row if col == "centre" else f"{row} {col}")


def teacher_trace_for(scene: dict) -> str:
  """A short three-step trace (about 60 words) written from the scene's ground truth."""
  label, w, h = scene["label"], scene["width"], scene["height"]
  obj = f"{scene['colour']} {scene['shape']}"
  bg = f"{scene['background']} background"
  start = _where(scene["x"][0], scene["y"][0], w, h)
  if label.startswith("moving_"):
    axis = {"moving_left": "x", "moving_right": "x"}.get(label, "y")
    a0, a1, extent = scene[axis][0], scene[axis][-1], (w if axis == "x" else h)
    ends = {"x": ("left", "right"), "y": ("top", "bottom")}[axis]
    frm = ends[0] if a0 < a1 else ends[1]
    to = ends[1] if a0 < a1 else ends[0]
    what = f"moves from the {frm} to the {to}, same size"
    pct = round(100 * abs(a1 - a0) / extent)
    evidence = {label: f"it moves {pct}% of the frame {to}"}
    for other in CLASSES:
      if other == label:
        continue
      if other.startswith("moving_"):
        same_axis = {"moving_left": "x", "moving_right": "x"}.get(other, "y") == axis
        evidence[other] = (f"it goes {to}" if same_axis else "same height"
                           if axis == "x" else "same left-right position")
      else:
        evidence[other] = "same size"
  else:
    factor = scene["scale"]
    what = (f"stays near the {start} and grows to about {factor:.1f} times its size"
            if label == "growing" else
            f"stays near the {start} and shrinks to about 1/{factor:.1f} of its size")
    evidence = {label: f"it gets about {factor:.1f} times {'bigger' if label == 'growing' else 'smaller'}"}
    for other in CLASSES:
      if other != label:
        evidence[other] = ("it stays in place" if other.startswith("moving_") else
                           "it gets bigger" if label == "growing" else "it gets smaller")
  others = ""
  if scene["distractor"] != "none":
    d = scene["distractor_objects"][0]
    verb = {"static": "stays still", "jittering": "jitters in place",
            "blinking": "blinks on and off"}[scene["distractor"]]
    others = f" A {d['colour']} {d['shape']} {verb}."
  summary = f"A {obj} on a {bg} {what}.{others}"
  checks = [(c, c == label, evidence[c]) for c in CLASSES]
  verify = f"Only {label} fits the {obj}."
  return prompts.teacher_trace(summary, checks, verify, label)


# ----------------------------------------------------------------------------- files
def class_file_entries() -> dict:
  """The class file in the release's format (label -> [policy dict])."""
  return {label: [{"Policy Code": [_CODES[label]], "Policy Token": label, "need_text": False,
                   "need_market_code": False, "playbook_rule": [d], "prompt": d}]
          for label, d in CLASSES.items()}


def _record(item_id: str, index: int, video: str, scene: dict, split: str,
            compact: bool) -> dict:
  label = scene["label"]
  title = f"clip {index:05d}"  # neutral: names neither the label nor the split
  prompt = prompts.classification_prompt(CLASSES, title=title, transcript="No speech.",
                                         sticker="", compact=compact)
  response = teacher_trace_for(scene) if split == "train" else label
  meta = {k: v for k, v in scene.items() if k not in ("x", "y", "size") and
          not k.startswith("seed_")}
  meta.update(start=[scene["x"][0], scene["y"][0], scene["size"][0]],
              end=[scene["x"][-1], scene["y"][-1], scene["size"][-1]])
  return {"item_id": item_id,
          "conversations": [
              {"role": "user", "content": [{"type": "video", "video": video},
                                           {"type": "text", "text": prompt}]},
              {"role": "assistant", "content": response}],
          "policy_title": label, "anno_label": list(CLASSES).index(label),
          "reward_label": label, "title": title, "asr_text": "No speech.", "sticker": "None",
          "synthetic": meta}


def _label_for(seed: int, split_idx: int, i: int) -> str:
  """Balanced labels: each block of len(CLASSES) items is a seeded permutation of them."""
  labels = list(CLASSES)
  perm = np.random.default_rng([seed, split_idx, 1_000_000 + i // len(labels)]).permutation(
      len(labels))
  return labels[int(perm[i % len(labels)])]


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 300,
             num_test: int = 72, min_frames: int = 8, max_frames: int = 16, fps: float = FPS,
             sides: Sequence[int] = SIDES, compact: bool = True) -> dict[str, str]:
  """Writes the benchmark under `out_dir`; returns {split: annotation path, "classes": path}.

  `num_test` items go to each of test_close and test_open. Video paths in the annotations
  are relative to `out_dir` (pass it as the video root).
  """
  if min_frames < 2 or max_frames < min_frames:
    raise ValueError(f"need 2 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
  if any(s % 16 or s < 32 for s in sides):
    raise ValueError(f"sides must be multiples of 16 and >= 32 (mp4v), got {sides}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  sizes = {"train": num_train, "test_close": num_test, "test_open": num_test}
  paths = {}
  for split_idx, (split, pool) in enumerate(SPLITS):
    os.makedirs(os.path.join(out_dir, "videos", split), exist_ok=True)
    records = []
    for i in range(sizes[split]):
      item_id = f"{split}_{i:05d}"
      rng = np.random.default_rng([seed, split_idx, i])
      scene = sample_scene(rng, _label_for(seed, split_idx, i), pool, min_frames=min_frames,
                           max_frames=max_frames, sides=sides)
      video = f"videos/{split}/{item_id}.mp4"
      write_mp4(os.path.join(out_dir, video), render(scene), fps)
      records.append(_record(item_id, i, video, scene, split, compact))
    paths[split] = _write_json(os.path.join(out_dir, f"{split}.json"), records)
  paths["classes"] = _write_json(os.path.join(out_dir, "classes.json"), class_file_entries())
  _write_json(os.path.join(out_dir, "info.json"), dict(
      seed=seed, sizes=sizes, min_frames=min_frames, max_frames=max_frames, fps=fps,
      sides=list(sides), compact_prompt=compact, classes=CLASSES,
      pools={split: POOLS[pool] for split, pool in SPLITS}))
  return paths


def _write_json(path: str, obj) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
    f.write("\n")
  return path


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output folder")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_train", type=int, default=300)
  ap.add_argument("--num_test", type=int, default=72, help="items in each test split")
  ap.add_argument("--min_frames", type=int, default=8)
  ap.add_argument("--max_frames", type=int, default=16)
  ap.add_argument("--fps", type=float, default=FPS)
  ap.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
  ap.add_argument("--full_prompt", action="store_true", help="the long prompt, not compact")
  a = ap.parse_args(argv)
  t0 = time.time()
  paths = generate(a.out, seed=a.seed, num_train=a.num_train, num_test=a.num_test,
                   min_frames=a.min_frames, max_frames=a.max_frames, fps=a.fps, sides=a.sides,
                   compact=not a.full_prompt)
  print(json.dumps(paths, indent=1))
  print(f"wrote the benchmark to {a.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
