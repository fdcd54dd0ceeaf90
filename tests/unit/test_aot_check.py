"""launch/aot_check.py lowers and compiles a grouped, sharded SFT step from shapes alone."""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest
from tests.scripts import load_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
  return load_script("launch", "aot_check.py")


def test_tiny_step_compiles_on_a_2x2x2_mesh():
  assert jax.device_count() == 8
  out = _load().main(["--size=tiny", "--mesh=2,2,2", "--batch=8", "--frames=4", "--side=56",
                      "--text=32", "--frozen=^visual\\.", "--loss_chunk=64", "--hbm_gib=1"])["sft"]
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
  # The verdict: arguments + temporaries + outputs not aliased to (donated) arguments.
  assert out["fits"] and out["total_bytes"] <= out["hbm_bytes"] == 2 ** 30
  assert out["total_bytes"] >= out["argument_size_in_bytes"] + out["temp_size_in_bytes"]


def test_runs_as_the_readme_writes_it():
  """`python launch/aot_check.py ...` from the repository root, without PYTHONPATH."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "launch/aot_check.py", "--size=tiny", "--mesh=1,2,1",
                      "--batch=2", "--frames=2", "--side=56", "--text=16", "--fake_devices=2",
                      "--no_compile"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "analytic per device" in r.stdout


def test_topology_names_map_to_slices():
  """`v5p-16` is 8 chips (v4 / v5p names count TensorCores), `v5e-16` 16 (chips)."""
  sys.path.insert(0, ROOT)
  from launch import tpu_topologies as T
  got = {n: (T.slice_spec(n).topology, T.slice_spec(n).chips) for n in
         ("v4-8", "v5p-16", "v5p-64", "v5p-128", "v5e-8", "v5e-16", "v5e-256", "v6e-8")}
  assert got == {"v4-8": ("v4:2x2x1", 4), "v5p-16": ("v5:2x2x2", 8), "v5p-64": ("v5:2x4x4", 32),
                 "v5p-128": ("v5:4x4x4", 64), "v5e-8": ("v5e:2x4", 8),
                 "v5e-16": ("v5e:4x4", 16), "v5e-256": ("v5e:16x16", 256),
                 "v6e-8": ("v6e:2x4", 8)}
  assert T.slice_spec("v5p-128").wrap == (True, True, True)
  assert T.slice_spec("v5e-16").hbm_gib == 15.75
  for bad in ("v5p-12", "v7-8", "v5p-2"):
    with pytest.raises(ValueError, match="--topology"):
      T.slice_spec(bad)


def _has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (pip install "
                    "'jax[tpu]'; it compiles for TPU topologies on a CPU-only machine)")
def test_tiny_programs_compile_for_a_tpu_topology():
  """XLA:TPU (libtpu, no TPU needed) compiles the tiny model's SFT step and GRPO rollout for a
  v5e-8 slice, with splash attention under shard_map (XLA refuses to partition a Mosaic
  kernel otherwise), in a process of its own (one process may load libtpu at a time; this
  one must not be forced onto the CPU platform)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
  r = subprocess.run([sys.executable, "launch/aot_check.py", "--topology=v5e-8", "--size=tiny",
                      "--step=sft,rollout", "--batch=8", "--frames=4", "--side=56",
                      "--text=32", "--loss_chunk=64", "--response=8", "--group=2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  verdicts = [line for line in r.stdout.splitlines() if line.startswith("fits:")]
  assert verdicts == [
      f"fits: yes, 0.0 of 15.8 GiB per device ({step} step, TINY, v5e-8, splash)"
      for step in ("sft", "rollout")], r.stdout[-3000:]
  # Two v5e-4 slices: the data axis spans them (DCN), fsdp stays inside each slice.
  r = subprocess.run([sys.executable, "launch/aot_check.py", "--topology=v5e-4",
                      "--num_slices=2", "--size=tiny", "--step=sft", "--batch=8", "--frames=4",
                      "--side=56", "--text=32", "--loss_chunk=64"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in r.stdout
  assert "(sft step, TINY, v5e-4 x2, splash)" in r.stdout


def test_verdict_and_exit_code_agree_when_it_does_not_fit():
  """A step judged against too little memory: `fits: no, ...`, what might fit, exit code 1."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "launch/aot_check.py", "--size=tiny", "--mesh=1,2,1",
                      "--batch=4", "--frames=2", "--side=56", "--text=16", "--fake_devices=2",
                      "--remat=none", "--hbm_gib=0.001"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, (r.stdout + r.stderr)[-2000:]
  verdict = [line for line in r.stdout.splitlines() if line.startswith("fits:")]
  assert len(verdict) == 1 and verdict[0].startswith("fits: no, ") and verdict[0].endswith(
      "of 0.0 GiB per device (sft step, TINY, 2 cpu devices, blockwise)"), r.stdout[-2000:]
  assert "--remat=full" in r.stdout and "--batch=2 --accum=2" in r.stdout


def test_reads_both_of_xla_tpus_out_of_memory_messages():
  """XLA:TPU refuses a program too large for the chip in one of two ways (both seen from
  libtpu 0.0.50.1): the check reads the figures out of either."""
  m = _load()
  used = m.oom_figures(RuntimeError(
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
      "of memory in memory space hbm. Used 15.83G of 15.75G hbm. Exceeded hbm capacity by "
      "83.03M."))
  assert abs(used["used_bytes"] - 16_997_333_074) <= 1
  assert abs(used["hbm_bytes"] - 16_911_433_728) <= 1
  temps = m.oom_figures(RuntimeError(
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
      "memory required for HLO temporaries (17.78G) exceeds available HBM (15.75G). HLO "
      "module: jit__step."))
  assert abs(temps["temp_size_in_bytes"] - 19_091_129_630) <= 1
  assert m.oom_figures(RuntimeError("INTERNAL: something else")) is None
