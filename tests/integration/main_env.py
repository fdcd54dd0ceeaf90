"""The environment the integration tests run `python -m deepintuit_jax.main` in."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Its sitecustomize makes PyTorch (a test extra) unimportable in the subprocesses.
RUNTIME_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_site")
# Launcher variables a test run may have inherited (SLURM, Open MPI, TPU pods, an explicit
# coordinator): a subprocess must not try to join that job.
_LAUNCHER = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_",
             "TPU_WORKER")


def data_cache(xla_cache: str) -> str:
  """The test run's shared DEEPINTUIT_CACHE (tiny model, tiny base, generated benchmarks:
  each built once, by an atomic rename, whichever process comes first), beside its XLA
  cache."""
  return os.path.join(os.path.dirname(xla_cache), "deepintuit_cache")


def main_env(xla_cache: str) -> dict:
  """CPU with one device per subprocess (conftest's 8 host devices would replicate the work
  8x; tests that want more set the flag again), the test run's shared caches (`xla_cache`
  fixture: the persistent XLA cache, and beside it the tiny model / benchmark cache, built
  once per run), offline, the repo on PYTHONPATH, and no PyTorch (runtime_site/sitecustomize.py:
  `main` runs as in a runtime install, where torch is absent)."""
  e = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER)}
  e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split()
                            if "host_platform_device_count" not in f)
  e.update(JAX_PLATFORMS="cpu", DEEPINTUIT_CACHE=data_cache(xla_cache),
           JAX_COMPILATION_CACHE_DIR=xla_cache,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([RUNTIME_SITE, REPO, e.get("PYTHONPATH", "")]))
  return e
