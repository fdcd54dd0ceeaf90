"""Imported at start-up by every Python that the integration tests start (main_env puts this
folder first on PYTHONPATH). It makes the test extras' PyTorch unimportable there, so that
`main` runs as it does in a runtime install (requirements.txt only, no torch):

- a runtime import of torch fails the test that reaches it, not CI's last step;
- transformers, which imports torch whenever it is installed (its rope utilities, through
  AutoTokenizer), skips that import: about 3 s of CPU per process start.

`sys.modules["torch"] = None` is Python's own way to block an import: `import torch` raises
ImportError and `importlib.util.find_spec("torch")` is None (transformers' availability check).
A `sitecustomize` that this one shadows still runs.
"""
import importlib.machinery
import importlib.util
import os
import sys

sys.modules.setdefault("torch", None)

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
  _module = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(_module)
