"""Loads a repository script (launch/, scripts/) as a module, for the tests of its functions."""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(*path: str):
  """`load_script("launch", "aot_check.py")`: the module, registered in sys.modules under
  its file name (dataclasses defined in it look their module up there)."""
  name = os.path.splitext(path[-1])[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *path))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod
