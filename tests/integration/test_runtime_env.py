"""The environment of the integration tests' subprocesses (main_env) is a runtime install's:
PyTorch, a test extra, cannot be imported there, and a sitecustomize that the tests' one
shadows still runs."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.main_env import main_env

_CHECK = """
import importlib.util, sys
assert importlib.util.find_spec("torch") is None
try:
  import torch
except ImportError:
  pass
else:
  raise AssertionError("torch imported")
from transformers.utils import is_torch_available
assert not is_torch_available()
import sitecustomize
print("shadowed:", getattr(sys, "_shadowed_ran", False))
"""


def test_subprocesses_run_without_torch_and_keep_a_shadowed_sitecustomize(xla_cache, tmp_path):
  other = tmp_path / "other_site"
  other.mkdir()
  (other / "sitecustomize.py").write_text("import sys\nsys._shadowed_ran = True\n")
  env = main_env(xla_cache)
  env["PYTHONPATH"] += os.pathsep + str(other)
  p = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip() == "shadowed: True"
