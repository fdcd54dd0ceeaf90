"""Supervised fine-tuning: token-weighted next-token cross-entropy and one jitted train step.

The step is a pure function `(state, micro_batches) -> (state, metrics)`:
* data-parallel vision: a micro-batch is G *groups* (leading axis: `input_ids [G, b, T]`,
  `pixel_values_videos [G, Np, patch_dim]`, layout leaves `[G, ...]`, `position_ids
  [G, 3, b, T]`; see data/batching.py), each holding its own rows and only their videos.
  The group axis is sharded over ("data", "fsdp") and the loss is `jax.vmap` over groups of
  one pure per-group function, so each device runs the vision tower on its own videos only.
  An un-grouped batch (`input_ids [B, T]`) is one group (G = 1: rows sharded, vision
  replicated, as before grouping existed);
* batches are assembled into global arrays with `jax.make_array_from_process_local_data`
  (each process contributes its local groups; several hosts agree on padded shapes in the
  loader, `pipeline.process_max`);
* optional chunked cross-entropy (`loss_chunk` tokens per chunk): the model returns the
  final hidden state and logits are computed chunk by chunk under `jax.checkpoint`, so
  neither the forward nor the backward holds more than one chunk's `[chunk, V]` logits;
* the jitted step compiles once per distinct set of padded shapes, i.e. per (length
  bucket, patch bucket) pair of its micro-batches (`step.num_traces()` counts traces);
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
# Row (batch) dimension of the token arrays inside one group.
_ROW_AXIS = {"input_ids": 0, "attention_mask": 0, "loss_mask": 0, "position_ids": 1}


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


def chunked_next_token_ce(hidden: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                          logits_fn: Callable[[jax.Array], jax.Array], chunk: int
                          ) -> tuple[jax.Array, jax.Array]:
  """`next_token_ce(logits_fn(hidden), ...)` without materialising [B, T, V] logits.

  hidden [B, T, D] (final-normed); input_ids, loss_mask [B, T] as in `next_token_ce`;
  logits_fn: [C, D] -> [C, V] (e.g. `model.compute_logits`); chunk: at most C tokens per
  chunk. The B * T positions are flattened, split into ceil(B*T / C) equal chunks (the last
  padded with zero weight) and scanned chunk by chunk; each chunk is `jax.checkpoint`ed, so the backward recomputes its logits
  instead of keeping them. Returns (sum [] float32, count [] float32).
  """
  if chunk <= 0:
    raise ValueError(f"loss chunk {chunk} must be positive")
  b, t, d = hidden.shape
  targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
  # The last position has no next token: weight 0 whatever the mask says.
  weights = loss_mask.astype(jnp.float32) * (jnp.arange(t) < t - 1)
  n = b * t
  n_chunks = -(-n // chunk)
  chunk = -(-n // n_chunks)  # balanced: at most n_chunks - 1 padding positions in all
  pad = n_chunks * chunk - n

  def split(x, fill):
    x = x.reshape((n,) + x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((n_chunks, chunk) + x.shape[1:])

  @jax.checkpoint
  def chunk_loss(h, tgt, w):
    logits = logits_fn(h).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - target_logit) * w)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (split(hidden, 0), split(targets, 0), split(weights, 0)))
  return total, jnp.sum(weights)


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


def is_grouped(batch: dict) -> bool:
  """A grouped batch has `input_ids [G, b, T]`; an un-grouped one `[B, T]`."""
  ndim = np.ndim(batch["input_ids"])
  if ndim not in (2, 3):
    raise ValueError(f"input_ids must be [B, T] or [G, b, T], got shape "
                     f"{np.shape(batch['input_ids'])}")
  return ndim == 3


def as_groups(batch: dict) -> dict:
  """The batch with a leading group axis (an un-grouped batch becomes one group)."""
  if is_grouped(batch):
    return batch
  return jax.tree.map(lambda x: np.asarray(x)[None], batch)


def local_data_groups(mesh: Mesh) -> int:
  """How many data-parallel shards (distinct ("data", "fsdp") coordinates) this process's
  devices hold: the number of groups its batches should have."""
  axes = [i for i, name in enumerate(mesh.axis_names) if name in ("data", "fsdp")]
  me = jax.process_index()
  coords = {tuple(idx[i] for i in axes) for idx in np.ndindex(mesh.devices.shape)
            if mesh.devices[idx].process_index == me}
  return max(len(coords), 1)


def _data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def batch_shardings(batch: dict, mesh: Mesh, num_groups: int | None = None) -> dict:
  """Shardings of a grouped batch (`num_groups` global groups; default: this batch's G
  times the process count).

  When the data-parallel size divides G, every array is split over ("data", "fsdp") on its
  group axis: each device holds whole groups, vision inputs included. Otherwise (G = 1 on
  one process) the token arrays are split on their row axis when it divides and the vision
  inputs are replicated."""
  g = num_groups if num_groups is not None else (
      np.shape(batch["input_ids"])[0] * jax.process_count())
  rules = sharding_lib.DEFAULT_RULES
  if g % _data_parallel_size(mesh) == 0:
    def by_group(x):
      shape = (g,) + np.shape(x)[1:]
      return NamedSharding(mesh, sharding_lib.logical_to_spec(
          ("batch",) + (None,) * (len(shape) - 1), rules, mesh, shape))
    return jax.tree.map(by_group, batch)
  out = {}
  for k, v in batch.items():
    if k in _ROW_AXIS:
      shape = np.shape(v)
      axes = [None] * len(shape)
      axes[_ROW_AXIS[k] + 1] = "batch"
      out[k] = NamedSharding(mesh, sharding_lib.logical_to_spec(axes, rules, mesh, shape))
    else:
      out[k] = jax.tree.map(lambda _: NamedSharding(mesh, P()), v)
  return out


def place_batch(batch: dict, mesh: Mesh) -> dict:
  """A process-local grouped batch -> global jax Arrays on `mesh`.

  Each process passes its own G_local groups; the global group axis is
  G_local * process_count, assembled with `jax.make_array_from_process_local_data` (on one
  process this is a plain placement). Several processes need the group axis sharded (the
  data-parallel size must divide the global G)."""
  pc = jax.process_count()
  g = np.shape(batch["input_ids"])[0] * pc
  if pc > 1 and g % _data_parallel_size(mesh):
    raise ValueError(f"{g} global batch groups do not divide over the data-parallel size "
                     f"{_data_parallel_size(mesh)} of mesh {dict(mesh.shape)}: with several "
                     "processes every process must feed whole groups")
  shardings = batch_shardings(batch, mesh, g)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(s, x, (x.shape[0] * pc,) + x.shape[1:])
  return jax.tree.map(put, batch, shardings)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """A NamedSharding for every leaf of `state` by its logical axes (optimizer moments
  follow their parameters; scalars and the rng replicated)."""
  return sharding_lib.state_shardings(state, mesh)


def _same_shapes(micro: Sequence[dict]) -> bool:
  ref = jax.tree.structure(micro[0])
  shapes = [jax.tree.map(np.shape, m) for m in micro]
  return all(jax.tree.structure(m) == ref for m in micro) and all(s == shapes[0] for s in shapes)


def make_loss_fn(graphdef: nnx.GraphDef, loss_chunk: int = 0):
  """`loss_fn(params, frozen, rest, batch) -> (loss sum, token count)` for a grouped batch:
  a pure per-group function vmapped over the group axis (called directly when G = 1),
  sums over groups. loss_chunk > 0: chunked cross-entropy (`chunked_next_token_ce`)."""

  def group_loss(params, frozen, rest, g):
    model = nnx.merge(graphdef, params, frozen, rest)
    if loss_chunk:
      out = model(**model_inputs(g), return_hidden=True)
      return chunked_next_token_ce(out.hidden, g["input_ids"], g["loss_mask"],
                                   model.compute_logits, loss_chunk)
    out = model(**model_inputs(g))
    return next_token_ce(out.logits, g["input_ids"], g["loss_mask"])

  def loss_fn(params, frozen, rest, mb):
    if mb["input_ids"].shape[0] == 1:
      return group_loss(params, frozen, rest, jax.tree.map(lambda x: x[0], mb))
    sums, counts = jax.vmap(group_loss, in_axes=(None, None, None, 0))(params, frozen, rest, mb)
    return jnp.sum(sums), jnp.sum(counts)
  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_fn: Callable[[jax.Array], jax.Array], *, mesh: Mesh | None = None,
                    state_sharding: TrainState | None = None, loss_chunk: int = 0):
  """Returns `step(state, micro_batches: tuple[dict, ...]) -> (state, metrics)`, jitted with
  donated state and, given a mesh, explicit state shardings in and out. Micro-batches may
  be grouped (`input_ids [G, b, T]`) or not (`[B, T]`, one group).

  metrics: loss (token mean), tokens (loss tokens), grad_norm (before clipping), lr, ok.
  `step.num_traces()` counts how often the step was traced (= compiled): once per distinct
  set of micro-batch shapes."""
  if loss_chunk < 0:
    raise ValueError(f"loss_chunk={loss_chunk} must be >= 0 (0 = unchunked)")
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, loss_chunk), has_aux=True)
  traces = [0]

  def step(state: TrainState, micro: tuple[dict, ...]):
    traces[0] += 1  # Python side effect: runs at trace time only
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
    jitted = jax.jit(step, donate_argnums=0)

    def place(mb: dict) -> dict:
      return mb if _on_device(mb) else jax.device_put(as_groups(mb))

    def run(state: TrainState, micro: tuple[dict, ...]):
      return jitted(state, tuple(place(mb) for mb in micro))
  else:
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, replicated))

    def place(mb: dict) -> dict:
      # Groups data-parallel (see batch_shardings); jit then takes the committed shardings
      # of its arguments as in_shardings.
      return mb if _on_device(mb) else place_batch(as_groups(mb), mesh)

    def run(state: TrainState, micro: tuple[dict, ...]):
      if not _placed(state, state_sharding):
        state = jax.device_put(state, state_sharding)
      return jitted(state, tuple(place(mb) for mb in micro))
  run.jitted = jitted
  # `place` lets a data thread transfer batches ahead of the step (run skips placed ones).
  run.place = place
  run.num_traces = lambda: traces[0]
  return run


def _on_device(mb: dict) -> bool:
  """Already placed by `step.place` (its token ids are a jax Array)."""
  return isinstance(mb.get("input_ids"), jax.Array)


def _placed(state: TrainState, shardings: TrainState) -> bool:
  leaf, spec = jax.tree.leaves(state)[0], jax.tree.leaves(shardings)[0]
  return isinstance(leaf, jax.Array) and leaf.sharding == spec


def trainable_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model with the state's current parameters (shares buffers; do not donate after)."""
  return nnx.merge(graphdef, state.params, state.frozen, state.rest)
