"""Entry point of every stage:

    python -m deepintuit_jax.main --config=configs/sft.py[:arg] [--workdir=DIR] [--config.a.b=v]

The config is a locked ml_collections ConfigDict (an unknown `--config.x` fails). Its
`stage` picks a registered stage, which turns the config into frozen dataclasses once and
runs. Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file [:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default runs/<config stem>)")


class Stage(NamedTuple):
  from_config: Callable[[Any], Any]   # ConfigDict -> frozen dataclass
  run: Callable[..., Any]             # (cfg, *, workdir, mesh) -> results


_STAGES: dict[str, Callable[[], Stage]] = {}


def register_stage(name: str, loader: Callable[[], Stage]) -> None:
  """Registers a stage by name; `loader` imports it lazily (so main stays light)."""
  if name in _STAGES:
    raise ValueError(f"stage {name!r} registered twice")
  _STAGES[name] = loader


def _sft() -> Stage:
  from deepintuit_jax.trainers import sft_stage
  return Stage(sft_stage.from_config, sft_stage.run)


def _grpo() -> Stage:
  from deepintuit_jax.trainers import grpo_stage
  return Stage(grpo_stage.from_config, grpo_stage.run)


def _traces() -> Stage:
  from deepintuit_jax.trainers import traces_stage
  return Stage(traces_stage.from_config, traces_stage.run)


def _calibrate() -> Stage:
  from deepintuit_jax.trainers import calibrate_stage
  return Stage(calibrate_stage.from_config, calibrate_stage.run)


def _infer() -> Stage:
  from deepintuit_jax.trainers import infer_stage
  return Stage(infer_stage.from_config, infer_stage.run)


def _deepintuit() -> Stage:  # the whole chain; it runs the stages registered here
  import functools
  from deepintuit_jax.trainers import chain
  return Stage(chain.from_config, functools.partial(chain.run, stages=_STAGES))


register_stage("sft", _sft)
register_stage("grpo", _grpo)
register_stage("traces", _traces)
register_stage("calibrate", _calibrate)
register_stage("infer", _infer)
register_stage("deepintuit", _deepintuit)


def get_stage(name: str) -> Stage:
  if name not in _STAGES:
    raise ValueError(f"config.stage={name!r} unknown; registered: {sorted(_STAGES)}")
  return _STAGES[name]()


def default_workdir(config_arg: str) -> str:
  stem = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
  return os.path.join("runs", stem)


def maybe_initialize_distributed() -> None:
  """Multi-process JAX when launched on several hosts (SLURM, Open MPI, TPU pod, or an
  explicit coordinator); a single process (e.g. one CPU) is left alone."""
  import jax
  env = os.environ
  multi = (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
           or "JAX_COORDINATOR_ADDRESS" in env or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
           or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
  if multi:
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/sft.py")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  maybe_initialize_distributed()
  import jax
  from deepintuit_jax import sharding

  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = os.path.abspath(_WORKDIR.value or default_workdir(config_file))
  stage = get_stage(config.stage)
  cfg = stage.from_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    print(f"workdir: {workdir}\nconfig:\n{config}\nresolved: {cfg!r}", flush=True)
    with open(os.path.join(workdir, "run_config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
    with open(os.path.join(workdir, "resolved_config.txt"), "w") as f:
      f.write(repr(cfg) + "\n")
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  stage.run(cfg, workdir=workdir, mesh=mesh)


if __name__ == "__main__":
  app.run(main)
