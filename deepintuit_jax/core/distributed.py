"""Multi-process JAX: when and how `main` calls `jax.distributed.initialize`.

Launch environments, in the order they are looked at:
* explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0) with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (this process's index, 0-based); jax itself reads only the address, so
  the count and index are passed in. A count without an index (or the reverse) is an error.
* SLURM (`SLURM_NTASKS` > 1), Open MPI (`OMPI_COMM_WORLD_SIZE` > 1) and Cloud TPU pods
  (several `TPU_WORKER_HOSTNAMES`): `initialize()` without arguments, jax's cluster
  auto-detection reads the coordinator, count and index from them.
* anything else (one process, e.g. a laptop or one GPU host): left alone.

CPU processes exchange collectives through gloo (`jax_cpu_collectives_implementation`; the
default in jax 0.10, set explicitly so that an older or changed default cannot leave a
multi-process CPU run without cross-process collectives).
"""
from __future__ import annotations

import os
from typing import Mapping

from deepintuit_jax.core.errors import ConfigError


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
  raw = env.get(key)
  if raw is None or raw == "":
    return default
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(f"environment variable {key}={raw!r} is not an integer") from None


def init_args(env: Mapping[str, str]) -> dict | None:
  """The keyword arguments of `jax.distributed.initialize` for the environment `env`, or
  None for a single process. {} = let jax detect the cluster (SLURM, Open MPI, TPU pod).

  Raises:
    ConfigError: a malformed or inconsistent explicit setting (names the variable).
  """
  address = env.get("JAX_COORDINATOR_ADDRESS", "")
  count, index = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
  if address or count is not None or index is not None:
    given = (("JAX_COORDINATOR_ADDRESS", address), ("JAX_NUM_PROCESSES", count),
             ("JAX_PROCESS_ID", index))
    missing = [k for k, v in given if v in ("", None)]
    if missing:
      raise ConfigError("an explicit multi-process launch needs JAX_COORDINATOR_ADDRESS "
                        f"(host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID; missing: "
                        f"{', '.join(missing)}")
    if count < 1 or not 0 <= index < count:
      raise ConfigError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count})")
    if count == 1:
      return None
    return dict(coordinator_address=address, num_processes=count, process_id=index)
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if (_int(env, "SLURM_NTASKS", 1) > 1 or _int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1
      or len(hosts) > 1):
    return {}
  return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
  """Initialises jax.distributed when `env` (default os.environ) says this is one of
  several processes; returns whether it did. Must run before any jax computation."""
  args = init_args(os.environ if env is None else env)
  if args is None:
    return False
  import jax
  if (os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"
      and "jax_cpu_collectives_implementation" in jax.config.values):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  return True
