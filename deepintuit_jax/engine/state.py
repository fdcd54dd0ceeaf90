"""The training state every stage trains and checkpoints (no trainer knowledge here, so that
checkpointing and any stage can import it)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.engine import optim


@flax.struct.dataclass
class TrainState:
  """step [] int32 (optimizer steps taken); params: trainable nnx.State; frozen: frozen
  params (no optimizer state); rest: non-parameter model state (usually empty); opt_state:
  optax state of the trainable params; rng: [2] uint32 raw key data (stages fold in the step
  to derive per-step keys, so the key sequence resumes exactly)."""
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


def state_shardings(state: TrainState, mesh: Mesh, *, offload_optimizer: bool = False
                    ) -> TrainState:
  """A NamedSharding for every leaf of `state` by its logical axes (optimizer moments
  follow their parameters; scalars and the rng replicated). offload_optimizer: the optimizer
  state lives in host memory (sharding.HOST_MEMORY), laid out as on the devices; the train
  step copies it in for the update and writes it back (engine/step.py)."""
  out = sharding_lib.state_shardings(state, mesh)
  if offload_optimizer:
    out = out.replace(opt_state=sharding_lib.in_host_memory(out.opt_state))
  return out


def trainable_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The model with the state's current parameters (shares buffers; do not donate after)."""
  return nnx.merge(graphdef, state.params, state.frozen, state.rest)


def step_key(state: TrainState, *salt: int) -> jax.Array:
  """A PRNG key for the state's current step (and optional salts): fold_in(rng, step, ...).
  Derived from checkpointed values only, so a resumed run draws the same keys."""
  key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.rng)), state.step)
  for s in salt:
    key = jax.random.fold_in(key, s)
  return key
