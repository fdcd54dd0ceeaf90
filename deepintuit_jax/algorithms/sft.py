"""Supervised fine-tuning: token-weighted next-token cross-entropy on the generic train step.

* data-parallel vision: a micro-batch is G *groups* (leading axis: `input_ids [G, b, T]`,
  `pixel_values_videos [G, Np, patch_dim]`, layout leaves `[G, ...]`, `position_ids
  [G, 3, b, T]`; see data/batching.py), each holding its own rows and only their videos.
  The group axis is sharded over ("data", "fsdp") and the loss maps one pure per-group
  function over groups (`logprobs.map_groups`), so each device runs the vision tower on its
  own videos only. An un-grouped batch (`input_ids [B, T]`) is one group;
* the loss is `-sum(loss_mask * log p(next token))` from `logprobs.token_logprobs`: with
  `loss_chunk` > 0 the logits are computed chunk by chunk under `jax.checkpoint`, so neither
  the forward nor the backward holds more than one chunk's `[chunk, V]` logits;
* accumulation (true token means), clipping, the NaN stop, donation and placement are the
  generic `step.TrainStep`'s; it compiles once per (length bucket, patch bucket) pair of its
  micro-batches (`step.num_traces()` counts traces);
* compute in the model's `RuntimeOptions.dtype` (bf16), master weights and optimizer state
  in `param_dtype` (fp32).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from deepintuit_jax.engine import logprobs
from deepintuit_jax.engine.state import TrainState
from deepintuit_jax.engine.step import TrainStep

DEVICE_KEYS = logprobs.MODEL_KEYS + ("loss_mask",)


def _target_weights(loss_mask: jax.Array) -> jax.Array:
  """loss_mask as float weights; the last position has no next token: weight 0."""
  t = loss_mask.shape[-1]
  return loss_mask.astype(jnp.float32) * (jnp.arange(t) < t - 1)


def next_token_ce(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of predicting input_ids[t + 1] from logits[t], and its count.

  logits [B, T, V] float32; input_ids [B, T] int; loss_mask [B, T]: 1 where the *next*
  token input_ids[t + 1] is a target, i.e. aligned with the logits (data/chat.py; the last
  position is never one). Returns (sum [] float32, count [] float32).
  """
  logp, _ = logprobs.logits_logprobs(logits[:, :-1], input_ids[:, 1:])
  weights = loss_mask[:, :-1].astype(jnp.float32)
  return -jnp.sum(logp * weights), jnp.sum(weights)


def chunked_next_token_ce(hidden: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                          logits_fn: Callable[[jax.Array], jax.Array], chunk: int
                          ) -> tuple[jax.Array, jax.Array]:
  """`next_token_ce(logits_fn(hidden), ...)` without materialising [B, T, V] logits.

  hidden [B, T, D] (final-normed); input_ids, loss_mask [B, T] as in `next_token_ce`;
  logits_fn: [C, D] -> [C, V] (e.g. `model.compute_logits`); chunk: at most C tokens per
  chunk (see `logprobs.token_logprobs`). Returns (sum [] float32, count [] float32).
  """
  if chunk <= 0:
    raise ValueError(f"loss chunk {chunk} must be positive")
  logp, _ = logprobs.token_logprobs(hidden, logprobs.next_tokens(input_ids), logits_fn, chunk)
  weights = _target_weights(loss_mask)
  return -jnp.sum(logp * weights), jnp.sum(weights)


def device_batch(batch: dict) -> dict:
  """The jit-visible part of a loader batch (host-only keys such as item_id dropped)."""
  out = {}
  for k in DEVICE_KEYS:
    v = batch.get(k)
    if v is not None:
      out[k] = v if k.endswith("layout") else np.asarray(v)
  if "loss_mask" not in out:
    raise KeyError("batch has no 'loss_mask' (see the data contract in docs/ARCHITECTURE.md)")
  return out


def make_loss_fn(graphdef: nnx.GraphDef, loss_chunk: int = 0):
  """`loss_fn(params, frozen, rest, batch) -> (loss sum, token count, {})` for a grouped
  batch (the `step.TrainStep` contract): per-group cross-entropy, summed over groups.
  loss_chunk > 0: logits chunk by chunk (`logprobs.token_logprobs`); 0 = all at once."""
  if loss_chunk < 0:
    raise ValueError(f"loss_chunk={loss_chunk} must be >= 0 (0 = unchunked)")

  def group(g, params, frozen, rest):
    logp, _ = logprobs.group_logprobs(graphdef, params, frozen, rest, g, chunk=loss_chunk)
    w = _target_weights(g["loss_mask"])
    return -jnp.sum(logp * w), jnp.sum(w)

  def loss_fn(params, frozen, rest, mb):
    sums, counts = logprobs.map_groups(group, mb, params, frozen, rest)
    return jnp.sum(sums), jnp.sum(counts), {}
  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_fn: Callable[[jax.Array], jax.Array], *, mesh: Mesh | None = None,
                    state_sharding: TrainState | None = None, loss_chunk: int = 0) -> TrainStep:
  """The SFT step: `TrainStep(make_loss_fn(graphdef, loss_chunk), ...)`. Micro-batches may
  be grouped (`input_ids [G, b, T]`) or not (`[B, T]`, one group).

  metrics: loss (token mean), tokens (loss tokens), grad_norm (before clipping), lr, ok."""
  return TrainStep(make_loss_fn(graphdef, loss_chunk), tx, lr_fn, mesh=mesh,
                   state_sharding=state_sharding, count_name="tokens")
