"""launch/aot_check.py lowers and compiles a grouped, sharded SFT step from shapes alone."""
import importlib.util
import os

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
  spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "launch",
                                                                          "aot_check.py"))
  mod = importlib.util.module_from_spec(spec)
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
