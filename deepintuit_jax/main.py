"""Entry point of every stage:

    python -m deepintuit_jax.main --config=configs/sft.py[:arg] [--workdir=DIR] [--config.a.b=v]
        [--allow_config_change] [--rerun_eval] [--traceback]

The config is a locked ml_collections ConfigDict (an unknown `--config.x` fails, with the
closest key suggested). Its `stage` picks a registered stage, which turns the config into
frozen dataclasses once and runs. Rerunning the same command in the same workdir resumes
from its latest checkpoint; a config that changes the numbers is refused there (see
`deepintuit_jax.core.workdir`), a finished run is not redone. Configuration and input errors
print as one line (`error: ...`, exit code 2) without a traceback unless `--traceback`.
"""
from __future__ import annotations

import logging as py_logging
import os
import re
import sys
from typing import Any, Callable, NamedTuple

from absl import app, flags, logging
from ml_collections import config_flags

from deepintuit_jax.core import distributed, errors, interrupts, paths, recipes
from deepintuit_jax.core import lease as lease_lib, workdir as workdir_lib
from deepintuit_jax.data.errors import BadSample
from deepintuit_jax.stages import preflight

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file [:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory, local or a gs:// URL "
                               "(default runs/<config stem>)")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "continue the workdir's run under a config that differs "
    "from its recorded one in keys that change the numbers (logged in config_history.jsonl)")
_RERUN_EVAL = flags.DEFINE_bool(
    "rerun_eval", False, "rerunning a finished workdir: evaluate and export it again")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "show the traceback of configuration and input errors")

# Mistakes in the config or the inputs: printed as one line, no traceback.
USER_ERRORS = (errors.UserError, BadSample)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


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
  from deepintuit_jax.stages import sft
  return Stage(sft.from_config, sft.run)


def _grpo() -> Stage:
  from deepintuit_jax.stages import grpo
  return Stage(grpo.from_config, grpo.run)


def _traces() -> Stage:
  from deepintuit_jax.stages import traces
  return Stage(traces.from_config, traces.run)


def _calibrate() -> Stage:
  from deepintuit_jax.stages import calibrate
  return Stage(calibrate.from_config, calibrate.run)


def _infer() -> Stage:
  from deepintuit_jax.stages import infer
  return Stage(infer.from_config, infer.run)


def _deepintuit() -> Stage:  # the whole chain; it runs the stages registered here
  import functools
  from deepintuit_jax.stages import chain
  return Stage(chain.from_config, functools.partial(chain.run, stages=_STAGES))


register_stage("sft", _sft)
register_stage("grpo", _grpo)
register_stage("traces", _traces)
register_stage("calibrate", _calibrate)
register_stage("infer", _infer)
register_stage("deepintuit", _deepintuit)


def _imitation() -> Stage:
  from deepintuit_jax.stages import imitation
  return Stage(imitation.from_config, imitation.run)


register_stage("imitation", _imitation)


def get_stage(name: str) -> Stage:
  if name not in _STAGES:
    raise errors.ConfigError(f"stage={name!r} unknown; registered: {sorted(_STAGES)}")
  return _STAGES[name]()


def default_workdir(config_arg: str) -> str:
  stem = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
  return os.path.join("runs", stem)


def maybe_initialize_distributed() -> None:
  """Multi-process JAX when launched as one of several processes (explicit
  JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, SLURM, Open MPI, TPU pod);
  a single process is left alone (`deepintuit_jax.core.distributed`)."""
  distributed.maybe_initialize()


# transformers' notices that say nothing to a user of this framework (it never uses
# transformers' PyTorch models; Qwen2.5-VL's config carries the legacy rope keys).
_QUIET = {"transformers": ("PyTorch was not found",),
          "transformers.configuration_utils": ("got `key=rope_scaling` in kwargs",),
          "transformers.modeling_rope_utils": ("Unrecognized keys in `rope_parameters`",)}


class _DropMessages(py_logging.Filter):
  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: py_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(p in message for p in self.prefixes)


def quiet_transformers() -> None:
  """Drops only the notices in `_QUIET` (before transformers is imported: it logs the
  PyTorch one at import); every other transformers warning still shows."""
  for name, prefixes in _QUIET.items():
    logger = py_logging.getLogger(name)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
      logger.addFilter(_DropMessages(prefixes))


