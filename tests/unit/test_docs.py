"""The docs stay true to the code without running a model.

* docs/config.md documents every key of every config file: each leaf of each
  `configs/<name>.py` `get_config()` (dotted, e.g. `train.learning_rate`) is named, in
  backticks, in the first column of a table row, in the section of its own file (`## ...
  configs/<name>.py ...`) or, for the keys `configs/common.py` builds, in the shared section;
  a key whose release value differs from its tiny value has a row showing both (`a / b`);
  every arg variant of a file (`configs/x.py:variant`) is named there as `:variant`. The
  chain (`configs/deepintuit.py`) is held to its own keys (its steps' nested keys are those
  of the stage configs) and must name each of its steps.
* README.md is at most 200 lines, and its first 60 hold the set-up, main and test commands
  of `.ci/run` (read from it, so that the README and CI cannot drift apart).
* Every relative link `](path)` and every backticked `docs/....md` in README.md and
  docs/*.md names a file that exists.
"""
from __future__ import annotations

import ast
import importlib
import os
import re

import pytest

from configs import common, deepintuit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DOC = os.path.join(ROOT, "docs", "config.md")
CONFIGS = ("sft", "grpo", "traces", "calibrate", "infer", "imitation", "deepintuit")
SHARED_SECTION = "configs/common.py"
# Top-level keys every stage config has (documented once, in the shared section).
SHARED_TOP = ("stage", "seed", "recipe")


def _read(*parts: str) -> str:
  with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
    return f.read()


def _leaves(node, prefix: str = ""):
  for key, value in node.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _shared_keys() -> set[str]:
  """The keys `configs/common.py` builds, dotted as the stage configs hold them."""
  groups = {"model": common.model_config(), "data": common.data_config(),
            "mesh": common.mesh_config(), "checkpoint": common.checkpoint_config(),
            "eval": common.eval_config()}
  out = set(SHARED_TOP)
  for name, group in groups.items():
    out.update(f"{name}.{k}" for k, _ in _leaves(group))
  return out


def _sections(text: str) -> dict[str, str]:
  """'## heading' -> the text under it (up to the next '## ')."""
  out, title = {}, ""
  for line in text.splitlines():
    if line.startswith("## "):
      title = line[3:].strip()
      out[title] = ""
    elif title:
      out[title] += line + "\n"
  return out


def _cells(line: str) -> list[str]:
  """The cells of a markdown table row (an escaped `\\|` stays inside its cell)."""
  parts = re.split(r"(?<!\\)\|", line.strip())
  return [p.strip() for p in parts[1:-1]]


def _rows(section: str) -> dict[str, list[str]]:
  """Each backticked name in a table row's first column -> that row's cells."""
  out = {}
  for line in section.splitlines():
    if not line.lstrip().startswith("|"):
      continue
    cells = _cells(line)
    if not cells or set(cells[0]) <= set("-: "):
      continue
    for name in re.findall(r"`([^`]+)`", cells[0]):
      out.setdefault(name, cells)
  return out


def _section_of(sections: dict[str, str], needle: str) -> str:
  found = [body for title, body in sections.items() if needle in title]
  assert len(found) == 1, f"docs/config.md: want one '## ...{needle}...' section, got {len(found)}"
  return found[0]


def _arg_variants(module) -> list[str]:
  """The names `get_config` accepts after the colon (its `common.parse_arg` keywords)."""
  tree = ast.parse(_read("configs", os.path.basename(module.__file__)))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "parse_arg"):
      return [kw.arg for kw in node.keywords]
  raise AssertionError(f"{module.__name__}: no common.parse_arg call")


def _documented_keys(name: str):
  """(leaf keys to document, release keys whose value differs) of configs/<name>.py."""
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  steps = {step for step, _, _ in deepintuit.STEPS} if name == "deepintuit" else set()
  keys = [k for k, _ in _leaves(c)
          if k.split(".")[0] not in steps and not k.startswith("recipes.")]
  tiny = dict(_leaves(c.recipes.tiny)) if "recipes" in c else {}
  release = dict(_leaves(c.recipes.release)) if "recipes" in c else {}
  differing = [k for k in release if release[k] != tiny[k]]
  return module, keys, differing


