"""The imitation baseline's algorithm: a video-encoder classifier (models/video_classifier.py:
the VLM's vision tower + a head that keeps space and time) and its cross-entropy on the
labels. The batch: the loader's video inputs plus, per row, the class index and where its
tokens are among its group's merged tokens (`device_batch`); labels are mapped to indices on
the host. Grouped like SFT's batches (data-parallel vision), placed with `ROW_AXES`. The
stage that trains and scores it: deepintuit_jax/stages/imitation.py."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.core import sharding
from deepintuit_jax.engine import logprobs
from deepintuit_jax.models import video_classifier as vc

# Per-row arrays of the classifier's batch (row axis inside a group), for batch placement.
ROW_AXES = dict(sharding.ROW_AXES, class_ids=0, row_weight=0, token_index=0, token_coords=0,
                num_tokens=0)
MODEL_KEYS = ("pixel_values_videos", "video_layout", "token_index", "token_coords",
              "num_tokens")


def build_classifier(base, init: str, head: vc.HeadConfig, *, seed: int, mesh
                     ) -> vc.VideoClassifier:
  """The classifier from a loaded base model (`Qwen2_5_VL`): its tower (init `pretrained`)
  or a random one of the same config (`scratch`), a new head; placed on `mesh`."""
  tower = base.visual if init == "pretrained" else None
  model = vc.VideoClassifier(base.config.vision, head, base.visual.opts,
                             rngs=nnx.Rngs(seed), tower=tower)
  return sharding.shard_model(model, mesh)


def class_ids(labels: Sequence[str], item_ids: Sequence[str], index: Mapping[str, int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Host labels -> (class indices [B] int32, row weights [B] float32: 1 for a labelled row,
  0 for a dummy or unlabelled one). A label outside the classes is an error naming the item."""
  ids = np.zeros((len(labels),), np.int32)
  weight = np.zeros((len(labels),), np.float32)
  for r, (label, item) in enumerate(zip(labels, item_ids)):
    if not label:
      continue
    key = label.strip().lower()
    if key not in index:
      raise ValueError(f"item {item!r}: label {label!r} is not one of the classes "
                       f"{sorted(index)}")
    ids[r], weight[r] = index[key], 1.0
  return ids, weight


def label_index(classes: Sequence[str]) -> dict[str, int]:
  return {c.strip().lower(): i for i, c in enumerate(classes)}


def needed_tokens(batch: dict, merge: int) -> int:
  """The largest video of a loader batch, in merged tokens (0 without videos)."""
  grids = batch.get("video_grid_thw")
  if grids is None or len(grids) == 0:
    return 0
  return int(vc.merged_grid(grids, merge).prod(axis=1).max())


def device_batch(batch: dict, index: Mapping[str, int], merge: int, length: int | None = None
                 ) -> dict:
  """A loader batch (grouped or not; the data contract of docs/ARCHITECTURE.md) -> the
  classifier's grouped device batch (G = 1 when un-grouped; b = rows per group, L = `length`
  or the token bucket of the batch's largest video):
    pixel_values_videos [G, Np, patch_dim], video_layout (leaves [G, ...]),
    token_index [G, b, L] int32, token_coords [G, b, L, 3] float32, num_tokens [G, b] int32,
    class_ids [G, b] int32, row_weight [G, b] float32.
  Every real row must hold exactly one video (a record's clip)."""
  g = int(batch.get("num_groups", 1))
  rows = len(batch["labels"])
  per, n_real = rows // g, int(batch["num_real"])
  grids = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)
  if len(grids) != n_real:
    raise ValueError(f"a batch of {n_real} items holds {len(grids)} videos: every record must "
                     f"have exactly one video (items {list(batch['item_id'][:n_real])})")
  length = length or vc.token_bucket(needed_tokens(batch, merge))
  layouts = [vc.token_layout(grids[k * per:min((k + 1) * per, n_real)], per, merge, length)
             for k in range(g)]
  ids, weight = class_ids(batch["labels"], batch["item_id"], index)
  pixels, layout = batch["pixel_values_videos"], batch["video_layout"]
  if "num_groups" not in batch:
    pixels, layout = pixels[None], jax.tree.map(lambda x: np.asarray(x)[None], layout)
  stack = lambda name: np.stack([getattr(t, name) for t in layouts])
  return {"pixel_values_videos": np.asarray(pixels), "video_layout": layout,
          "token_index": stack("token_index"), "token_coords": stack("token_coords"),
          "num_tokens": stack("num_tokens"), "class_ids": ids.reshape(g, per),
          "row_weight": weight.reshape(g, per)}


def group_logits(graphdef: nnx.GraphDef, params, frozen, rest, group: dict) -> jax.Array:
  """Logits [b, C] float32 of one group (no group axis) of `device_batch`."""
  model = nnx.merge(graphdef, params, frozen, rest)
  return model(*(group[k] for k in MODEL_KEYS))


def make_loss_fn(graphdef: nnx.GraphDef):
  """`loss_fn(params, frozen, rest, batch) -> (cross-entropy sum, labelled rows,
  {"accuracy": correct rows})` for a grouped `device_batch` (the `step.TrainStep`
  contract: the step reports the row mean of both)."""

  def group(g, params, frozen, rest):
    logits = group_logits(graphdef, params, frozen, rest, g)
    logp, _ = logprobs.logits_logprobs(logits, g["class_ids"])
    w = g["row_weight"]
    correct = (jnp.argmax(logits, axis=-1) == g["class_ids"]).astype(jnp.float32)
    return -jnp.sum(logp * w), jnp.sum(w), jnp.sum(correct * w)

  def loss_fn(params, frozen, rest, mb):
    sums, counts, correct = logprobs.map_groups(group, mb, params, frozen, rest)
    return jnp.sum(sums), jnp.sum(counts), {"accuracy": jnp.sum(correct)}
  return loss_fn
