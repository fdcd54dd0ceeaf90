"""Supervised fine-tuning: token-weighted next-token cross-entropy and one jitted train step.

The step is a pure function `(state, micro_batches) -> (state, metrics)`:
* gradient accumulation over a tuple of micro-batches (`lax.scan` when their shapes agree,
  an unrolled loop otherwise), with *true* token means: the loss and gradients are the sum
  over every micro-batch divided by the total number of loss tokens, so accumulating A
  micro-batches equals one batch A times larger;
* compute in the model's `RuntimeOptions.dtype` (bf16), master weights and optimizer state
  in `param_dtype` (fp32);
* a NaN/Inf loss or gradient norm leaves the state unchanged and reports `ok = False`; the
  loop raises before anything is checkpointed, so the last good checkpoint stays intact.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepintuit_jax import sharding as sharding_lib
from deepintuit_jax.trainers import optim

# Batch keys the model consumes inside jit (everything else in a batch is host-only).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values_videos",
              "video_layout", "pixel_values", "image_layout")
DEVICE_KEYS = MODEL_KEYS + ("loss_mask",)
# Keys whose dimension `axis` is the batch dimension (sharded over data-parallel axes).
_BATCH_AXIS = {"input_ids": 0, "attention_mask": 0, "loss_mask": 0, "position_ids": 1}


@flax.struct.dataclass
class TrainState:
  """step [] int32; params: trainable nnx.State; frozen: frozen params (no optimizer
  state); rest: non-parameter model state (usually empty); opt_state: optax state of the
  trainable params; rng: [2] uint32 raw key data (folded with the step)."""
  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  rest: nnx.State
  opt_state: Any
  rng: jax.Array


def init_state(model: nnx.Module, tx: optax.GradientTransformation, frozen: Sequence[str],
               seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the model (see optim.partition) and initialises the optimizer state."""
  graphdef, params, fro, rest = optim.partition(model, frozen)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=fro, rest=rest,
                     opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, state


def next_token_ce(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of predicting input_ids[t + 1] from logits[t], and its count.

  logits [B, T, V] float32; input_ids [B, T] int; loss_mask [B, T]: 1 where the *next*
  token input_ids[t + 1] is a target, i.e. aligned with the logits (data/chat.py; the last
  position is never one). Returns (sum [] float32, count [] float32).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  weights = loss_mask[:, :-1].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logit) * weights), jnp.sum(weights)


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_KEYS if k in batch and batch[k] is not None}


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


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """Token arrays split over the data-parallel axes on their batch dim (when it divides);
  vision inputs and layouts replicated (they are concatenated across rows)."""
  out = {}
  for k, v in batch.items():
    if k in _BATCH_AXIS:
      shape = np.shape(v)
      axes = [None] * len(shape)
      axes[_BATCH_AXIS[k]] = "batch"
      spec = sharding_lib.logical_to_spec(axes, sharding_lib.DEFAULT_RULES, mesh, shape)
      out[k] = NamedSharding(mesh, spec)
    else:
      out[k] = jax.tree.map(lambda _: NamedSharding(mesh, P()), v)
  return out


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """A NamedSharding for every leaf of `state` by its logical axes (optimizer moments
  follow their parameters; scalars and the rng replicated)."""
  return sharding_lib.state_shardings(state, mesh)


def _same_shapes(micro: Sequence[dict]) -> bool:
  ref = jax.tree.structure(micro[0])
  shapes = [jax.tree.map(np.shape, m) for m in micro]
  return all(jax.tree.structure(m) == ref for m in micro) and all(s == shapes[0] for s in shapes)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_fn: Callable[[jax.Array], jax.Array], *, mesh: Mesh | None = None,
                    state_sharding: TrainState | None = None):
  """Returns `step(state, micro_batches: tuple[dict, ...]) -> (state, metrics)`, jitted with
  donated state and, given a mesh, explicit state shardings in and out.

  metrics: loss (token mean), tokens (loss tokens), grad_norm (before clipping), lr, ok."""

  def loss_fn(params, frozen, rest, mb):
    model = nnx.merge(graphdef, params, frozen, rest)
    out = model(**model_inputs(mb))
    return next_token_ce(out.logits, mb["input_ids"], mb["loss_mask"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, micro: tuple[dict, ...]):
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)

    def accumulate(carry, mb):
      s, n, g = carry
      (ls, ln), grads = grad_fn(state.params, state.frozen, state.rest, mb)
      return (s + ls, n + ln, jax.tree.map(jnp.add, g, grads)), None

    if len(micro) > 1 and _same_shapes(micro):
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro)
      (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, stacked)
    else:
      carry = init
      for mb in micro:
        carry, _ = accumulate(carry, mb)
      loss_sum, count, grads = carry
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply():
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)

    new_state = jax.lax.cond(ok, apply, lambda: state)
    metrics = dict(loss=loss, tokens=count, grad_norm=grad_norm, lr=lr_fn(state.step), ok=ok)
    return new_state, metrics

  if mesh is None or state_sharding is None:
    return jax.jit(step, donate_argnums=0)
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, replicated))

  def run(state: TrainState, micro: tuple[dict, ...]):
    # Place each micro-batch explicitly (token arrays data-parallel, vision replicated);
    # jit then takes the committed shardings of its arguments as in_shardings.
    state = jax.device_put(state, state_sharding) if not _placed(state, state_sharding) else state
    placed = tuple(jax.device_put(mb, batch_shardings(mb, mesh)) for mb in micro)
    return jitted(state, placed)
  run.jitted = jitted
  return run


def _placed(state: TrainState, shardings: TrainState) -> bool:
  leaf, spec = jax.tree.leaves(state)[0], jax.tree.leaves(shardings)[0]
  return isinstance(leaf, jax.Array) and leaf.sharding == spec


def trainable_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model with the state's current parameters (shares buffers; do not donate after)."""
  return nnx.merge(graphdef, state.params, state.frozen, state.rest)
