"""train.offload_optimizer: the optimizer state lives in host memory between steps, the update
is the same to the bit, checkpoints round-trip, and aot_check counts it off the device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepintuit_jax.algorithms import sft
from deepintuit_jax.core import sharding
from deepintuit_jax.core.sharding import make_mesh
from deepintuit_jax.engine import checkpointing
from deepintuit_jax.engine import state as train_state
from tests.scripts import load_script
from tests.unit.test_trainer import _batch, _setup


def _kinds(tree) -> set[str]:
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def _run(offload: bool, batches, nan_at: int = -1):
  mesh = make_mesh((2, 2, 2))
  graphdef, state, tx, lr = _setup(frozen=(r"^visual\.",))
  shard = train_state.state_shardings(state, mesh, offload_optimizer=offload)
  state = jax.device_put(state, shard)
  step = sft.make_train_step(graphdef, tx, lr, mesh=mesh, state_sharding=shard)
  oks = []
  for i, b in enumerate(batches):
    if i == nan_at:  # a non-finite loss: the step is refused, the state kept as it was
      b = dict(b, loss_mask=b["loss_mask"] * 0)
      kernel = state.params["lm_head"]["kernel"]
      good = kernel[...]
      kernel.set_value(jax.device_put(good.at[0, 0].set(jnp.nan), good.sharding))
      state, m = step(state, (b,))
      kernel = state.params["lm_head"]["kernel"]
      kernel.set_value(jax.device_put(good, good.sharding))
    else:
      state, m = step(state, (b,))
    oks.append(bool(m["ok"]))
  return state, shard, oks


def test_offloaded_optimizer_state_gives_the_same_steps_and_stays_on_the_host():
  rng = np.random.default_rng(5)
  batches = [_batch(rng, 4, 10, [10, 7, 6, 9]) for _ in range(4)]
  ref, _, ok_ref = _run(False, batches, nan_at=2)
  got, shard, ok = _run(True, batches, nan_at=2)
  assert ok == ok_ref == [True, True, False, True]
  assert int(got.step) == int(ref.step) == 3
  # Where each part lives: the moments in host memory, the parameters on the devices.
  assert _kinds(got.opt_state) == {sharding.HOST_MEMORY}
  assert _kinds(got.params) == {"device"} and _kinds(ref.opt_state) == {"device"}
  assert sharding.is_offloaded(shard.opt_state) and not sharding.is_offloaded(shard.params)
  for a, b in zip(jax.tree.leaves((ref.params, ref.opt_state)),
                  jax.tree.leaves((got.params, got.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moments = [x for x in jax.tree.leaves(got.opt_state) if x.ndim > 0]
  assert moments and all(np.any(np.asarray(x) != 0) for x in moments)


def test_checkpoints_of_an_offloaded_state_round_trip_either_way(tmp_path):
  rng = np.random.default_rng(6)
  got, shard, _ = _run(True, [_batch(rng, 4, 10, [10, 7, 6, 9])])
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), every_steps=1)
  ck.save(got, {"pos": 1}, force=True)
  ck.wait()
  on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), shard,
                           is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  for target in (shard, on_device):  # resumed with or without the offload
    restored, data = ck.restore(got, target)
    assert data == {"pos": 1}
    assert _kinds(restored.opt_state) == {jax.tree.leaves(
        target.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0].memory_kind}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(restored)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck.close()


def test_aot_check_counts_the_offloaded_state_in_host_memory():
  """The analytic figures move the moments off the device; the lowered program takes every
  optimizer-state leaf (and only those) from host memory. XLA:CPU has one memory for both,
  so its memory_analysis cannot show it: XLA:TPU's does (docs/accelerators.md)."""
  import jax.numpy as jnp
  from deepintuit_jax.models import tiny
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  aot = load_script("launch", "aot_check.py")
  argv = ["--size=tiny", "--mesh=1,8,1", "--batch=8", "--frames=2", "--side=56", "--text=16",
          "--loss_chunk=64", "--hbm_gib=1", "--no_compile"]
  dev = aot.main(argv)["sft"]["analytic_bytes"]
  host = aot.main(argv + ["--offload_optimizer"])["sft"]["analytic_bytes"]
  opt = dev["optimizer state"]
  assert opt > 0 and host["optimizer state"] == 0
  assert host["optimizer update (moments copied in from host memory + the update)"] == (
      opt + host["parameters (trainable, fp32)"])
  args = aot.parse_args(argv + ["--offload_optimizer"])
  mesh, _ = aot._mesh(args)
  opts = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")
  with jax.set_mesh(mesh):
    built = aot.STEPS["grpo"](args, tiny.tiny_config(), opts, mesh)
  text = built.lowered.as_text()
  signature = next(l for l in text.splitlines() if "func.func public @main" in l)
  inputs, outputs = signature.split("->", 1)
  n_opt = len(jax.tree.leaves(built.state.opt_state))
  assert inputs.count(sharding.HOST_MEMORY) == n_opt > 0
  assert outputs.count(sharding.HOST_MEMORY) == n_opt  # written back there


def test_aot_check_suggests_the_offload_only_where_it_would_help():
  import jax.numpy as jnp
  from deepintuit_jax.models import tiny
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  aot = load_script("launch", "aot_check.py")
  mem = load_script("launch", "aot_memory.py")
  args = aot.parse_args(["--size=tiny", "--mesh=1,8,1", "--batch=8", "--frames=2", "--side=56",
                         "--text=16", "--loss_chunk=64", "--no_compile", "--remat=full"])
  mesh, _ = aot._mesh(args)
  opts = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat="full")
  with jax.set_mesh(mesh):
    built = aot.STEPS["sft"](args, tiny.tiny_config(), opts, mesh)
  opt = mem.bytes_per_device(built.state.opt_state, built.shardings.opt_state)
  params = mem.bytes_per_device(built.state.params, built.shardings.params)
  total = 3 * params + 2 * opt  # over by less than the moments, and the update fits
  said = mem.suggestions(args, mesh, built, total, total - opt // 2)
  assert any(s.startswith("--offload_optimizer") for s in said), said
  # Over by more than the moments: moving them would not be enough.
  said = mem.suggestions(args, mesh, built, total, total - opt - 1)
  assert not any(s.startswith("--offload_optimizer") for s in said), said
