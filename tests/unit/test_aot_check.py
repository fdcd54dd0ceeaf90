"""launch/aot_check.py lowers and compiles a grouped, sharded SFT step from shapes alone."""
import importlib.util
import os
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
  spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "launch",
                                                                          "aot_check.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules["aot_check"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def test_tiny_step_compiles_on_a_2x2x2_mesh():
  assert jax.device_count() == 8
  out = _load().main(["--size=tiny", "--mesh=2,2,2", "--batch=8", "--frames=4", "--side=56",
                      "--text=32", "--frozen=^visual\\.", "--loss_chunk=64"])
  assert out["groups"] == 4  # one batch group per data-parallel shard
  assert out["frozen"] > 0 and out["trainable"] > 0
  assert out["patches_per_group"] >= 2 * 4 * 4  # each group holds its own video only
  assert out["flops_per_device"] > 0 and out["temp_size_in_bytes"] > 0
  est = out["analytic_bytes"]
  params = est["parameters (trainable, fp32)"]
  # fp32 trainable parameters, sharded: at least 4 bytes x count / 8 devices.
  assert params >= 4 * out["trainable"] // 8
  # AdamW holds two fp32 moments per trainable parameter (plus a few scalars).
  assert 2 * params <= est["optimizer state"] < 2 * params + 4096


def test_runs_as_the_readme_writes_it():
  """`python launch/aot_check.py ...` from the repository root, without PYTHONPATH."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "launch/aot_check.py", "--size=tiny", "--mesh=1,2,1",
                      "--batch=2", "--frames=2", "--side=56", "--text=16", "--fake_devices=2",
                      "--no_compile"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "analytic per device" in r.stdout
