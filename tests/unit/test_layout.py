"""The package's layers (docs/ARCHITECTURE.md, "Layers"): imports point one way, from the
stages down to core; stage entry points do not import each other; no module imports itself
back through others; build and check tools stay outside the package; former import paths
still give the moved modules."""
from __future__ import annotations

import ast
import importlib
import os

import pytest

import deepintuit_jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "deepintuit_jax")

# Lowest first: a module may import modules of its own layer and of the layers below.
LAYERS = (
    ("core", ("core",)),
    ("models", ("models",)),
    ("data", ("data", "sampling", "serving")),
    ("engine", ("engine",)),
    ("algorithms", ("algorithms",)),
    ("evals", ("evals",)),
    ("stages", ("stages", "main")),
)
# Shared parts of the stages layer; every other stages module is one stage's entry point.
STAGE_PARTS = ("common", "specs", "preflight")
OUTSIDE = ("tools", "tests", "benchmarks", "scripts", "launch", "configs")


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(d, f)
  return out


def _walk(node):
  """ast.walk without the bodies of `if TYPE_CHECKING:` (annotations only, never run)."""
  yield node
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
      continue
    yield from _walk(child)


def _imports(path: str, modules) -> set[str]:
  """Every module of the package (or outside it) that `path` imports, lazy imports included."""
  out = set()
  for node in _walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from pkg import mod` names a module; `from mod import name` a name of mod.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    out.update(n for n in names if n.split(".")[0] in ("deepintuit_jax",) + OUTSIDE)
  return out


def _layer(module: str) -> int:
  part = module.split(".")[1] if module.count(".") else ""
  for i, (_, tops) in enumerate(LAYERS):
    if part in tops:
      return i
  raise AssertionError(f"{module}: in no layer of LAYERS")


MODULES = _modules()
IMPORTS = {m: _imports(p, MODULES) for m, p in MODULES.items()}


def test_every_module_sits_in_a_layer():
  for m in MODULES:
    if m != "deepintuit_jax":
      _layer(m)


def test_imports_point_down_the_layers():
  wrong = []
  for m, deps in IMPORTS.items():
    if m == "deepintuit_jax":
      continue
    for d in deps:
      if d.split(".")[0] != "deepintuit_jax":
        wrong.append(f"{m} imports {d}: build and check tools stay outside the package")
      elif d != "deepintuit_jax" and _layer(d) > _layer(m):
        wrong.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
  assert not wrong, "\n".join(sorted(wrong))


def test_stage_entry_points_do_not_import_each_other():
  entry = lambda m: (m.startswith("deepintuit_jax.stages.")
                     and m.rsplit(".", 1)[1] not in STAGE_PARTS)
  wrong = [f"{m} imports {d}" for m, deps in IMPORTS.items() if entry(m)
           for d in deps if entry(d) and d != m]
  assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
  """Module-level and lazy imports alike: a module never reaches itself again."""
  graph = {m: {d for d in deps if d in MODULES and d != "deepintuit_jax"}
           for m, deps in IMPORTS.items()}
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_wrong_way_import(tmp_path):
  """The rules above catch what they are for (a test that cannot fail checks nothing)."""
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from deepintuit_jax.stages import grpo\n"
                 "from deepintuit_jax.evals import metrics\nimport tools.hf_reference\n"
                 "if TYPE_CHECKING:\n  from deepintuit_jax.stages import sft\n")
  found = _imports(str(bad), MODULES)
  assert found == {"deepintuit_jax.stages.grpo", "deepintuit_jax.evals.metrics",
                   "tools.hf_reference"}
  assert _layer("deepintuit_jax.stages.grpo") > _layer("deepintuit_jax.algorithms.sft")
  assert _layer("deepintuit_jax.evals.metrics") > _layer("deepintuit_jax.engine.step")


@pytest.mark.parametrize("old", sorted(deepintuit_jax.MOVED))
def test_former_import_paths_give_the_moved_module(old):
  assert importlib.import_module(old) is importlib.import_module(deepintuit_jax.MOVED[old])


def test_a_reward_registered_through_the_former_path_is_found():
  from deepintuit_jax.algorithms.grpo import rewards
  from deepintuit_jax.trainers.grpo import rewards as former
  assert former is rewards and former.register is rewards.register
