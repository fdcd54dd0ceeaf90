"""Test-wide settings. They must be set before jax is imported anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
# 8 host devices; LLVM's backend optimisation off: the tests compile hundreds of tiny
# programs whose compile time, not run time, is what they spend (-20% on the suite's
# compile-heavy modules). The flag reaches the subprocesses the integration tests start.
# Every comparison runs both sides under the same flags; parity tests have tolerances.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> str:
  """One persistent XLA compilation cache for every subprocess run of the test run
  (JAX_COMPILATION_CACHE_DIR), shared by the pytest-xdist workers: integration modules run
  the same tiny steps at the same shapes, so a step compiled by one module's run (on either
  worker) is loaded, not recompiled, by the next. Beside it lies the shared DEEPINTUIT_CACHE
  (integration/main_env.py)."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = shared / "xla_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session", autouse=True)
def _in_process_xla_cache(xla_cache):
  """The in-process tests load from and add to the same cache: modules build the same micro
  and tiny models and compile the same steps (a program's cache key is its HLO, so two
  tests' jit wrappers of one computation share an entry)."""
  jax.config.update("jax_compilation_cache_dir", xla_cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