def flag_error_message(e: BaseException, argv: list[str]) -> str:
  """One line for a bad command line: a misspelt `--config.x` gets ml_collections'
  suggestion first."""
  raw = str(e)
  if "Traceback (most recent call last)" in raw:  # a config file's own error, as text
    lines = [x.strip() for x in raw.splitlines() if x.strip()]
    return f"{raw.splitlines()[0].split(': Error whilst')[0]}: {lines[-1]}"
  text = re.sub(r"\s+", " ", raw.replace("\\n", " ")).strip()
  m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
  if m:
    right, wrong = m.groups()
    for arg in argv:
      flag = arg.split("=", 1)[0]
      if flag.startswith("--config.") and re.search(rf"\b{re.escape(wrong)}\b", flag):
        fixed = re.sub(rf"\b{re.escape(wrong)}\b", right, flag, count=1)
        return f"did you mean {fixed}? {flag} is not a config key"
    return f"did you mean {right!r} instead of {wrong!r}? (not a config key)"
  return text if len(text) < 400 else text[:400] + "..."


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (the command line is the user's: one line, exit 2)
    if "--traceback" in argv:
      raise
    print(f"error: {flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _main()
  except USER_ERRORS as e:
    if _TRACEBACK.value:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  except interrupts.Interrupted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    workdir = _workdir_or_none()
    step = workdir_lib.latest_checkpoint_step(workdir) if workdir else None
    print("interrupted; " + (f"a rerun resumes from step {step} (the latest complete "
                             "checkpoint)" if step is not None else
                             "no checkpoint was written: a rerun starts from the beginning"),
          file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def _workdir_or_none() -> str | None:
  config = _CONFIG.value
  if config is None:
    return None
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  return os.fspath(paths.as_path(_WORKDIR.value or default_workdir(config_file)))  # or gs://


def _from_config(stage: Stage, config) -> Any:
  """The stage's config -> dataclasses step validates the config: its ValueError /
  KeyError / FileNotFoundError are config errors (a one-line message naming the key)."""
  try:
    return stage.from_config(config)
  except USER_ERRORS:
    raise
  except (ValueError, KeyError, FileNotFoundError) as e:
    if _TRACEBACK.value:
      raise
    message = str(e) if not isinstance(e, KeyError) else f"unknown value {e}"
    raise errors.ConfigError(f"config: {message}") from e


def _main() -> None:
  quiet_transformers()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/sft.py")
  try:
    "stage" in config  # ml_collections defers a config file's load error to the first access
  except OSError as e:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    raise errors.ConfigError(f"--config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}"
                             f": cannot load the config file ({lines[-1]})") from None
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  # The numbers the run uses: the release's for a real checkpoint (deepintuit_jax/core/recipes.py);
  # printed and recorded in the workdir as they are.
  config = recipes.resolve(config)
  preflight.check_config(config)  # reads only: a refused or invalid run touches no file
  workdir = _workdir_or_none()
  stage = get_stage(config.stage)
  maybe_initialize_distributed()
  import jax

  is_main = jax.process_index() == 0
  with lease_lib.Lease(workdir, enabled=is_main) as lease:  # one run per workdir
    if lease.note:
      print(lease.note, flush=True)
    _run(stage, config, workdir, is_main)


def _run(stage: Stage, config, workdir: str, is_main: bool) -> None:
  """The run, once it holds the workdir: the comparison with the recorded config and the
  finished check only read; a failed start is cleaned up by the Guard."""
  from deepintuit_jax.core import sharding

  recorded = config.to_dict()
  plan = workdir_lib.check(workdir, recorded, allow_change=_ALLOW_CHANGE.value)
  if plan.finished_step is not None and not _RERUN_EVAL.value:
    print(workdir_lib.finished_message(plan), flush=True)
    return
  cfg = _from_config(stage, config)
  with workdir_lib.Guard(workdir, enabled=is_main):
    if is_main:
      print(f"workdir: {workdir}\nconfig:\n{config}\nresolved: {cfg!r}", flush=True)
      if workdir_lib.describe(plan):
        print(workdir_lib.describe(plan), flush=True)
      workdir_lib.record(plan, recorded, resolved=repr(cfg))
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    try:
      stage.run(cfg, workdir=workdir, mesh=mesh)
    except interrupts.Interrupted:  # stopped well: its checkpoints are of the new config
      if is_main and workdir_lib.latest_checkpoint_step(workdir) is not None:
        workdir_lib.commit(plan, recorded, resolved=repr(cfg))
      raise
  if is_main:
    workdir_lib.commit(plan, recorded, resolved=repr(cfg))
    step = workdir_lib.latest_checkpoint_step(workdir)
    if step is not None:
      workdir_lib.mark_finished(workdir, step)

if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
