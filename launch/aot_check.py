"""Ahead-of-time check of an SFT train step: does it compile on this mesh, and what does
each device hold? Runs on any machine (no weights, no data, no accelerator needed).

    python launch/aot_check.py --size=7b --mesh=1,8,1 --batch=8 --frames=32 --side=448 \
        --text=1024 --remat=full --fake_devices=8

The model, optimizer state and a grouped batch (the shapes the data pipeline would yield:
`--batch` sequences of `--text` text tokens plus one `--frames`-frame video of `--side` x
`--side` pixels each) are built abstractly (`jax.eval_shape`; nothing is allocated), the
jitted step is lowered with the trainer's shardings, compiled, and its per-device memory
(arguments, outputs, temporaries) and FLOPs are printed. With `--fake_devices=N` the check
runs on N host CPU devices standing in for the accelerators (XLA's CPU memory figures then
describe the CPU program: use them to compare settings, not as GPU numbers).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="7b", help="3b, 7b, 32b, 72b or tiny")
  p.add_argument("--layers", type=int, default=0, help="override the decoder depth (quick checks)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one -1 = the rest)")
  p.add_argument("--batch", type=int, default=8, help="global sequences per micro-batch")
  p.add_argument("--text", type=int, default=1024, help="text tokens per sequence")
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--side", type=int, default=448, help="frame side in pixels (multiple of 28)")
  p.add_argument("--remat", default="full")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--loss_chunk", type=int, default=1024)
  p.add_argument("--frozen", default=r"^visual\.", help="comma-separated regexes")
  p.add_argument("--fake_devices", type=int, default=0, help="N host CPU devices (0 = real ones)")
  p.add_argument("--no_compile", action="store_true", help="lower only")
  p.add_argument("--stage", default="sft", help="sft, or grpo (the policy-loss update step)")
  return p.parse_args(argv)


def fake_batch(cfg, *, batch: int, groups: int, text: int, frames: int, side: int):
  """A grouped host batch with the pipeline's layout (built by data.batching.collate)."""
  import numpy as np
  from deepintuit_jax.data import batching
  from deepintuit_jax.data.examples import PipelineOptions
  if side % 28:
    raise ValueError(f"--side {side} must be a multiple of 28")
  g = side // 14
  grid = np.array([[max(frames // 2, 1), g, g]], np.int64)
  n_video = int(grid.prod()) // 4
  ids = ([1] * (text // 2) + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_video
         + [cfg.vision_end_token_id] + [1] * (text - text // 2))
  ex = dict(input_ids=np.asarray(ids, np.int32),
            loss_mask=np.asarray([0] * (len(ids) - text // 2) + [1] * (text // 2 - 1) + [0],
                                 np.int32),
            pixel_values_videos=np.zeros((int(grid.prod()), cfg.vision.patch_dim), np.float32),
            video_grid_thw=grid, second_per_grid_ts=np.ones(1, np.float32),
            label="x", item_id="x")
  options = PipelineOptions(max_seq_len=1 << (len(ids) - 1).bit_length(),
                            max_pixels=side * side, min_pixels=28 * 28)
  return batching.collate([ex] * batch, batch_size=batch, options=options, model_config=cfg,
                          pad_id=0, groups=groups if groups > 1 else None)


def grpo_step(graphdef, tx, lr_fn, host: dict, *, mesh, shardings, loss_chunk: int):
  """The GRPO update step and `host` with GRPO's per-row arrays added (advantages [G, b],
  old / rollout log-probs [G, b, T]), so the check covers the policy-loss step too."""
  import numpy as np
  from deepintuit_jax.trainers.grpo import learner
  ids = np.asarray(host["input_ids"])
  host = dict(host, advantages=np.zeros(ids.shape[:2], np.float32),
              old_logprobs=np.zeros(ids.shape, np.float32),
              rollout_logprobs=np.zeros(ids.shape, np.float32))
  cfg = learner.GRPOConfig(group_size=1, prompts_per_rollout=1, mini_batch_prompts=1,
                           logp_chunk=loss_chunk)
  return host, learner.TrainStep(learner.make_loss_fn(graphdef, cfg), tx, lr_fn, mesh=mesh,
                                 state_sharding=shardings, finalize_aux=learner.finalize_aux)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.fake_devices:
    if "jax" in sys.modules:
      raise RuntimeError("--fake_devices must be set before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from deepintuit_jax import sharding as sharding_lib
  from deepintuit_jax.models import qwen2_5_vl, testing
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.trainers import optim, sft
  from deepintuit_jax.trainers import state as train_state

  cfg = testing.tiny_config() if args.size == "tiny" else qwen2_5_vl.PRESETS[args.size]
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  opts = RuntimeOptions(dtype=dtype, param_dtype=jnp.float32, remat=args.remat)
  mesh = sharding_lib.make_mesh(tuple(int(x) for x in args.mesh.split(",")))
  groups = sharding_lib.local_data_groups(mesh)
  if args.batch % groups:
    raise ValueError(f"--batch {args.batch} must be a multiple of the {groups} data-parallel "
                     f"shards of mesh {dict(mesh.shape)}")

  t0 = time.perf_counter()
  model = qwen2_5_vl.abstract_model(cfg, opts)
  ocfg = optim.OptimConfig(frozen=tuple(p for p in args.frozen.split(",") if p))
  tx = optim.make_optimizer(ocfg, 1000)
  graphdef, params, frozen, rest = optim.partition(model, ocfg.frozen)
  state = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                         frozen=frozen, rest=rest, opt_state=jax.eval_shape(tx.init, params),
                         rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = train_state.state_shardings(state, mesh)
  leaves, treedef = jax.tree.flatten(state)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(leaves) == len(sh), (len(leaves), len(sh))
  abstract_state = treedef.unflatten(
      [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, sh)])

  host = sharding_lib.as_groups(sft.device_batch(fake_batch(
      cfg, batch=args.batch, groups=groups, text=args.text, frames=args.frames,
      side=args.side)))
  if args.stage == "grpo":
    host, step = grpo_step(graphdef, tx, optim.schedule(ocfg, 1000), host, mesh=mesh,
                           shardings=shardings, loss_chunk=args.loss_chunk)
  elif args.stage == "sft":
    step = sft.make_train_step(graphdef, tx, optim.schedule(ocfg, 1000), mesh=mesh,
                               state_sharding=shardings, loss_chunk=args.loss_chunk)
  else:
    raise ValueError(f"--stage {args.stage!r}: sft or grpo")
  batch_sh = sharding_lib.batch_shardings(host, mesh, row_axes=step.row_axes)
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
      host, batch_sh)
  lowered = step.jitted.lower(abstract_state, (abstract_batch,))
  t_lower = time.perf_counter() - t0
  n_train, n_frozen = optim.count_params(params), optim.count_params(frozen)
  tokens = int(np.prod(np.shape(host["input_ids"])))
  out = dict(size=args.size, mesh=dict(mesh.shape), groups=groups,
             trainable=n_train, frozen=n_frozen, tokens_per_step=tokens,
             patches_per_group=int(np.shape(host["pixel_values_videos"])[1]),
             lower_seconds=round(t_lower, 1))
  print(f"{args.size}: {n_train:,} trainable + {n_frozen:,} frozen parameters; mesh "
        f"{dict(mesh.shape)}; {groups} batch group(s); {tokens:,} token slots/step; lowered "
        f"in {t_lower:.1f}s", flush=True)
  if args.no_compile:
    return out
  t0 = time.perf_counter()
  compiled = lowered.compile()
  out["compile_seconds"] = round(time.perf_counter() - t0, 1)
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes"):
      out[k] = int(getattr(mem, k, 0) or 0)
    print("per device: arguments {:.2f} GiB, outputs {:.2f} GiB (aliased {:.2f}), "
          "temporaries {:.2f} GiB".format(
              out["argument_size_in_bytes"] / 2**30, out["output_size_in_bytes"] / 2**30,
              out["alias_size_in_bytes"] / 2**30, out["temp_size_in_bytes"] / 2**30))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["flops_per_device"] = float(cost["flops"])
    print(f"XLA cost analysis: {cost['flops']:.3e} FLOPs per device per step")
  print(f"compiled in {out['compile_seconds']}s")
  return out


if __name__ == "__main__":
  main()
