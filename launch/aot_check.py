"""Ahead-of-time check of a train step: does it compile on this mesh, and what does each
device hold? Runs on any machine (no weights, no data, no accelerator needed), from the
repository root:

    python launch/aot_check.py --size=7b --mesh=1,8,1 --batch=8 --frames=32 --side=448 \
        --text=1024 --remat=full --fake_devices=8

The model, optimizer state and a grouped batch (the shapes the data pipeline would yield:
`--batch` sequences of `--text` text tokens plus one `--frames`-frame video of `--side` x
`--side` pixels each) are built abstractly (`jax.eval_shape`; nothing is allocated), the
jitted step is lowered with the trainer's shardings under the mesh (`jax.set_mesh`),
compiled, and its per-device memory (arguments, outputs, temporaries) and FLOPs printed,
next to an analytic breakdown (parameters, optimizer state, gradients, saved activations
per layer, the largest transients) that says what dominates and what to change. With
`--fake_devices=N` the check runs on N host CPU devices standing in for the accelerators
(see README, "Memory": how XLA:CPU's figures relate to GPU / TPU ones).

Steps: `--step=sft` or `--step=grpo`; a step is one entry of STEPS returning a `Built`
(GRPO rollout + update and calibration plug in the same way).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

# Runnable as `python launch/aot_check.py` from anywhere: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--step", default="sft", help="which step to check: " + ", ".join(STEPS))
  p.add_argument("--size", default="7b", help="3b, 7b, 32b, 72b or tiny")
  p.add_argument("--layers", type=int, default=0, help="override the decoder depth (quick checks)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (one -1 = the rest)")
  p.add_argument("--batch", type=int, default=8, help="global sequences per micro-batch")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
  p.add_argument("--text", type=int, default=1024, help="text tokens per sequence")
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--side", type=int, default=448, help="frame side in pixels (multiple of 28)")
  p.add_argument("--remat", default="full")
  p.add_argument("--attention", default="", help="model.attention_impl ('' = auto)")
  p.add_argument("--attention_block", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--loss_chunk", type=int, default=1024)
  p.add_argument("--frozen", default=r"^visual\.", help="comma-separated regexes")
  p.add_argument("--fake_devices", type=int, default=0, help="N host CPU devices (0 = real ones)")
  p.add_argument("--no_compile", action="store_true", help="lower only")
  return p.parse_args(argv)


@dataclasses.dataclass
class Built:
  """What a step builder hands to the check.

  lowered: the jitted step lowered on abstract inputs; state / shardings: the abstract
  train state and its shardings (parameters, frozen, optimizer); rows_per_device, seq_len,
  patches_per_device: the activations one device processes per micro-batch; info: printed.
  """
  lowered: Any
  state: Any
  shardings: Any
  rows_per_device: int
  seq_len: int
  patches_per_device: int
  info: dict


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


def _abstract(tree, shardings):
  import jax
  leaves, treedef = jax.tree.flatten(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(leaves) == len(sh), (len(leaves), len(sh))
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                            for x, s in zip(leaves, sh)])


def _build(args, cfg, opts, mesh, kind: str) -> Built:
  """The train step of `kind` (sft, grpo) lowered from shapes. Every trainer name the check
  uses is in here."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from deepintuit_jax import sharding as sharding_lib
  from deepintuit_jax.models import qwen2_5_vl
  from deepintuit_jax.trainers import optim, sft
  from deepintuit_jax.trainers import state as train_state

  groups = sharding_lib.local_data_groups(mesh)
  if args.batch % groups:
    raise ValueError(f"--batch {args.batch} must be a multiple of the {groups} data-parallel "
                     f"shards of mesh {dict(mesh.shape)}")
  model = qwen2_5_vl.abstract_model(cfg, opts)
  ocfg = optim.OptimConfig(frozen=tuple(p for p in args.frozen.split(",") if p))
  tx = optim.make_optimizer(ocfg, 1000)
  lr_fn = optim.schedule(ocfg, 1000)
  graphdef, params, frozen, rest = optim.partition(model, ocfg.frozen)
  state = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                 frozen=frozen, rest=rest,
                                 opt_state=jax.eval_shape(tx.init, params),
                                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = train_state.state_shardings(state, mesh)
  host = sharding_lib.as_groups(sft.device_batch(fake_batch(
      cfg, batch=args.batch, groups=groups, text=args.text, frames=args.frames,
      side=args.side)))
  if kind == "grpo":
    host, step = grpo_step(graphdef, tx, lr_fn, host, mesh=mesh, shardings=shardings,
                           loss_chunk=args.loss_chunk)
  else:
    step = sft.make_train_step(graphdef, tx, lr_fn, mesh=mesh, state_sharding=shardings,
                               loss_chunk=args.loss_chunk)
  batch_sh = sharding_lib.batch_shardings(host, mesh, row_axes=step.row_axes)
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
      host, batch_sh)
  lowered = step.jitted.lower(_abstract(state, shardings), (abstract_batch,) * args.accum)
  g, b, t = np.shape(host["input_ids"])
  n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
  return Built(lowered=lowered, state=state, shardings=shardings,
               rows_per_device=max(g * b // n_dp, 1), seq_len=t,
               patches_per_device=int(np.shape(host["pixel_values_videos"])[1]) * max(g // n_dp, 1),
               info=dict(groups=groups, trainable=optim.count_params(params),
                         frozen=optim.count_params(frozen), tokens_per_step=int(g * b * t),
                         patches_per_group=int(np.shape(host["pixel_values_videos"])[1])))


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


STEPS: dict[str, Callable[..., Built]] = {
    "sft": lambda *a: _build(*a, kind="sft"),
    "grpo": lambda *a: _build(*a, kind="grpo"),  # the policy-loss update step
}


# ----------------------------------------------------------------------------- analysis
def _bytes_per_device(tree, shardings) -> int:
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, sh))


