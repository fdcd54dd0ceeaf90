"""A workdir protects the run it holds: its config, its metrics, and what a failed start left.

- `run_config.json` records the config the run's checkpoints were made with. A rerun in the
  same workdir is compared with it (`check`) before any file is touched: a difference in a
  key outside `ALLOWED_CHANGES` (anything that changes the numbers: model, data, optimizer,
  schedule, steps, seed, stage, recipe, init_from, ...) is refused, naming each key with its
  old and new value and the two ways out (a new `--workdir`, or `--allow_config_change`).
  Every rerun whose config differs is logged in `config_history.jsonl`; the recorded config
  is replaced only after an overriding run ends well (`commit`), never by a refused or
  failed one.
- `finished.json` marks a run that trained to its last step and wrote its eval and export;
  rerunning it is a no-op unless asked (`--rerun_eval`).
- `truncate_metrics` drops, once at restart, the metric rows a resumed run will write again.
- `Guard` removes what a run created when it fails before its first checkpoint (it never
  deletes what was in the workdir before).
A workdir may be a local directory or a `gs://` URL: files go through `deepintuit_jax.core.paths`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

from deepintuit_jax.core import paths
from deepintuit_jax.core.errors import WorkdirConflict

RUN_CONFIG = "run_config.json"
RESOLVED = "resolved_config.txt"
HISTORY = "config_history.jsonl"
FINISHED = "finished.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"

# Keys that may change between runs of one workdir: they change speed, memory, layout,
# logging or the eval cadence, not the numbers of training (model, data order, updates).
ALLOWED_CHANGES = frozenset({
    "train.log_every",        # metric rows
    "train.loss_chunk",       # same loss to 1e-6, less memory
    "data.num_workers",       # decode processes
    "data.prefetch_steps",    # read-ahead
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "checkpoint.export",      # whether hf/ is written at the end
    "eval.every_steps",       # when evals run (not what they compute)
    "eval.batch_size",        # generation batch (memory)
    "model.cache_dir",        # where the built-in tiny model is built (same bytes)
    "model.remat",            # recomputation, same math
    "model.attention_impl",   # attention kernel, same math
    "mesh.shape",             # device layout (resume on another pod shape)
})
_ABSENT = "<absent>"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def plain(config: dict) -> dict:
  """The config as it reads back from JSON (tuples as lists, odd values as strings)."""
  return json.loads(json.dumps(config, sort_keys=True, default=str))


def diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """Dotted key -> (old, new) for every key whose value differs; a key only one side has
  shows `<absent>` on the other."""
  a, b = flatten(plain(old)), flatten(plain(new))
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def latest_checkpoint_step(workdir: str) -> int | None:
  """The latest finalised checkpoint step under `<workdir>/checkpoints` (Orbax renames a
  step directory to its bare number only once the save is complete)."""
  root = paths.as_path(workdir) / CHECKPOINTS
  if not root.is_dir():
    return None
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
  return max(steps) if steps else None


def holds_results(workdir: str) -> bool:
  """A complete checkpoint in the workdir or in one of its sub-workdirs (the steps of a
  chain, configs/deepintuit.py): then a failed run must not remove anything."""
  if latest_checkpoint_step(workdir) is not None:
    return True
  subs = paths.listdir(workdir) if paths.isdir(workdir) else []
  return any(latest_checkpoint_step(os.path.join(workdir, d)) is not None for d in subs)


def _read_json(path: str) -> Any:
  return json.loads(paths.read_text(path))


def _write_json(path: str, obj: Any) -> None:
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _isfile(path: str) -> bool:
  return paths.as_path(path).is_file()


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run in `workdir` will do, decided before any file is touched."""
  workdir: str
  fresh: bool                                # no recorded config: this run records one
  changes: dict[str, tuple[Any, Any]]        # every difference to the recorded config
  overridden: tuple[str, ...]                # differences outside ALLOWED_CHANGES (let
                                             # through by --allow_config_change)
  checkpoint_step: int | None                # latest complete checkpoint
  finished_step: int | None                  # set when the run is finished and unchanged


