"""Test-wide settings. They must be set before jax is imported anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> str:
  """One persistent XLA compilation cache for every subprocess run of the session
  (JAX_COMPILATION_CACHE_DIR): integration modules run the same tiny steps at the same
  shapes, so a step compiled by one module's run is loaded, not recompiled, by the next."""
  return str(tmp_path_factory.mktemp("xla_cache"))