def layer_residual_bytes(cfg, opts, rows: int, seq: int, remat: str) -> int:
  """Bytes one decoder layer keeps for its backward, for `rows` x `seq` tokens on one
  device: traced with `jax.vjp` under `jax.eval_shape` (nothing allocated), minus the
  layer's own parameters (held anyway). remat "full": the layer input only."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from deepintuit_jax.models.qwen2_5_vl import text as text_lib
  from deepintuit_jax.models.qwen2_5_vl.layers import remat_policy
  d = cfg.text.hidden_size
  if remat == "full":
    return rows * seq * d * jnp.dtype(opts.dtype).itemsize
  layer = nnx.eval_shape(lambda: text_lib.DecoderLayer(cfg.text, opts, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(layer)
  hd = cfg.text.head_dim
  seg = jnp.ones((rows, seq), jnp.int32)

  def residuals(state, x, cos, sin):
    att = text_lib.AttentionInputs(
        q_segments=seg, kv_segments=seg, q_positions=None, valid=seg > 0,
        impl=text_lib.attn_lib.resolve_impl(opts.attention_impl, dtype=opts.dtype,
                                            head_dim=hd, causal_text=True),
        block=opts.attention_block)
    f = lambda st, x: nnx.merge(graphdef, st)(x, cos, sin, att)[0]
    if remat != "none":
      f = jax.checkpoint(f, policy=remat_policy(remat))
    return jax.vjp(f, state, x)[1]

  shapes = jax.eval_shape(residuals, state, jax.ShapeDtypeStruct((rows, seq, d), opts.dtype),
                          *[jax.ShapeDtypeStruct((rows, seq, hd), jnp.float32)] * 2)
  params = [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(state)]
  total = 0
  for x in jax.tree.leaves(shapes):
    key = (tuple(x.shape), np.dtype(x.dtype))
    if key in params:
      params.remove(key)
      continue
    total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def breakdown(args, cfg, opts, mesh, built: Built) -> dict[str, float]:
  """Analytic per-device GiB: what is held for the whole step and the largest transients."""
  import jax.numpy as jnp
  st, sh = built.state, built.shardings
  rows, seq = built.rows_per_device, built.seq_len
  t, v = cfg.text, cfg.vision
  layers = t.num_hidden_layers
  dt = jnp.dtype(opts.dtype).itemsize
  tensor = mesh.shape["tensor"]
  params = _bytes_per_device(st.params, sh.params)
  per_layer = layer_residual_bytes(cfg, opts, rows, seq, args.remat)
  mlp = t.intermediate_size // tensor
  layer_params = (4 * t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
  out = {
      "parameters (trainable, fp32)": params,
      "parameters (frozen)": _bytes_per_device(st.frozen, sh.frozen),
      "optimizer state": _bytes_per_device(st.opt_state, sh.opt_state),
      "gradients": params * (2 if args.accum > 1 else 1),
      f"saved activations ({layers} layers x {per_layer / GiB:.2f} GiB, remat "
      f"{args.remat})": layers * per_layer,
  }
  transients = {
      "one layer's backward (recompute + gathered weights and their gradients)":
          layer_residual_bytes(cfg, opts, rows, seq, "none") + layer_params * (dt + 4) // tensor,
      f"loss chunk ({args.loss_chunk} tokens x vocab, fp32 logits + gradient)":
          3 * (args.loss_chunk or rows * seq) * t.vocab_size * 4 // tensor,
      "vision block (patches x (3 * width + 3 * mlp))":
          built.patches_per_device * (3 * v.hidden_size + 3 * v.intermediate_size) * dt,
      "MLP activations of one layer": 3 * rows * seq * mlp * 4,
  }
  return out, transients


def memory_figures(compiled) -> dict[str, int] | None:
  """XLA's per-device bytes of a compiled program (`memory_analysis()`): arguments, outputs,
  temporaries, aliased (outputs written into donated arguments); None where the backend
  gives none."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return {k: int(getattr(m, k, 0) or 0) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "alias_size_in_bytes")}


