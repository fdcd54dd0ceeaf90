"""A generated pretraining corpus of described clips: the tiny base's "web video + captions".

    python -m tools.tiny_base_corpus --out DIR [--seed 0] [--num_clips 4000]

writes DIR/corpus.json (release-format records: user = video + a request, assistant = a
grounded answer), DIR/heldout.json (clips from the same pools, never trained on, to measure
the base) and DIR/videos/*.mp4, drawn with the benchmark's renderer (`synthetic`).

Every target token is grounded in the clip: the object's colour and shape, the background,
what it does (travels in one of 8 directions, stays still, grows, shrinks or spins), where
it starts and ends (3 x 3 regions), how far it goes or by how much its size changes, and
the still objects beside it. Requests: a full description (half of the records) or one
short question (which way / what colour / what shape / where it starts / where it ends /
does it change size / what else is there).

Appearance pools (`POOLS`) are broader than the benchmark's training pools and disjoint
from its open-instance pools (`synthetic.POOLS["open"]`, checked at import): the training
shapes plus diamond, hexagon, pentagon, ellipse, rectangle, semicircle; the training
colours plus white, lime, maroon, navy, olive; the training backgrounds plus dots, radial,
blotches; distractors none or still (1-3 of them); travel distances 20-50% of the frame and
size factors 1.7-2.8 (the open pools use 12-18% / 55-65% and 1.45-1.6 / 2.9-3.4). Motions:
the benchmark's six plus four diagonals, still and spinning, so the corpus is not the
benchmark's label set in disguise. Frame counts (8-16), sides (48-96 px), rotation and pixel
noise vary as in the benchmark.

Determinism: clip i draws from `np.random.default_rng([seed, 7, split, i])`, so the same
seed gives the same records (and, with the same OpenCV build, the same mp4 bytes).
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

from deepintuit_jax.data import synthetic

# Bump when the generated files change for the same arguments (cache keys can include it).
VERSION = 1
NEW_COLOURS = {"white": (238, 238, 238), "lime": (150, 235, 40), "maroon": (125, 20, 45),
               "navy": (25, 35, 125), "olive": (125, 125, 15)}
COLOURS = {**{c: synthetic.COLOURS[c] for c in synthetic.POOLS["train"]["colours"]},
           **NEW_COLOURS}
_TRAIN = synthetic.POOLS["train"]
POOLS = dict(
    shapes=tuple(_TRAIN["shapes"]) + ("diamond", "hexagon", "pentagon", "ellipse", "rectangle",
                                      "semicircle"),
    colours=tuple(COLOURS),
    backgrounds=tuple(_TRAIN["backgrounds"]) + ("dots", "radial", "blotches"),
    distractors=("none", "still"),
    distance=(0.20, 0.50), scale=(1.7, 2.8), turn=(90.0, 270.0))
DIRECTIONS = {  # motion -> (dx, dy) in image axes (y down)
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up_left": (-1, -1), "up_right": (1, -1), "down_left": (-1, 1), "down_right": (1, 1)}
MOTIONS = tuple(DIRECTIONS) + ("still", "growing", "shrinking", "spinning")
QUESTIONS = {
    "describe": "Describe the video.",
    "direction": "Which way does the main object move?",
    "colour": "What colour is the main object?",
    "shape": "What shape is the main object?",
    "start": "Where is the main object at the start?",
    "end": "Where is the main object at the end?",
    "size": "Does the main object change size?",
    "others": "What else is in the video?",
}
SPLITS = ("corpus", "heldout")
# Every held-out clip is asked these (the base's measurement: which way, where, all of it).
HELDOUT_REQUESTS = ("direction", "end", "describe")


def _check_pools() -> None:
  """The corpus never shows an open-instance appearance (a leak into the open split)."""
  o = synthetic.POOLS["open"]
  for key, mine in (("shapes", POOLS["shapes"]), ("colours", POOLS["colours"]),
                    ("backgrounds", POOLS["backgrounds"]), ("distractors", POOLS["distractors"])):
    common = set(mine) & set(o[key])
    if common:
      raise AssertionError(f"pretrain corpus {key} {sorted(common)} are open-instance ones")
  for key, mine in (("distance", POOLS["distance"]), ("scale", POOLS["scale"])):
    for lo, hi in o[key]:
      if lo <= mine[1] and mine[0] <= hi:
        raise AssertionError(f"pretrain corpus {key} {mine} overlaps the open range {(lo, hi)}")


_check_pools()


# ----------------------------------------------------------------------------- drawing
def _polygon(shape: str) -> np.ndarray:
  """Unit polygon (float [K, 2] x, y) of a new shape, half-extent about 1."""
  if shape == "diamond":
    return np.array([(0, -1.25), (0.8, 0), (0, 1.25), (-0.8, 0)], float)
  if shape in ("hexagon", "pentagon"):
    k = 6 if shape == "hexagon" else 5
    a = np.deg2rad(np.arange(k) * 360 / k - 90)
    return 1.1 * np.stack([np.cos(a), np.sin(a)], -1)
  if shape == "rectangle":
    return np.array([(-1.3, -0.6), (1.3, -0.6), (1.3, 0.6), (-1.3, 0.6)], float)
  if shape == "semicircle":
    a = np.deg2rad(np.linspace(180, 360, 13))
    return np.stack([1.2 * np.cos(a), 1.2 * np.sin(a) + 0.5], -1)
  raise ValueError(f"unknown shape {shape!r}")


def draw(img: np.ndarray, shape: str, colour: tuple[int, int, int], cx: float, cy: float,
         s: float, angle: float) -> None:
  """Draws one shape into `img` (uint8 RGB [H, W, 3]) in place: the benchmark's drawing
  (`synthetic._draw`) for its shapes, the same sub-pixel anti-aliased fill for new ones."""
  if shape in ("circle", "square", "triangle", "ring", "cross", "star"):
    synthetic._draw(img, shape, colour, cx, cy, s, angle)
    return
  k = 1 << synthetic._SHIFT
  if shape == "ellipse":
    cv2.ellipse(img, (int(round(cx * k)), int(round(cy * k))),
                (int(round(1.25 * s * k)), int(round(0.65 * s * k))), math.degrees(angle), 0,
                360, colour, -1, cv2.LINE_AA, synthetic._SHIFT)
    return
  pts = synthetic._place(_polygon(shape), cx, cy, s, angle)
  cv2.fillPoly(img, [np.round(pts * k).astype(np.int32)], colour, cv2.LINE_AA, synthetic._SHIFT)


def background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
  """A grey-ish, low-saturation background (uint8 RGB [H, W, 3]); the benchmark's kinds
  come from `synthetic._background`."""
  if kind in ("plain", "gradient", "grid", "stripes", "checker"):
    return synthetic._background(rng, kind, h, w)
  base, tint = rng.uniform(70, 170), rng.uniform(-12, 12, 3)
  lo, hi = base - rng.uniform(15, 35), base + rng.uniform(15, 35)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  if kind == "dots":
    step, r = int(rng.integers(8, 14)), float(rng.uniform(1.0, 2.2))
    ox, oy = rng.uniform(0, step, 2)
    d = np.hypot((xx - ox) % step - step / 2, (yy - oy) % step - step / 2)
    val = np.where(d < r, hi, lo)
  elif kind == "radial":
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    d = np.hypot(xx - cx, yy - cy)
    val = hi + (lo - hi) * d / max(float(d.max()), 1.0)
  elif kind == "blotches":
    coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
    val = lo + (hi - lo) * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
  else:
    raise ValueError(f"unknown background {kind!r}")
  return np.clip(val[..., None] + tint[None, None, :], 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, motion: str, *, min_frames: int = 8,
                 max_frames: int = 16, sides: Sequence[int] = synthetic.SIDES) -> dict:
  """The ground truth of one clip: attributes and per-frame centre / size / angle."""
  if motion not in MOTIONS:
    raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
  h, w = int(rng.choice(sides)), int(rng.choice(sides))
  t = int(rng.integers(min_frames, max_frames + 1))
  m = min(h, w)
  shapes = [s for s in POOLS["shapes"] if not (motion == "spinning" and s == "circle")]
  scene = dict(motion=motion, height=h, width=w, frames=t, shape=str(rng.choice(shapes)),
               colour=str(rng.choice(POOLS["colours"])),
               background=str(rng.choice(POOLS["backgrounds"])),
               distractor=str(rng.choice(POOLS["distractors"])),
               angle=float(rng.uniform(0, 2 * math.pi)), noise=float(rng.uniform(0, 6)))
  turn = 0.0
  if motion in DIRECTIONS:
    dist = float(rng.uniform(*POOLS["distance"]))
    dx, dy = DIRECTIONS[motion]
    s = max(float(rng.uniform(*synthetic.MOVING_SIZE)) * m, synthetic._MIN_SIZE)
    s = min(s, ((1 - dist) * m - 2.5) / 2.6)
    span_x, span_y = dist * w * abs(dx), dist * h * abs(dy)
    margin = 1.3 * s + 1
    x0 = rng.uniform(margin + (span_x if dx < 0 else 0), w - margin - (span_x if dx > 0 else 0))
    y0 = rng.uniform(margin + (span_y if dy < 0 else 0), h - margin - (span_y if dy > 0 else 0))
    x1, y1, s0, s1 = x0 + dx * span_x, y0 + dy * span_y, s, s
    scene.update(distance=round(dist, 4))
  elif motion in ("growing", "shrinking"):
    factor = float(rng.uniform(*POOLS["scale"]))
    small = max(float(rng.uniform(*synthetic.SCALING_SIZE)) * m, synthetic._MIN_SIZE)
    big = small * factor
    s0, s1 = (small, big) if motion == "growing" else (big, small)
    margin = 1.3 * big + 1
    x0 = x1 = float(rng.uniform(margin, w - margin)) if w > 2 * margin else w / 2
    y0 = y1 = float(rng.uniform(margin, h - margin)) if h > 2 * margin else h / 2
    scene.update(scale=round(factor, 4))
  else:  # still or spinning: in place, one size
    s0 = s1 = max(float(rng.uniform(0.10, 0.16)) * m, synthetic._MIN_SIZE)
    margin = 1.3 * s0 + 1
    x0 = x1 = float(rng.uniform(margin, w - margin))
    y0 = y1 = float(rng.uniform(margin, h - margin))
    if motion == "spinning":
      turn = math.radians(float(rng.uniform(*POOLS["turn"]))) * float(rng.choice([-1, 1]))
  f = np.linspace(0.0, 1.0, t)
  scene.update(x=(x0 + (x1 - x0) * f).round(3).tolist(), y=(y0 + (y1 - y0) * f).round(3).tolist(),
               size=(s0 + (s1 - s0) * f).round(3).tolist(),
               angles=(scene["angle"] + turn * f).round(4).tolist())
  if scene["distractor"] != "none":
    colours = [c for c in POOLS["colours"] if c != scene["colour"]]
    scene["distractor_objects"] = [dict(
        shape=str(rng.choice(POOLS["shapes"])), colour=str(rng.choice(colours)),
        x=float(rng.uniform(0.15, 0.85) * w), y=float(rng.uniform(0.15, 0.85) * h),
        size=max(float(rng.uniform(0.05, 0.09) * m), synthetic._MIN_SIZE - 1),
        angle=float(rng.uniform(0, 2 * math.pi))) for _ in range(int(rng.integers(1, 4)))]
  scene["seed_noise"] = int(rng.integers(0, 2**31 - 1))
  scene["seed_background"] = int(rng.integers(0, 2**31 - 1))
  return scene


def render(scene: dict) -> np.ndarray:
  """The clip of a scene: uint8 RGB [T, H, W, 3] (main object drawn over still ones)."""
  h, w, t = scene["height"], scene["width"], scene["frames"]
  bg = background(np.random.default_rng(scene["seed_background"]), scene["background"], h, w)
  noise_rng = np.random.default_rng(scene["seed_noise"])
  frames = np.empty((t, h, w, 3), np.uint8)
  for i in range(t):
    img = bg.copy()
    for d in scene.get("distractor_objects", ()):
      draw(img, d["shape"], COLOURS[d["colour"]], d["x"], d["y"], d["size"], d["angle"])
    draw(img, scene["shape"], COLOURS[scene["colour"]], scene["x"][i], scene["y"][i],
         scene["size"][i], scene["angles"][i])
    if scene["noise"] > 0:
      img = np.clip(img + noise_rng.normal(0, scene["noise"], img.shape), 0, 255)
    frames[i] = img.astype(np.uint8)
  return frames


# ----------------------------------------------------------------------------- text
def region(x: float, y: float, w: int, h: int) -> str:
  """One of 9 regions of the frame (the benchmark's words: "top left", "centre", ...)."""
  return synthetic._where(x, y, w, h)


def _a(phrase: str) -> str:
  """The phrase with its indefinite article ("an olive ellipse", "a red circle")."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def answers(scene: dict) -> dict[str, str]:
  """The grounded answer to every request in `QUESTIONS` (the description included)."""
  motion, w, h = scene["motion"], scene["width"], scene["height"]
  obj = f"{scene['colour']} {scene['shape']}"
  start = region(scene["x"][0], scene["y"][0], w, h)
  end = region(scene["x"][-1], scene["y"][-1], w, h)
  if motion in DIRECTIONS:
    way = motion.replace("_", " and ")
    far = "a long way" if scene["distance"] >= 0.35 else "a short way"
    what = f"moves {way}, {far}, from the {start} to the {end}, keeping its size"
    size = "No, it keeps its size."
  elif motion in ("growing", "shrinking"):
    f = scene["scale"]
    what = (f"stays at the {start} and grows to about {f:.1f} times its size"
            if motion == "growing" else
            f"stays at the {start} and shrinks to about 1/{f:.1f} of its size")
    way = "It does not move; it grows." if motion == "growing" else (
        "It does not move; it shrinks.")
    size = f"Yes, it gets about {f:.1f} times {'bigger' if motion == 'growing' else 'smaller'}."
  else:
    spin = "" if motion == "still" else (
        " and spins clockwise" if scene["angles"][-1] > scene["angles"][0] else
        " and spins anticlockwise")
    what = f"stays still at the {start}{spin}, keeping its size"
    way = "It does not move; it spins." if motion == "spinning" else "It does not move."
    size = "No, it keeps its size."
  others = scene.get("distractor_objects", ())
  if others:
    listed = ", ".join(f"{_a(d['colour'] + ' ' + d['shape'])} at the "
                       f"{region(d['x'], d['y'], w, h)}" for d in others)
    rest = f"{listed}; {'it stays' if len(others) == 1 else 'they stay'} still"
  else:
    rest = "nothing else"
  bg = f"{scene['background']} background"
  describe = f"{_a(obj).capitalize()} on a {bg} {what}. Also: {rest}."
  return {
      "describe": describe,
      "direction": (f"It moves {way}." if motion in DIRECTIONS else way),
      "colour": f"It is {scene['colour']}.",
      "shape": f"It is {_a(scene['shape'])}.",
      "start": f"At the {start}.",
      "end": f"At the {end}.",
      "size": size,
      "others": f"{rest[0].upper()}{rest[1:]}, on a {bg}.",
  }


def _record(item_id: str, video: str, scene: dict, request: str) -> dict:
  meta = {k: v for k, v in scene.items() if k not in ("x", "y", "size", "angles") and
          not k.startswith("seed_")}
  meta.update(start=[scene["x"][0], scene["y"][0], scene["size"][0]],
              end=[scene["x"][-1], scene["y"][-1], scene["size"][-1]], request=request)
  return {"item_id": item_id,
          "conversations": [
              {"role": "user", "content": [{"type": "video", "video": video},
                                           {"type": "text", "text": QUESTIONS[request]}]},
              {"role": "assistant", "content": answers(scene)[request]}],
          "synthetic": meta}


def _request(rng: np.random.Generator) -> str:
  """Half full descriptions, half one short question (uniform over the others)."""
  if rng.uniform() < 0.5:
    return "describe"
  others = [q for q in QUESTIONS if q != "describe"]
  return others[int(rng.integers(len(others)))]


def clip(seed: int, split: str, i: int, **kw) -> tuple[dict, str]:
  """(scene, request) of clip i of a split; motions cycle in a seeded balanced order."""
  s = SPLITS.index(split)
  perm = np.random.default_rng([seed, 7, s, 1_000_000 + i // len(MOTIONS)]).permutation(
      len(MOTIONS))
  rng = np.random.default_rng([seed, 7, s, i])
  scene = sample_scene(rng, MOTIONS[int(perm[i % len(MOTIONS)])], **kw)
  return scene, _request(rng)


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_clips: int = 4000,
             num_heldout: int = 180, min_frames: int = 8, max_frames: int = 16,
             fps: float = synthetic.FPS, sides: Sequence[int] = synthetic.SIDES
             ) -> dict[str, str]:
  """Writes the corpus under `out_dir`; returns {"corpus": path, "heldout": path}. Video
  paths in the records are relative to `out_dir` (pass it as the video root)."""
  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
  paths = {}
  for split, n in (("corpus", num_clips), ("heldout", num_heldout)):
    records = []
    for i in range(n):
      scene, request = clip(seed, split, i, min_frames=min_frames, max_frames=max_frames,
                            sides=sides)
      video = f"videos/{split}_{i:05d}.mp4"
      synthetic.write_mp4(os.path.join(out_dir, video), render(scene), fps)
      if split == "corpus":
        records.append(_record(f"{split}_{i:05d}", video, scene, request))
      else:
        records += [_record(f"{split}_{i:05d}_{r}", video, scene, r) for r in HELDOUT_REQUESTS]
    paths[split] = synthetic._write_json(os.path.join(out_dir, f"{split}.json"), records)
  synthetic._write_json(os.path.join(out_dir, "info.json"), dict(
      version=VERSION, seed=seed, num_clips=num_clips, num_heldout=num_heldout,
      min_frames=min_frames, max_frames=max_frames, fps=fps, sides=list(sides),
      pools=POOLS, motions=list(MOTIONS), questions=QUESTIONS))
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_clips", type=int, default=4000)
  ap.add_argument("--num_heldout", type=int, default=180)
  a = ap.parse_args(argv)
  t0 = time.time()
  paths = generate(a.out, seed=a.seed, num_clips=a.num_clips, num_heldout=a.num_heldout)
  print(json.dumps(paths, indent=1))
  print(f"wrote the corpus to {a.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
