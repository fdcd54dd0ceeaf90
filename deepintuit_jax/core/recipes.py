"""The two recipes of a stage config, and the one rule that picks between them.

A stage config (configs/*.py) holds the embedded default's numbers, the tiny recipe, in its
own fields, and both recipes side by side as `recipes.tiny` / `recipes.release`: partial
configs over the same keys (the release table is written in the config file; the tiny one
is what the fields hold). `resolve` gives the config a run uses: with `recipe` "release",
or "auto" and `model.checkpoint` set (a real model), every key of the release table whose
value is still the tiny one takes the release value, so a key set on the command line keeps
its value; "tiny", or "auto" without a checkpoint, keeps the fields. The resolved config
names the recipe it used, so run_config.json and the printed config show the numbers the run
uses. `--config=configs/<stage>.py:real` applies the release table in the config itself.
"""
from __future__ import annotations

from typing import Any, Iterator

import ml_collections

NAMES = ("auto", "release", "tiny")


def leaves(node, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of a (nested) ConfigDict or dict."""
  for key, value in node.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, path + ".")
    else:
      yield path, value


def get(c, dotted: str) -> Any:
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


def set_value(c, dotted: str, value: Any) -> None:
  *parents, last = dotted.split(".")
  node = c
  for part in parents:
    node = node[part]
  node[last] = value


def nested(flat: dict[str, Any]) -> ml_collections.ConfigDict:
  """{"train.learning_rate": v} -> ConfigDict(train=ConfigDict(learning_rate=v))."""
  out = ml_collections.ConfigDict()
  for dotted, value in flat.items():
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[last] = value
  return out


def attach(c, release: dict[str, Any], *, real: bool = False) -> None:
  """Records the recipes in the stage config `c` (its fields hold the tiny recipe):
  `c.recipes.tiny` = the fields' values at the release table's keys, `c.recipes.release` =
  `release`. `real`: the release values go into the fields and `c.recipe` = "release"."""
  missing = [k for k in release if not _has(c, k)]
  if missing:
    raise KeyError(f"release recipe keys not in the config: {missing}")
  c.recipes = ml_collections.ConfigDict(dict(
      tiny=nested({k: get(c, k) for k in release}), release=nested(dict(release))))
  if real:
    for key, value in release.items():
      set_value(c, key, value)
    c.recipe = "release"


def _has(c, dotted: str) -> bool:
  try:
    get(c, dotted)
  except (KeyError, AttributeError):
    return False
  return True


def name(c) -> str:
  """The recipe `c` runs: "release" or "tiny"."""
  recipe = c.get("recipe", "auto")
  if recipe not in NAMES:
    raise ValueError(f"recipe={recipe!r}: must be one of {', '.join(NAMES)}")
  if recipe == "auto":
    return "release" if c.model.checkpoint else "tiny"
  return recipe


def resolve(c) -> ml_collections.ConfigDict:
  """A copy of the stage config `c` with its recipe applied (module doc); `recipe` then names
  the one used. A config without recipes (the chain's own) is returned as a copy."""
  out = c.copy_and_resolve_references()
  if "recipes" not in out:
    return out
  locked = out.is_locked
  out.unlock()
  chosen = name(out)
  out.recipe = chosen
  if chosen == "release":
    tiny = dict(leaves(out.recipes.tiny))
    for key, value in leaves(out.recipes.release):
      if get(out, key) == tiny[key]:
        set_value(out, key, value)
  if locked:
    out.lock()
  return out
