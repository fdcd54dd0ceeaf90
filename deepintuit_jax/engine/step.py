"""The one jitted train step of every stage: a loss function in, `(state, micro_batches) ->
(state, metrics)` out.

A loss function is `loss_fn(params, frozen, rest, micro_batch) -> (sum, count, aux)`: the
micro-batch's loss *sum* [] float32, its weight [] float32 (tokens for a token mean, rows for
a sequence mean) and a dict of scalar sums weighted like the loss (e.g. clip fractions times
the count). The step owns what every stage shares:
* gradient accumulation over a tuple of micro-batches (`lax.scan` when their shapes agree,
  an unrolled loop otherwise) with *true* means: loss, gradients and every aux value are the
  sums over all micro-batches divided by the total count, so A micro-batches of a batch equal
  the batch in one;
* the optimizer update (global-norm clipping lives in the optax chain, optim.make_optimizer);
* the NaN/Inf stop: a non-finite loss or gradient norm leaves the state unchanged and reports
  `ok = False` (the loop raises before anything is checkpointed);
* donation of the state and, given a mesh, explicit state shardings in and out; batches are
  placed as grouped global arrays (sharding.place_batch with the step's row-axis table);
  an optimizer state whose shardings are in host memory (`state_shardings(...,
  offload_optimizer=True)`) is copied to the devices for the update and back;
* a trace counter: the step compiles once per distinct set of micro-batch shapes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.engine.state import TrainState

LossFn = Callable[[Any, Any, Any, dict], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def same_shapes(micro: Sequence[dict]) -> bool:
  """Whether the micro-batches have one tree structure and the same leaf shapes."""
  ref = jax.tree.structure(micro[0])
  shapes = [jax.tree.map(np.shape, m) for m in micro]
  return all(jax.tree.structure(m) == ref for m in micro) and all(s == shapes[0] for s in shapes)


def stack_micro(micro: Sequence[dict]) -> dict:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *micro)


def on_device(mb: dict) -> bool:
  """Already placed (its arrays are jax Arrays)."""
  leaves = jax.tree.leaves(mb)
  return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


class TrainStep:
  """`step(state, micro_batches: tuple[dict, ...]) -> (state, metrics)`, jitted.

  Args:
    loss_fn: see the module docstring; it receives grouped micro-batches (`input_ids
      [G, b, T]`; an un-grouped `[B, T]` batch is given a group axis of 1).
    tx: the optax transformation; lr_fn: step -> learning rate (reported).
    mesh / state_sharding: place the state and batches on a mesh (both or neither).
    row_axes: the per-row array table for batch placement (default sharding.ROW_AXES).
    count_name: the metric name of the summed count ("tokens" for SFT).
    finalize_aux: (aux sums, count) -> reported metrics, inside jit (default: every aux
      sum / count); e.g. GRPO reports token means of its clip fractions whatever the loss
      aggregation.
  metrics: loss (sum / count), <count_name>, grad_norm (before clipping), lr (of the step
  taken), ok, and the finalized aux.
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation,
               lr_fn: Callable[[jax.Array], jax.Array], *, mesh: Mesh | None = None,
               state_sharding: TrainState | None = None,
               row_axes: dict[str, int] | None = None, count_name: str = "tokens",
               finalize_aux: Callable[[dict, jax.Array], dict] | None = None):
    if (mesh is None) != (state_sharding is None):
      raise ValueError("pass mesh and state_sharding together (or neither)")

    def value(params, frozen, rest, mb):
      s, n, aux = loss_fn(params, frozen, rest, mb)
      return s, (n, aux)

    self._grad = jax.value_and_grad(value, has_aux=True)
    self.tx, self.lr_fn, self.mesh = tx, lr_fn, mesh
    self.state_sharding, self.count_name = state_sharding, count_name
    self.finalize_aux = finalize_aux or (lambda aux, n: {k: v / n for k, v in aux.items()})
    self.row_axes = sharding_lib.ROW_AXES if row_axes is None else row_axes
    self._traces = 0
    self._offloaded = (state_sharding is not None
                       and sharding_lib.is_offloaded(state_sharding.opt_state))
    out = None if mesh is None else (state_sharding, NamedSharding(mesh, P()))
    self.jitted = jax.jit(self._step, donate_argnums=0, out_shardings=out)

  def num_traces(self) -> int:
    """How often the step was traced (= compiled)."""
    return self._traces

  def _step(self, state: TrainState, micro: tuple[dict, ...]):
    self._traces += 1  # Python side effect: runs at trace time only

    def accumulate(carry, mb):
      s, n, g = carry
      (ls, (ln, la)), grads = self._grad(state.params, state.frozen, state.rest, mb)
      la = jax.tree.map(lambda x: x.astype(jnp.float32), la)
      return (s + ls, n + ln, jax.tree.map(jnp.add, g, grads)), la

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    scalar = jnp.zeros((), jnp.float32)
    init = (scalar, scalar, zeros)
    # Aux values are scan outputs (summed after), so their keys need not be known up front.
    if len(micro) > 1 and same_shapes(micro):
      (loss_sum, count, grads), auxs = jax.lax.scan(accumulate, init, stack_micro(micro))
      aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), auxs)
    else:
      carry, auxs = init, []
      for mb in micro:
        carry, la = accumulate(carry, mb)
        auxs.append(la)
      loss_sum, count, grads = carry
      aux = jax.tree.map(lambda *xs: sum(xs), *auxs)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt_state = state.opt_state
    if self._offloaded:
      # The optimizer state lives in host memory: copied in for the update, written back by
      # the out shardings. The barrier ties the copy to the finished gradients, so that XLA
      # does not bring the moments in early and hold them through the backward's peak
      # (7B GRPO update on v5e-16: 0.26 GiB less; docs/accelerators.md).
      opt_state, grads = jax.lax.optimization_barrier((opt_state, grads))
      opt_state = sharding_lib.to_device_memory(opt_state, self.state_sharding.opt_state)

    def apply():
      updates, new_opt = self.tx.update(grads, opt_state, state.params)
      return state.replace(step=state.step + 1,
                           params=optax.apply_updates(state.params, updates),
                           opt_state=new_opt)

    new_state = jax.lax.cond(ok, apply, lambda: state.replace(opt_state=opt_state))
    metrics = dict(self.finalize_aux(aux, denom))
    metrics.update(loss=loss, grad_norm=grad_norm, lr=self.lr_fn(state.step), ok=ok)
    metrics[self.count_name] = count
    return new_state, metrics

  def place(self, mb: dict) -> dict:
    """A host micro-batch -> device arrays (grouped; on the mesh: sharded by group, or by
    row when the data-parallel size does not divide G). Placed batches pass through, so a
    data thread may place batches ahead of the step."""
    if on_device(mb):
      return mb
    grouped = sharding_lib.as_groups(mb)
    if self.mesh is None:
      return jax.device_put(grouped)
    # jit takes the committed shardings of its arguments as in_shardings.
    return sharding_lib.place_batch(grouped, self.mesh, self.row_axes)

  def __call__(self, state: TrainState, micro: tuple[dict, ...]):
    if self.mesh is None:
      return self.jitted(state, tuple(self.place(mb) for mb in micro))
    if not _placed(state, self.state_sharding):
      state = jax.device_put(state, self.state_sharding)
    # Traced with the mesh in context, the decoder scans over its layers and gathers each
    # layer's fsdp-sharded weights inside the scan (text.py), so remat keeps only block
    # inputs and activations stay sharded by group.
    with jax.set_mesh(self.mesh):
      return self.jitted(state, tuple(self.place(mb) for mb in micro))


def _placed(state: TrainState, shardings: TrainState) -> bool:
  leaf, spec = jax.tree.leaves(state)[0], jax.tree.leaves(shardings)[0]
  return isinstance(leaf, jax.Array) and leaf.sharding == spec