@pytest.mark.parametrize("name", CONFIGS)
def test_config_doc_names_every_key_and_variant(name):
  sections = _sections(_read("docs", "config.md"))
  own = _rows(_section_of(sections, f"configs/{name}.py"))
  shared = _rows(_section_of(sections, SHARED_SECTION))
  shared_keys = _shared_keys()
  module, keys, differing = _documented_keys(name)
  missing = [k for k in keys if k not in own and not (k in shared_keys and k in shared)]
  assert not missing, (f"docs/config.md does not name these keys of configs/{name}.py in "
                       f"its section (or, for common.py's keys, the shared one): {missing}")
  if "recipes" in module.get_config():
    assert {"recipes.tiny", "recipes.release"} <= set(shared), (
        "docs/config.md: the shared section must name `recipes.tiny` and `recipes.release`")
  one_value = [k for k in differing if " / " not in (own.get(k) or shared[k])[1]]
  assert not one_value, (f"docs/config.md: these keys of configs/{name}.py have a release "
                         f"value that differs from the tiny one; show both as `a / b`: "
                         f"{one_value}")
  section = _section_of(sections, f"configs/{name}.py")
  unnamed = [v for v in _arg_variants(module) if f"`:{v}`" not in section]
  assert not unnamed, f"docs/config.md: configs/{name}.py's arg variants not named: {unnamed}"
  if name == "deepintuit":
    steps = [step for step, _, _ in deepintuit.STEPS if step not in own]
    assert not steps, f"docs/config.md: the chain's steps not named: {steps}"


def test_config_doc_catches_a_missing_row():
  """The check above fails when a key's row is gone (the test of the test)."""
  sections = _sections(_read("docs", "config.md"))
  body = _section_of(sections, "configs/grpo.py")
  kept = "\n".join(l for l in body.splitlines() if "`grpo.tis_cap`" not in l)
  assert "grpo.tis_cap" in _rows(body) and "grpo.tis_cap" not in _rows(kept)


def _ci_commands() -> dict[str, list[str]]:
  """The README-facing commands of .ci/run: pip installs, the pytest line, the main module
  and config it runs."""
  ci = _read(".ci", "run")
  lines = [l.strip() for l in ci.splitlines() if not l.lstrip().startswith("#")]
  installs = [re.sub(r"\s-q\b", "", l) for l in lines
              if l.startswith("python3 -m pip install")]
  tests = [re.sub(r"\s+", " ", l) for l in lines if l.startswith("python3 -m pytest")]
  main = re.search(r"-m (deepintuit_jax\.main) --config=\S*?(configs/\w+\.py)", ci)
  assert installs and tests and main, ".ci/run: set-up, test or main command not found"
  return {"installs": installs, "tests": tests,
          "main": [f"python -m {main.group(1)} --config={main.group(2)}"]}


def test_readme_is_short_and_opens_with_the_ci_commands():
  readme = _read("README.md").splitlines()
  assert len(readme) <= 200, f"README.md has {len(readme)} lines (at most 200)"
  head = re.sub(r"[ \t]+", " ", "\n".join(readme[:60]))
  for kind, commands in _ci_commands().items():
    for command in commands:
      assert command in head, f"README.md's first 60 lines lack the {kind} command {command!r}"
  assert "pytest" in head


def _doc_files() -> list[str]:
  docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                if f.endswith(".md"))
  return ["README.md"] + docs


@pytest.mark.parametrize("doc", _doc_files())
def test_doc_links_point_at_files(doc):
  text = _read(doc)
  here = os.path.dirname(os.path.join(ROOT, doc))
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # a URL or an anchor on the same page
    path = target.split("#")[0]
    if not os.path.exists(os.path.normpath(os.path.join(here, path))):
      broken.append(f"]({target})")
  for path in re.findall(r"`(docs/[^`\s]+\.md)`", text):
    if not os.path.exists(os.path.join(ROOT, path)):
      broken.append(f"`{path}`")
  assert not broken, f"{doc}: links to missing files: {broken}"
