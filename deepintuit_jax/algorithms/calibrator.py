"""The intuitive-calibration model (RECIPE "Stage 2"): the label readout, its loss on the
generic train step, and the hidden-state head of the ablation.

A calibration example is the video plus the meta-review prompt, followed by the true label,
which is a single (added) token. The readout position p of a row is where the model predicts
that token: `loss_mask[p] = 1` (the data contract aligns the mask with the logits; padding,
the end token and every vision token are 0) in training batches, the last position of a
left-padded generation prompt (it ends with `<|im_start|>assistant\\n`) at inference. Causal
attention means nothing at or before p sees the label.

Two heads (`HEADS`):
* `label_token` (the release): the full VLM, trained with cross-entropy over the whole
  vocabulary on the label token at p; its calibrated confidences are the logits of the label
  tokens at p, softmaxed over those tokens only.
* `hidden_state` (the ablation "a classifier trained on the reasoning traces"): the VLM
  frozen; a linear layer on pooled final hidden states (the mean over the text positions up
  to p, concatenated with the state at p) gives C class logits; cross-entropy over the C
  classes. Only the head trains (`HeadCalibrator`, frozen pattern `^vlm\\.`).
Both give `[b, C]` class logits in the order of `label_ids` (`class_logits`).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.core import paths
from deepintuit_jax.engine import logprobs

HEADS = ("label_token", "hidden_state")
HEAD_FROZEN = (r"^vlm\.",)  # the hidden-state head trains alone
HEAD_FILE, HEAD_META = "head.safetensors", "calibrator.json"


def check_head(head: str) -> str:
  if head not in HEADS:
    raise ValueError(f"calibrate.head={head!r}: must be one of {HEADS}")
  return head


class ClassifierHead(nnx.Module):
  """Linear [2D] -> [C] (float32 parameters) on `pool_features`."""

  def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
    init = jax.random.normal(rngs.params(), (2 * width, num_classes), jnp.float32) * 0.02
    self.kernel = nnx.Param(init, logical_axes=("embed", None))
    self.bias = nnx.Param(jnp.zeros((num_classes,), jnp.float32), logical_axes=(None,))

  def __call__(self, features: jax.Array) -> jax.Array:
    """features [b, 2D] -> logits [b, C] float32."""
    return features.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class HeadCalibrator(nnx.Module):
  """The frozen VLM (`vlm`, any Qwen2_5_VL) and the trainable `head`."""

  def __init__(self, vlm: nnx.Module, head: ClassifierHead):
    self.vlm = vlm
    self.head = head


def readout_positions(loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """loss_mask [b, T] -> (p [b] int32: the first target position, weight [b] float32: 1 for
  a row with a target, 0 for a dummy row)."""
  m = loss_mask > 0
  return jnp.argmax(m, axis=-1).astype(jnp.int32), jnp.any(m, axis=-1).astype(jnp.float32)


def last_positions(attention_mask: jax.Array) -> jax.Array:
  """[b, T] -> [b] index of each row's last attended token (the readout at inference)."""
  t = attention_mask.shape[-1]
  return (t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def pool_features(hidden: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                  pos: jax.Array, video_token_id: int) -> jax.Array:
  """The hidden-state head's input: [mean of hidden over the attended, non-vision positions
  t <= p ; hidden at p].

  hidden [b, T, D] (final-normed); input_ids, attention_mask [b, T]; pos [b].
  Returns [b, 2D] float32."""
  h = hidden.astype(jnp.float32)
  t = jnp.arange(h.shape[1])[None]
  keep = (attention_mask > 0) & (input_ids != video_token_id) & (t <= pos[:, None])
  w = keep.astype(jnp.float32)
  mean = jnp.einsum("btd,bt->bd", h, w) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
  last = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
  return jnp.concatenate([mean, last], axis=-1)


def _at(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [b, T, ...] at pos [b] -> [b, ...]."""
  idx = pos.reshape(pos.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def class_logits(model: nnx.Module, head: str, batch: dict, pos: jax.Array,
                 label_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Class logits [b, C] (order of label_ids [C]) at the readout positions pos [b].

  head "label_token": model is the VLM; returns (label-token logits [b, C], full-vocabulary
  logits [b, V]). "hidden_state": model is a HeadCalibrator; returns (head logits, None)."""
  if head == "label_token":
    out = model(**logprobs.model_inputs(batch), return_hidden=True)
    logits = model.compute_logits(_at(out.hidden, pos))  # [b, V] float32
    return logits[:, label_ids], logits
  vlm = model.vlm
  out = vlm(**logprobs.model_inputs(batch), return_hidden=True)
  feats = pool_features(out.hidden, batch["input_ids"], batch["attention_mask"], pos,
                        vlm.config.video_token_id)
  return model.head(jax.lax.stop_gradient(feats)), None


def make_loss_fn(graphdef: nnx.GraphDef, head: str, label_ids: Sequence[int]):
  """`loss_fn(params, frozen, rest, batch) -> (loss sum, rows, {"label_accuracy": sum})`
  for `step.TrainStep` on grouped training batches (`input_ids [G, b, T]`, `loss_mask`
  marking the single label token of each row).

  label_token: -log softmax over the vocabulary of the label token at p (the release's
  cross-entropy; every other position is masked). hidden_state: -log softmax over the C
  classes of the head's logits. label_accuracy: the argmax over the label tokens (the
  inference prediction) is the true label. Counts are rows: one target each."""
  check_head(head)
  ids = np.asarray(label_ids, np.int32)  # NumPy: building the step computes nothing eagerly

  def group(g, params, frozen, rest):
    model = nnx.merge(graphdef, params, frozen, rest)
    pos, w = readout_positions(g["loss_mask"])
    target = _at(g["input_ids"], jnp.minimum(pos + 1, g["input_ids"].shape[1] - 1))
    onehot = (target[:, None] == ids[None]).astype(jnp.float32)  # [b, C]
    cls, vocab = class_logits(model, head, g, pos, ids)
    if head == "label_token":
      logp, _ = logprobs.logits_logprobs(vocab, target)
    else:
      logp = jnp.sum(jax.nn.log_softmax(cls, axis=-1) * onehot, axis=-1)
    correct = jnp.sum(jax.nn.one_hot(jnp.argmax(cls, -1), ids.shape[0]) * onehot, axis=-1)
    return -jnp.sum(w * logp), jnp.sum(w), jnp.sum(w * correct)

  def loss_fn(params, frozen, rest, mb):
    sums, counts, correct = logprobs.map_groups(group, mb, params, frozen, rest)
    return jnp.sum(sums), jnp.sum(counts), {"label_accuracy": jnp.sum(correct)}
  return loss_fn


def check_targets(batch: dict, label_ids: Sequence[int]) -> None:
  """Host check of a training batch: every real row has exactly one target token and it is
  a label token; raises ValueError naming the item otherwise."""
  mask = np.asarray(batch["loss_mask"])
  ids = np.asarray(batch["input_ids"])
  mask, ids = mask.reshape(-1, mask.shape[-1]), ids.reshape(-1, ids.shape[-1])
  allowed = set(int(i) for i in label_ids)
  for row, item in enumerate(batch["item_id"]):
    if not item:
      continue
    where = np.flatnonzero(mask[row])
    if len(where) != 1 or int(ids[row, where[0] + 1]) not in allowed:
      raise ValueError(
          f"calibration example {item!r}: the assistant turn must be exactly one label token "
          f"(got {len(where)} target token(s)); labels must be added tokens "
          "(data.special_tokens added or special) and the assistant content the bare label")


def save_head(out: str, head: ClassifierHead, *, classes: Sequence[str], backbone: str,
              label_ids: Sequence[int], **meta) -> str:
  """The hidden-state calibrator: head weights (safetensors) + calibrator.json naming the
  frozen backbone's HF directory (and `meta`, e.g. the prompt style). Returns `out`."""
  from deepintuit_jax.models import safetensors_io
  with paths.staged(out) as local:
    safetensors_io.save_file({"kernel": np.asarray(head.kernel[...], np.float32),
                              "bias": np.asarray(head.bias[...], np.float32)},
                             os.path.join(local, HEAD_FILE))
    write_meta(local, head="hidden_state", classes=list(classes), label_ids=list(label_ids),
               backbone=backbone, **meta)
  return out


def load_head(path: str) -> ClassifierHead:
  from deepintuit_jax.models import safetensors_io
  with paths.fetched(path) as local:
    f = safetensors_io.SafetensorsFile(os.path.join(local, HEAD_FILE))
    kernel, bias = np.array(f.get("kernel")), np.array(f.get("bias"))
  head = ClassifierHead(kernel.shape[0] // 2, kernel.shape[1], rngs=nnx.Rngs(0))
  head.kernel[...] = jnp.asarray(kernel)
  head.bias[...] = jnp.asarray(bias)
  return head


def write_meta(out: str, **meta) -> None:
  """calibrator.json: head kind, classes (in score order), label token ids, backbone."""
  paths.write_json(os.path.join(out, HEAD_META), meta, indent=1)


def read_meta(path: str) -> dict:
  """calibrator.json of a calibrator directory; a bare HF directory (no file) is read as a
  label-token calibrator."""
  file = os.path.join(path, HEAD_META)
  if not paths.isfile(file):
    return {"head": "label_token"}
  meta = paths.read_json(file)
  check_head(meta.get("head"))
  return meta
