"""Meshes and logical-axis sharding.

Every parameter is an `nnx.Param(value, logical_axes=(...))` with one logical name per
dimension (or None). One rules table maps logical names to the mesh axes
(`data`, `fsdp`, `tensor`). We keep the names in our own `logical_axes` metadata key
instead of flax's `sharding_names` so that building a model never needs a mesh context
(flax>=0.12 shards eagerly when that key is set) and the code is the same across flax
versions.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("patch", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("layers", None),
    ("length", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of `shape` over `axes`; one -1 entry takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def logical_to_spec(logical_axes: Iterable[str | None] | None, rules=DEFAULT_RULES,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical axis names. A mesh axis is used at most once; with `mesh`
  and `shape`, an axis that does not divide its dimension is dropped (replicated)."""
  if logical_axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule")
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
    if mesh is not None and shape is not None and axes:
      size = int(np.prod([mesh.shape[a] for a in axes]))
      if shape[i] % size:
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def variable_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
  meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
  return meta.get("logical_axes")


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """Same tree as `state` with a NamedSharding for every leaf (by its logical axes)."""
  def one(v):
    shape = getattr(v, "shape", None) or np.shape(v.value if hasattr(v, "value") else v)
    axes = variable_axes(v) if isinstance(v, nnx.Variable) else None
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def variable_sharding(v: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """The NamedSharding of one variable under `rules` (by its logical axes and shape)."""
  return NamedSharding(mesh, logical_to_spec(variable_axes(v), rules, mesh, v.get_value().shape))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves every variable of `model` into its NamedSharding, in place; returns `model`.

  For a model already in memory (e.g. built from scratch); `from_pretrained(..., mesh=)`
  loads straight into the shardings instead.
  """
  for _, var in nnx.to_flat_state(nnx.state(model)):
    var.set_value(jax.device_put(var.get_value(), variable_sharding(var, mesh, rules)))
  return model