def _format_changes(changes: dict[str, tuple[Any, Any]], keys) -> str:
  return "\n".join(f"  {k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)


def check(workdir: str, config: dict, *, allow_change: bool = False) -> Plan:
  """Compares `config` with the workdir's recorded one; reads only.

  Raises:
    WorkdirConflict: a key outside ALLOWED_CHANGES differs and `allow_change` is False (the
      message lists each key, old -> new, and the two ways out), or the recorded config is
      unreadable.
  """
  workdir = os.fspath(paths.as_path(workdir))
  ckpt = latest_checkpoint_step(workdir)
  recorded = paths.join(workdir, RUN_CONFIG)
  if not _isfile(recorded):
    return Plan(workdir, True, {}, (), ckpt, None)
  try:
    old = _read_json(recorded)
  except (OSError, ValueError) as e:
    raise WorkdirConflict(f"{recorded} is unreadable ({e}); use a new --workdir") from None
  changes = diff(old, config)
  blocking = tuple(k for k in changes if k not in ALLOWED_CHANGES)
  if blocking and not allow_change:
    held = (f"checkpoints up to step {ckpt}" if ckpt is not None
            else "no checkpoint yet (deleting it loses nothing)")
    raise WorkdirConflict(
        f"workdir {workdir} holds a run made with a different config ({held}); these keys "
        f"differ (recorded -> now):\n{_format_changes(changes, blocking)}\n"
        "Either use a new --workdir for the new config, or pass --allow_config_change to "
        f"continue this run under it (logged in {paths.join(workdir, HISTORY)}).")
  finished = None
  if not blocking and _isfile(paths.join(workdir, FINISHED)):
    try:
      step = int(_read_json(paths.join(workdir, FINISHED))["step"])
    except (OSError, ValueError, KeyError, TypeError):
      step = None
    finished = step if step is not None and step == ckpt else None
  return Plan(workdir, False, changes, blocking, ckpt, finished)


def describe(plan: Plan) -> str:
  """What `record` will log, for the run's printout ("" when nothing differs)."""
  if not plan.changes:
    return ""
  allowed = [k for k in plan.changes if k not in plan.overridden]
  lines = []
  if allowed:
    lines.append("config changes allowed on resume (they do not change the numbers):\n"
                 + _format_changes(plan.changes, allowed))
  if plan.overridden:
    lines.append("config changes accepted by --allow_config_change:\n"
                 + _format_changes(plan.changes, plan.overridden))
  return "\n".join(lines)


def _write_recorded(workdir: str, config: dict, resolved: str | None) -> None:
  _write_json(paths.join(workdir, RUN_CONFIG), plain(config))
  if resolved is not None:
    paths.write_text(paths.join(workdir, RESOLVED), resolved + "\n")


def record(plan: Plan, config: dict, argv: list[str] | None = None, *,
           resolved: str | None = None) -> None:
  """Writes the recorded config (and `resolved`, the stage's dataclasses as text) of a
  fresh workdir; logs the differences of a rerun in config_history.jsonl."""
  if plan.fresh:
    _write_recorded(plan.workdir, config, resolved)
  if plan.changes:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": list(argv or sys.argv),
             "resumed_from_step": plan.checkpoint_step,
             "changes": {k: list(v) for k, v in plan.changes.items()},
             "allowed_by": {k: "--allow_config_change" if k in plan.overridden
                            else "ALLOWED_CHANGES" for k in plan.changes}}
    paths.append_line(paths.join(plan.workdir, HISTORY),
                      json.dumps(entry, sort_keys=True, default=str))


def commit(plan: Plan, config: dict, *, resolved: str | None = None) -> None:
  """After an overriding run ended well: its config becomes the recorded one (the old
  values stay in config_history.jsonl)."""
  if plan.overridden:
    _write_recorded(plan.workdir, config, resolved)


def mark_finished(workdir: str, step: int) -> None:
  _write_json(paths.join(workdir, FINISHED),
              {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def finished_message(plan: Plan) -> str:
  outputs = [n for n in ("eval_report.md", "hf")
             if paths.as_path(plan.workdir).joinpath(n).exists()]
  return (f"workdir {plan.workdir}: this run is finished (step {plan.finished_step}"
          f"{'; ' + ', '.join(outputs) + ' written' if outputs else ''}); nothing to do. "
          "Pass --rerun_eval to evaluate and export it again, or use a new --workdir for a "
          "new run.")


def is_final_output(row: dict) -> bool:
  """Rows a stage writes after training, at the last step: eval rows (they name their
  `split`) and data rows (`skipped/...` counts)."""
  return "split" in row or any(k.startswith("skipped/") for k in row)


def truncate_metrics(path: str, restored_step: int, *, redo_final: bool = False,
                     final_output: Callable[[dict], bool] = is_final_output) -> int:
  """Drops the rows of `metrics.jsonl` that a run resuming at `restored_step` writes again:
  rows past it and an unreadable (half-written) line; with `redo_final` (it resumes at its
  last step, so evaluates and exports again) also the `final_output` rows at that step.
  Rewrites the file atomically, only when something is dropped; returns the rows dropped."""
  if not _isfile(path):
    return 0
  kept, dropped = [], 0
  for line in paths.read_text(path).splitlines(keepends=True):
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if step > restored_step or (redo_final and step == restored_step and final_output(row)):
      dropped += 1
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    paths.write_text(path, "".join(kept))
  return dropped


class Guard:
  """Creates the workdir; when the body fails before the workdir holds a complete
  checkpoint, removes what this run created there: the whole workdir if it did not exist,
  else only the entries that were not there before. `enabled=False` (processes other than
  0) creates nothing and removes nothing."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = os.fspath(paths.as_path(workdir))
    self.enabled = enabled
    self.removed = False

  def _names(self) -> set[str]:
    return {p.name for p in paths.as_path(self.workdir).iterdir()}

  def __enter__(self) -> "Guard":
    self._existed = paths.as_path(self.workdir).is_dir()
    self._before = self._names() if self._existed else set()
    if self.enabled:
      paths.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is None or not self.enabled or holds_results(self.workdir):
      return False
    root = paths.as_path(self.workdir)
    if not self._existed:
      paths.remove(root)
    else:
      for name in self._names() - self._before:
        paths.remove(root / name)
    self.removed = True
    return False
