"""Vision-tower pretraining on a dense, per-merged-token target (the tiny base's first stage,
as Qwen pretrains its ViT before the VLM stage).

Every merged token of the tower covers `temporal_patch_size` consecutive sampled frames and
a 28 x 28 px cell of the resized frame, so the object's local motion over those frames is
visible inside one token (and the tower's full-attention blocks see the whole frame over
them). From the generator's ground truth (the records'
`synthetic` metadata: start / end centre and size, frame count, distractors) each token gets

    kind    0 background, 1 the main object, 2 a still distractor       (every token; a cell
          shows an object when its box covers MIN_COVER of it on average over the token's
          frames, or its centre lies in the cell in one of them)
    colour  the object's colour   (index into pretrain_corpus.COLOURS)    (object tokens)
    shape   the object's shape    (index into pretrain_corpus.POOLS)      (object tokens)
    motion  the object's motion   (index into pretrain_corpus.MOTIONS; distractors "still")
    flow    (dx, dy) in 2-px units and 10 * log size ratio per frame interval of the token

A linear head reads the tokens *after an RMS normalisation without scale* (what the
decoder's first RMSNorm does to them), so the information must survive it: a tower that
turned every token into one large common vector would fail this target. The head is dropped
afterwards; only `visual.*` (tower + merger) is kept.

    data = tower_pretrain.TowerData.load(records, root, options, vision_config)
    stats = tower_pretrain.train(model.visual, data, steps=500, batch=16, lr=5e-3, seed=0)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from tools import tiny_base_corpus as pretrain_corpus

COLOURS = tuple(pretrain_corpus.COLOURS)
SHAPES = tuple(pretrain_corpus.POOLS["shapes"])
MOTIONS = tuple(pretrain_corpus.MOTIONS)
KINDS = ("background", "main", "distractor")
HEAD_SIZES = dict(kind=len(KINDS), colour=len(COLOURS), shape=len(SHAPES), motion=len(MOTIONS),
                  flow=3)
# A cell counts as showing an object when the object's box covers this fraction of it
# (averaged over the token's two frames); the cell of the object's centre always does.
MIN_COVER = 0.12


def _box_cover(cx, cy, half, x0, y0, side) -> float:
  """Fraction of the cell [x0, x0 + side) x [y0, y0 + side) covered by a square box."""
  ox = max(0.0, min(cx + half, x0 + side) - max(cx - half, x0))
  oy = max(0.0, min(cy + half, y0 + side) - max(cy - half, y0))
  return ox * oy / (side * side)


def token_targets(meta: dict, indices: np.ndarray, grid_thw: Sequence[int], *, patch: int = 14,
                  merge: int = 2, temporal: int = 2) -> dict[str, np.ndarray]:
  """Dense targets of one clip's merged tokens, in the tower's output order (t, row, col).

  meta: a record's `synthetic` metadata (pretrain_corpus._record or synthetic._record:
    height, width, frames, start / end [x, y, size], distractor_objects); the motion is
    linear between start and end, as both generators draw it.
  indices: int64 [T'] source frame index of each sampled frame (VideoClip.indices).
  grid_thw: the video's patch grid (t, h, w).
  Returns kind/colour/shape/motion int32 [M] (-1 = no target) and flow float32 [M, 3]
  with flow_mask float32 [M], M = t * (h / merge) * (w / merge).
  """
  gt, gh, gw = (int(v) for v in grid_thw)
  h, w, n = int(meta["height"]), int(meta["width"]), int(meta["frames"])
  sy, sx = gh * patch / h, gw * patch / w
  cell = patch * merge
  (x0, y0, s0), (x1, y1, s1) = meta["start"], meta["end"]
  idx = list(np.asarray(indices).tolist())
  idx += [idx[-1]] * (gt * temporal - len(idx))  # the processor repeats the last frame

  def at(f):
    a = f / max(n - 1, 1)
    return (x0 + (x1 - x0) * a) * sx, (y0 + (y1 - y0) * a) * sy, (s0 + (s1 - s0) * a)

  motion = meta.get("motion") or _motion_of_label(meta["label"])
  others = meta.get("distractor_objects", ())
  rows, cols = gh // merge, gw // merge
  m = gt * rows * cols
  kind = np.zeros(m, np.int32)
  colour, shape, mot = (np.full(m, -1, np.int32) for _ in range(3))
  flow, flow_mask = np.zeros((m, 3), np.float32), np.zeros(m, np.float32)
  col_i = {c: i for i, c in enumerate(COLOURS)}
  shp_i = {s: i for i, s in enumerate(SHAPES)}
  for t in range(gt):
    frames = idx[t * temporal:(t + 1) * temporal]
    boxes = [(x, y, 1.15 * sz * math.sqrt(sx * sy), sz) for x, y, sz in map(at, frames)]
    (xa, ya, _, sa), (xb, yb, _, sb) = boxes[0], boxes[-1]
    for r in range(rows):
      for c in range(cols):
        k = (t * rows + r) * cols + c
        cx0, cy0 = c * cell, r * cell
        main = float(np.mean([_box_cover(x, y, hf, cx0, cy0, cell) for x, y, hf, _ in boxes]))
        centre = any(cx0 <= x < cx0 + cell and cy0 <= y < cy0 + cell for x, y, _, _ in boxes)
        if main >= MIN_COVER or centre:
          kind[k], colour[k], shape[k] = 1, col_i.get(meta["colour"], -1), shp_i.get(
              meta["shape"], -1)
          mot[k] = MOTIONS.index(motion) if motion in MOTIONS else -1
          steps = max(len(frames) - 1, 1)  # per frame interval: one scale for any patch size
          flow[k] = ((xb - xa) / 2.0 / steps, (yb - ya) / 2.0 / steps,
                     10.0 * math.log(sb / sa) / steps)
          flow_mask[k] = 1.0
          continue
        best, which = 0.0, None
        for d in others:
          half = 1.15 * d["size"] * math.sqrt(sx * sy)
          cov = _box_cover(d["x"] * sx, d["y"] * sy, half, cx0, cy0, cell)
          inside = cx0 <= d["x"] * sx < cx0 + cell and cy0 <= d["y"] * sy < cy0 + cell
          cov = max(cov, MIN_COVER if inside else 0.0)
          if cov > best:
            best, which = cov, d
        if which is not None and best >= MIN_COVER:
          kind[k] = 2
          colour[k] = col_i.get(which["colour"], -1)
          shape[k] = shp_i.get(which["shape"], -1)
          mot[k] = MOTIONS.index("still")
  return dict(kind=kind, colour=colour, shape=shape, motion=mot, flow=flow, flow_mask=flow_mask)


def _motion_of_label(label: str) -> str:
  """The benchmark's class names as corpus motions (moving_left -> left, growing, ...)."""
  return label[len("moving_"):] if label.startswith("moving_") else label


@dataclasses.dataclass
class TowerData:
  """Preprocessed clips held in memory: pixels float16 [n, P, patch_dim] (zero-padded to P
  patches), grids int32 [n, 3], targets per clip (`token_targets`), labels (a record's
  class or motion)."""
  pixels: np.ndarray
  grids: np.ndarray
  targets: list[dict[str, np.ndarray]]
  labels: list[str]

  @classmethod
  def load(cls, records, root: str, options, vision_config) -> "TowerData":
    """Decodes and preprocesses `records` (annotations.Record with `extra["synthetic"]`) as
    the training pipeline does (`options`: sampling, max_frames, min / max pixels)."""
    from deepintuit_jax.data import annotations, video
    v = vision_config
    pix, grids, targets, labels = [], [], [], []
    for rec in records:
      path = annotations.resolve_video_path(rec.video, root, item_id=rec.item_id)
      clip = video.load_video(path, sampling=options.sampling, max_frames=options.max_frames,
                              fps=options.fps, min_frames=options.min_frames,
                              item_id=rec.item_id)
      p, g = video.preprocess_video(clip.frames, min_pixels=options.min_pixels,
                                    max_pixels=options.max_pixels, patch_size=v.patch_size,
                                    temporal_patch_size=v.temporal_patch_size,
                                    merge_size=v.spatial_merge_size)
      meta = rec.extra["synthetic"]
      pix.append(p.astype(np.float16))
      grids.append(np.asarray(g, np.int32))
      targets.append(token_targets(meta, clip.indices, g, patch=v.patch_size,
                                   merge=v.spatial_merge_size, temporal=v.temporal_patch_size))
      labels.append(str(meta.get("label") or meta.get("motion")))
    width = max(len(p) for p in pix)
    out = np.zeros((len(pix), width, pix[0].shape[1]), np.float16)
    for i, p in enumerate(pix):
      out[i, :len(p)] = p
    return cls(pixels=out, grids=np.stack(grids), targets=targets, labels=labels)

  def __len__(self) -> int:
    return len(self.targets)

  def batch(self, ids: Sequence[int], vision_config, patches_per_clip: int,
            frame_patches: int) -> dict:
    """A tower call over clips `ids`: pixel_values [B * patches_per_clip, patch_dim], the
    layout (padded to that fixed size: one compiled shape) and the stacked targets over
    the merged rows (padding rows get no target)."""
    from deepintuit_jax.models.qwen2_5_vl.vision_layout import vision_layout
    v = vision_config
    m2 = v.spatial_merge_size ** 2
    n_real = [int(np.prod(self.grids[i])) for i in ids]
    pv = np.concatenate([self.pixels[i, :k] for i, k in zip(ids, n_real)])
    pad = len(ids) * patches_per_clip
    pv = np.concatenate([pv, np.zeros((pad - len(pv), pv.shape[1]), pv.dtype)])
    layout = vision_layout(self.grids[list(ids)], v, pad_to=pad, max_frame_patches=frame_patches)
    m_pad = pad // m2
    tg = {}
    for key in ("kind", "colour", "shape", "motion"):
      a = np.concatenate([self.targets[i][key] for i in ids])
      tg[key] = np.concatenate([a, np.full(m_pad - len(a), -1, np.int32)])
    f = np.concatenate([self.targets[i]["flow"] for i in ids])
    fm = np.concatenate([self.targets[i]["flow_mask"] for i in ids])
    tg["flow"] = np.concatenate([f, np.zeros((m_pad - len(f), 3), np.float32)])
    tg["flow_mask"] = np.concatenate([fm, np.zeros(m_pad - len(fm), np.float32)])
    clip_of = np.concatenate([np.full(n // m2, j, np.int32) for j, n in enumerate(n_real)])
    clip_of = np.concatenate([clip_of, np.full(m_pad - len(clip_of), -1, np.int32)])
    return dict(pixel_values=pv.astype(np.float32), layout=layout, targets=tg, clip_of=clip_of)


def _normed(x):
  import jax
  import jax.numpy as jnp
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)


def _losses(head, feats, tg):
  """Per-target mean losses and accuracies of the head on normalised tokens."""
  import jax
  import jax.numpy as jnp
  logits = _normed(feats) @ head["w"] + head["b"]
  out, off = {}, 0
  for key in ("kind", "colour", "shape", "motion"):
    n = HEAD_SIZES[key]
    lg, y = logits[:, off:off + n], tg[key]
    off += n
    valid = (y >= 0).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(lg), jnp.maximum(y, 0)[:, None], -1)[:, 0]
    denom = jnp.maximum(valid.sum(), 1.0)
    out[key] = (nll * valid).sum() / denom
    out[key + "_acc"] = ((jnp.argmax(lg, -1) == y) * valid).sum() / denom
  fm = tg["flow_mask"]
  err = jnp.square(logits[:, off:off + 3] - tg["flow"]).sum(-1)
  out["flow"] = (err * fm).sum() / jnp.maximum(fm.sum(), 1.0)
  return out


def train(tower, data: TowerData, *, steps: int, batch: int, lr: float, seed: int,
          heldout: TowerData | None = None, log_every: int = 100) -> dict:
  """Trains `tower` (an nnx VisionTower, updated in place) and a linear head on the dense
  targets with AdamW (warmup 5%, cosine to 10%); the head is dropped. Deterministic for a
  seed (batches drawn by `np.random.default_rng(seed)`). Returns the losses and, with
  `heldout`, its per-target accuracies."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  v = tower.config
  m2 = v.spatial_merge_size ** 2
  ppc, fp = _shapes(data, heldout, m2)
  k = sum(HEAD_SIZES.values())
  key = jax.random.PRNGKey(seed)
  head = dict(w=jax.random.normal(key, (v.out_hidden_size, k), jnp.float32) * 0.02,
              b=jnp.zeros((k,), jnp.float32))
  graphdef, params, rest = nnx.split(tower, nnx.Param, ...)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
  opt_state = tx.init((params, head))

  def loss_fn(p, hd, pv, layout, tg):
    feats = nnx.merge(graphdef, p, rest)(pv, layout)
    ls = _losses(hd, feats, tg)
    total = (ls["kind"] + ls["colour"] + 0.5 * ls["shape"] + 2.0 * ls["motion"] +
             0.5 * ls["flow"])
    return total, ls

  @jax.jit
  def step(p, hd, o, pv, layout, tg):
    (loss, ls), g = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        p, hd, pv, layout, tg)
    upd, o = tx.update(g, o, (p, hd))
    p, hd = optax.apply_updates((p, hd), upd)
    return p, hd, o, loss, ls

  @jax.jit
  def measure(p, hd, pv, layout, tg):
    return _losses(hd, nnx.merge(graphdef, p, rest)(pv, layout), tg)

  rng = np.random.default_rng(seed)
  order, pos, losses, t0 = rng.permutation(len(data)), 0, [], time.time()
  for i in range(1, steps + 1):
    if pos + batch > len(order):
      order, pos = rng.permutation(len(data)), 0
    b = data.batch(order[pos:pos + batch], v, ppc, fp)
    pos += batch
    params, head, opt_state, loss, ls = step(params, head, opt_state, b["pixel_values"],
                                             b["layout"], b["targets"])
    losses.append(float(loss))
    if log_every and (i % log_every == 0 or i == steps):
      acc = {k2: round(float(ls[k2 + "_acc"]), 3) for k2 in ("kind", "colour", "shape", "motion")}
      print(f"tower step {i}/{steps} loss {np.mean(losses[-log_every:]):.4f} {acc} "
            f"({(time.time() - t0) / i:.2f}s/step)", flush=True)
  nnx.update(tower, params)
  out = dict(steps=steps, batch=batch, lr=lr, final_loss=float(np.mean(losses[-50:])),
             seconds=round(time.time() - t0, 1),
             head={k2: np.asarray(jax.device_get(val)) for k2, val in head.items()})
  if heldout is not None:
    sums, n = {}, 0
    for s in range(0, len(heldout) - batch + 1, batch):
      b = heldout.batch(range(s, s + batch), v, ppc, fp)
      r = jax.device_get(measure(params, head, b["pixel_values"], b["layout"], b["targets"]))
      for k2, val in r.items():
        sums[k2] = sums.get(k2, 0.0) + float(val)
      n += 1
    out["heldout"] = {k2: round(val / max(n, 1), 4) for k2, val in sorted(sums.items())}
  return out


def _shapes(data: TowerData, other: TowerData | None, m2: int) -> tuple[int, int]:
  """(patches per clip, patches of the largest frame) over both sets: fixed jitted shapes."""
  sets = [data] + ([other] if other is not None else [])
  ppc = max(int(d.pixels.shape[1]) for d in sets)
  fp = max(int((d.grids[:, 1] * d.grids[:, 2]).max()) for d in sets)
  return ppc + (-ppc % m2), fp


def pooled_features(tower, data: TowerData, *, batch: int = 16) -> np.ndarray:
  """Per clip: the normalised merged tokens, mean-pooled over the clip and over its object
  tokens (where the dense target saw the main object), concatenated: float32 [n, 2 D]."""
  import jax
  import jax.numpy as jnp
  v = tower.config
  m2 = v.spatial_merge_size ** 2
  ppc, fp = _shapes(data, None, m2)
  fn = jax.jit(lambda pv, layout: _normed(tower(pv, layout)))
  rows = []
  for s in range(0, len(data), batch):
    ids = list(range(s, min(s + batch, len(data))))
    ids_full = ids + [ids[-1]] * (batch - len(ids))
    b = data.batch(ids_full, v, ppc, fp)
    f = np.asarray(jax.device_get(fn(jnp.asarray(b["pixel_values"]), b["layout"])))
    for j in range(len(ids)):
      sel = b["clip_of"] == j
      obj = sel & (b["targets"]["kind"] == 1)
      rows.append(np.concatenate([f[sel].mean(0), f[obj if obj.any() else sel].mean(0)]))
  return np.stack(rows).astype(np.float32)


def ridge_probe(train_x, train_y, test_x, test_y, *, l2: float = 1e-2) -> float:
  """Accuracy of a ridge-regression classifier (one-hot targets, closed form) fitted on
  the train features and scored on the test ones: a linear readout of frozen features."""
  classes = sorted(set(train_y))
  mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
  a, b = (train_x - mu) / sd, (test_x - mu) / sd
  a, b = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
  y = np.eye(len(classes))[[classes.index(c) for c in train_y]]
  w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]), a.T @ y)
  pred = [classes[i] for i in np.argmax(b @ w, 1)]
  return float(np.mean([p == t for p, t in zip(pred, test_y)]))


def zero_shot(tower, head: dict, data: TowerData, labels: Sequence[str], *,
              batch: int = 16) -> float:
  """Accuracy of the dense head's motion logits, averaged over each clip's object tokens
  and restricted to `labels` (benchmark class names, mapped as `_motion_of_label`): how
  well the tokens alone say which way, without any training on the benchmark."""
  import jax
  import jax.numpy as jnp
  v = tower.config
  ppc, fp = _shapes(data, None, v.spatial_merge_size ** 2)
  off = HEAD_SIZES["kind"] + HEAD_SIZES["colour"] + HEAD_SIZES["shape"]
  cols = [off + MOTIONS.index(_motion_of_label(c)) for c in labels]
  fn = jax.jit(lambda pv, layout: _normed(tower(pv, layout)) @ head["w"] + head["b"])
  hits = []
  for s in range(0, len(data), batch):
    ids = list(range(s, min(s + batch, len(data))))
    b = data.batch(ids + [ids[-1]] * (batch - len(ids)), v, ppc, fp)
    lg = np.asarray(jax.device_get(fn(jnp.asarray(b["pixel_values"]), b["layout"])))
    for j in ids:
      sel = b["clip_of"] == j - s
      obj = sel & (b["targets"]["kind"] == 1)
      score = lg[obj if obj.any() else sel][:, cols].mean(0)
      hits.append(labels[int(np.argmax(score))] == data.labels[j])
  return float(np.mean(hits))
