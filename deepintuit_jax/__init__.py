"""DeepIntuit in JAX/Flax NNX. The layout and its import rules: docs/ARCHITECTURE.md.

Modules moved when the package took its layered layout (core / models / data, sampling /
engine / algorithms / evals / stages) keep their former import paths: `MOVED` maps each
former path to the module's home, and importing a former path gives the module itself (the
same object, so a reward file written against `deepintuit_jax.trainers.grpo.rewards`
registers into the one registry). New code imports the homes.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

_P = "deepintuit_jax"
MOVED = {
    f"{_P}.errors": f"{_P}.core.errors", f"{_P}.paths": f"{_P}.core.paths",
    f"{_P}.sharding": f"{_P}.core.sharding", f"{_P}.distributed": f"{_P}.core.distributed",
    f"{_P}.interrupts": f"{_P}.core.interrupts", f"{_P}.lease": f"{_P}.core.lease",
    f"{_P}.workdir": f"{_P}.core.workdir", f"{_P}.recipes": f"{_P}.core.recipes",
    f"{_P}.preflight": f"{_P}.stages.preflight",
    f"{_P}.checkpointing": f"{_P}.engine.checkpointing",
    f"{_P}.trainers.state": f"{_P}.engine.state", f"{_P}.trainers.step": f"{_P}.engine.step",
    f"{_P}.trainers.loop": f"{_P}.engine.loop", f"{_P}.trainers.optim": f"{_P}.engine.optim",
    f"{_P}.trainers.logprobs": f"{_P}.engine.logprobs",
    f"{_P}.trainers.sft": f"{_P}.algorithms.sft",
    f"{_P}.trainers.calibrate": f"{_P}.algorithms.calibrator",
    f"{_P}.trainers.grpo": f"{_P}.algorithms.grpo",
    f"{_P}.trainers.imitation": f"{_P}.stages.imitation",
    f"{_P}.trainers.stage": f"{_P}.stages.common",
    f"{_P}.trainers.sft_stage": f"{_P}.stages.sft",
    f"{_P}.trainers.grpo_stage": f"{_P}.stages.grpo",
    f"{_P}.trainers.traces_stage": f"{_P}.stages.traces",
    f"{_P}.trainers.calibrate_stage": f"{_P}.stages.calibrate",
    f"{_P}.trainers.infer_stage": f"{_P}.stages.infer",
    f"{_P}.trainers.chain": f"{_P}.stages.chain",
    f"{_P}.models.testing": f"{_P}.models.tiny",
}
# Former packages that have no single home: empty packages whose children are in MOVED.
_FORMER_PACKAGES = (f"{_P}.trainers",)


def moved_to(name: str) -> str | None:
  """The home of a former module path (a child of a moved package included), else None."""
  for old in sorted(MOVED, key=len, reverse=True):
    if name == old or name.startswith(old + "."):
      return MOVED[old] + name[len(old):]
  return None


class _FormerPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Resolves a former path to the module at its home (imported there, once)."""

  def find_spec(self, name, path=None, target=None):
    if name in _FORMER_PACKAGES:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    if moved_to(name) is None:
      return None
    return importlib.machinery.ModuleSpec(name, self)

  def create_module(self, spec):
    if spec.name in _FORMER_PACKAGES:
      module = types.ModuleType(spec.name, f"Former package; its modules moved ({__name__}).")
      module.__path__ = []
      return module
    module = importlib.import_module(moved_to(spec.name))
    spec.loader_state = module.__spec__  # the import machinery then sets the former spec
    return module

  def exec_module(self, module):
    home = module.__spec__.loader_state
    if home is not None:  # the home module: give it its own spec back
      module.__spec__ = home


if not any(isinstance(f, _FormerPaths) for f in sys.meta_path):
  sys.meta_path.insert(0, _FormerPaths())
