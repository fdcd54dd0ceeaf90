"""TPU slice names (`v5p-16`, `v5e-8`, ...) -> the devices of that slice, for compiling on a
machine without TPUs (`launch/aot_check.py --topology=...`).

`jax.experimental.topologies.get_topology_desc` builds compile-only devices of any TPU
topology from libtpu (`pip install "jax[tpu]"`; no TPU needed, one process at a time may load
libtpu). It wants the physical topology ("v5:2x2x2"), not the name users rent ("v5p-16"):
`slice_spec` derives one from the other.

Naming: v4 and v5p names count TensorCores (2 per chip, one "megacore" device per chip), so
`v5p-16` is 8 chips; v5e and v6e names count chips (one core each). Hosts hold 4 chips
(v4, v5p, and v5e / v6e slices beyond 8 chips) or all 8 (v5e-8, v6e-8: one host).
"""
from __future__ import annotations

import dataclasses

# Per-chip HBM XLA:TPU compiles against: the "available HBM" of its own CompileTimeHbmOom
# message, read from libtpu 0.0.50.1 (a program needing 600 GiB compiled for each kind).
HBM_GIB = {"v4": 30.75, "v5p": 95.73, "v5e": 15.75, "v6e": 31.24}
_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  name: str                 # "v5p-16"
  generation: str           # "v5p"
  chips: int                # devices of one slice (one per chip)
  topology: str             # "v5:2x2x2"
  chip_config: str          # "megacore" (v4, v5p) or "default"
  host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]

  @property
  def hbm_gib(self) -> float:
    return HBM_GIB[self.generation]


def _shape_3d(chips: int) -> tuple[int, int, int]:
  """v4 / v5p slices: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the smallest side
  doubled first, as Cloud TPU lays them out)."""
  dims = [2, 2, 1]
  while dims[0] * dims[1] * dims[2] < chips:
    i = min(range(3), key=lambda k: (dims[k], -k))
    dims[i] *= 2
  return tuple(dims)  # type: ignore[return-value]


def _shape_2d(chips: int) -> tuple[int, int]:
  """v5e / v6e slices: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  a, b = 1, 1
  while a * b < chips:
    if a < b:
      a *= 2
    else:
      b *= 2
  return (a, b)


def slice_spec(name: str) -> SliceSpec:
  """`v4-8`, `v5p-16`, `v5e-8` (also `v5litepod-8`), `v6e-16`, ... -> its SliceSpec."""
  gen, _, count = name.lower().replace("v5litepod", "v5e").partition("-")
  if gen not in _PREFIX or not count.isdigit():
    raise ValueError(f"--topology {name!r}: expected <generation>-<count> with generation "
                     f"one of {sorted(_PREFIX)} (e.g. v5p-16, v5e-8, v6e-16, v4-8)")
  chips = int(count) // _CORES_PER_CHIP[gen]
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology {name!r}: {chips} chips; slices have a power-of-two count")
  if gen in ("v4", "v5p"):
    if chips < 4:
      raise ValueError(f"--topology {name!r}: the smallest {gen} slice is {gen}-8 (4 chips)")
    dims = _shape_3d(chips)
    wrap = (min(dims) >= 4,) * 3  # a full 4x4x4 cube and beyond has wraparound links
    return SliceSpec(name, gen, chips, f"{_PREFIX[gen]}:{'x'.join(map(str, dims))}",
                     "megacore", (2, 2, 1), wrap)
  a, b = _shape_2d(chips)
  host = (a, b, 1) if chips <= 8 else (2, 2, 1)
  wrap = (a >= 16, b >= 16, False)
  return SliceSpec(name, gen, chips, f"{_PREFIX[gen]}:{a}x{b}", "default", host, wrap)


def devices(spec: SliceSpec, num_slices: int = 1) -> list:
  """The compile-only devices of `num_slices` slices of `spec` (slice-major)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(
      topology_name=spec.topology, platform="tpu", chip_config_name=spec.chip_config,
      chips_per_host_bounds=spec.host_bounds, num_slices=num_slices, wrap=spec.wrap)
  return list(topo.devices)