def peak_estimate(mem: dict[str, int]) -> int:
  """Bytes live at once while the program runs: arguments + temporaries + outputs, less
  the outputs that reuse donated argument buffers (what a device allocator should peak at)."""
  return (mem["argument_size_in_bytes"] + mem["temp_size_in_bytes"]
          + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"])


def report(out, transients, mem) -> list[str]:
  held = sum(out.values())
  name, peak = max(transients.items(), key=lambda kv: kv[1])
  lines = ["analytic per device (GiB):"]
  lines += [f"  {k:<70s} {b / GiB:8.2f}" for k, b in out.items()]
  lines += [f"  largest transient: {k:<51s} {b / GiB:8.2f}"
            for k, b in sorted(transients.items(), key=lambda kv: -kv[1])[:1]]
  lines += [f"    (other transients: " + ", ".join(
      f"{k.split(' (')[0]} {b / GiB:.2f}" for k, b in transients.items() if k != name) + ")"]
  lines.append(f"  {'total (held + largest transient)':<70s} {(held + peak) / GiB:8.2f}")
  if mem is not None:
    lines.append(f"  {'XLA: arguments + temporaries':<70s} "
                 f"{(mem['argument_size_in_bytes'] + mem['temp_size_in_bytes']) / GiB:8.2f}")
  top = max(out, key=out.get)
  hint = ("raise fsdp (the mesh's second axis) or freeze more" if "param" in top or
          "optimizer" in top or "gradient" in top else
          "use --remat=full, or fewer sequences per device (smaller micro-batch, more "
          "--accum)" if "saved" in top else "")
  if peak > out[top]:
    hint = ("lower --loss_chunk" if "loss" in name else
            "fewer rows per device, or tensor parallelism (mesh third axis)")
  lines.append(f"  dominant: {top if out[top] >= peak else name} -> {hint}")
  return lines


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.fake_devices:
    if "jax" in sys.modules:
      raise RuntimeError("--fake_devices must be set before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  import jax
  import jax.numpy as jnp

  from deepintuit_jax import sharding as sharding_lib
  from deepintuit_jax.models import qwen2_5_vl, testing
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions

  if args.step not in STEPS:
    raise ValueError(f"--step {args.step!r} not one of {sorted(STEPS)}")
  cfg = testing.tiny_config() if args.size == "tiny" else qwen2_5_vl.PRESETS[args.size]
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  opts = RuntimeOptions(dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
                        attention_impl=args.attention or None,
                        attention_block=args.attention_block)
  mesh = sharding_lib.make_mesh(tuple(int(x) for x in args.mesh.split(",")))

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the model's per-layer FSDP gathers need the mesh in context
    built = STEPS[args.step](args, cfg, opts, mesh)
  t_lower = time.perf_counter() - t0
  out = dict(step=args.step, size=args.size, mesh=dict(mesh.shape), **built.info,
             lower_seconds=round(t_lower, 1))
  print(f"{args.step} {args.size}: {out['trainable']:,} trainable + {out['frozen']:,} frozen "
        f"parameters; mesh {dict(mesh.shape)}; {out['groups']} batch group(s); "
        f"{out['tokens_per_step']:,} token slots per micro-batch; lowered in {t_lower:.1f}s",
        flush=True)
  held, transients = breakdown(args, cfg, opts, mesh, built)
  out["analytic_bytes"] = {k: int(b) for k, b in {**held, **transients}.items()}
  mem = None
  if not args.no_compile:
    t0 = time.perf_counter()
    compiled = built.lowered.compile()
    out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    mem = memory_figures(compiled)
    if mem is not None:
      out.update(mem)
      print("XLA per device: arguments {:.2f} GiB, outputs {:.2f} GiB (aliased {:.2f}), "
            "temporaries {:.2f} GiB".format(*(mem[k] / GiB for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes"))))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      out["flops_per_device"] = float(cost["flops"])
      print(f"XLA cost analysis: {cost['flops']:.3e} FLOPs per device per step")
    print(f"compiled in {out['compile_seconds']}s")
  print("\n".join(report(held, transients, mem)))
  return out


if __name__ == "__main__":
  main()
