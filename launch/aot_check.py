"""Ahead-of-time check of every program of a run: does it compile for this slice or mesh,
and does it fit? Runs on any machine (no weights, no data, no accelerator needed), from the
repository root:

    python launch/aot_check.py --topology=v5p-16 --size=7b --batch=8 --frames=32 \
        --side=448 --text=1024 --remat=full --step=sft

The model, optimizer state and a grouped batch (the shapes the data pipeline would yield:
`--batch` sequences of `--text` text tokens plus one `--frames`-frame video of `--side` x
`--side` pixels each) are built abstractly (`jax.eval_shape`; nothing is allocated), each
program of `--step` (STEPS: the SFT step, the GRPO update, the rollout sampler, the
calibration step) is lowered with the trainer's shardings under the mesh (`jax.set_mesh`)
and compiled: with `--topology` by XLA:TPU for that TPU slice (libtpu; launch/tpu_topologies
.py), with `--fake_devices=N` on N host CPU devices (docs/accelerators.md, "XLA:CPU fake
devices"), else on this machine's devices. Per device it prints XLA's memory (arguments,
outputs, temporaries), an analytic breakdown (launch/aot_memory.py) and a verdict line per
program; the exit code is 0 only when every program fits.
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

from launch.aot_memory import (  # noqa: E402  (the figures and their reading)
    bytes_per_device, oom_figures, breakdown, largest_buffers, memory_figures,
    peak_estimate, report, suggestions)

GiB = 2 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--step", default="sft",
                 help="comma-separated programs, or 'all': " + ", ".join(STEPS))
  p.add_argument("--topology", default="",
                 help="compile for a TPU slice (v4-8, v5e-16, v5p-16, v6e-8, ...; needs libtpu)")
  p.add_argument("--num_slices", type=int, default=1,
                 help="slices of --topology; data parallelism over DCN (the data axis x N)")
  p.add_argument("--size", default="7b", help="3b, 7b, 32b, 72b or tiny")
  p.add_argument("--layers", type=int, default=0, help="override the decoder depth (quick checks)")
  p.add_argument("--mesh", default="1,-1,1",
                 help="data,fsdp,tensor per slice (one -1 = the rest)")
  p.add_argument("--batch", type=int, default=8,
                 help="global sequences per micro-batch (rollout: prompts per rollout)")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
  p.add_argument("--text", type=int, default=1024,
                 help="text tokens per sequence (GRPO update: prompt + response)")
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--side", type=int, default=448, help="frame side in pixels (multiple of 28)")
  p.add_argument("--response", type=int, default=2048, help="rollout: max new tokens")
  p.add_argument("--group", type=int, default=8,
                 help="rollout and GRPO update: responses per prompt (G)")
  p.add_argument("--share_prompt", action=argparse.BooleanOptionalAction, default=True,
                 help="GRPO update: each prompt once under its --group responses (config "
                      "grpo.share_prompt) where --batch / --group prompts divide over the "
                      "batch groups; else one row per response")
  p.add_argument("--remat", default="full")
  p.add_argument("--attention", default="", help="model.attention_impl ('' = auto)")
  p.add_argument("--attention_block", type=int, default=512)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--loss_chunk", type=int, default=1024)
  p.add_argument("--frozen", default=None,
                 help="comma-separated regexes (default: the release's: the vision tower in "
                      "sft and calibrate, nothing in grpo)")
  p.add_argument("--offload_optimizer", action="store_true",
                 help="the optimizer state in host memory between steps (config "
                      "train.offload_optimizer)")
  p.add_argument("--hbm_gib", type=float, default=0.0,
                 help="memory per device to judge against (default: the TPU chip's; none "
                      "for CPU devices unless given)")
  p.add_argument("--fake_devices", type=int, default=0, help="N host CPU devices (0 = real ones)")
  p.add_argument("--no_compile", action="store_true", help="lower only")
  p.add_argument("--buffers", type=int, default=0,
                 help="print the N largest buffers of XLA's buffer assignment (where the "
                      "temporaries go; dumps the compiled HLO to a temporary directory)")
  args = p.parse_args(argv)
  args.steps = list(STEPS) if args.step == "all" else [x for x in args.step.split(",") if x]
  bad = [x for x in args.steps if x not in STEPS]
  if bad:
    p.error(f"--step {','.join(bad)}: not one of {', '.join(STEPS)} (or 'all')")
  if args.topology and args.fake_devices:
    p.error("--topology and --fake_devices exclude each other")
  return args


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
  from deepintuit_jax.data import batching
  ex, options = fake_example(cfg, text=text, frames=frames, side=side)
  return batching.collate([ex] * batch, batch_size=batch, options=options, model_config=cfg,
                          pad_id=0, groups=groups if groups > 1 else None)


def fake_shared_grpo_batch(cfg, *, prompts: int, group: int, groups: int, text: int,
                           frames: int, side: int):
  """GRPO's prompt-shared learner batch (`Rollout.micro_batch(share_prompt=True)`, what the
  learner builds with grpo.share_prompt): `prompts` prompts, each the fake row less its
  last text // 2 tokens, under `group` responses of those text // 2 tokens; so every
  response with its prompt is one fake row of `fake_batch`."""
  import numpy as np
  from deepintuit_jax.algorithms.grpo import rollout
  ex, options = fake_example(cfg, text=text, frames=frames, side=side)
  n = text // 2
  prompt = dict(ex, input_ids=ex["input_ids"][:len(ex["input_ids"]) - n])
  rows = prompts * group
  ro = rollout.Rollout(prompts=[prompt] * prompts, group_size=group,
                       tokens=np.ones((rows, n), np.int32), logprobs=np.zeros((rows, n),
                                                                              np.float32),
                       lengths=np.full(rows, n, np.int32), texts=[""] * rows,
                       truncated=np.zeros(rows, bool))
  return ro.micro_batch(range(prompts), advantages=np.zeros(rows, np.float32), options=options,
                        model_config=cfg, pad_id=0, groups=groups,
                        token_arrays={"old_logprobs": ro.logprobs}, share_prompt=True)


def fake_example(cfg, *, text: int, frames: int, side: int):
  """One fake row (text // 2 tokens, the video, the rest of the text; the loss on the
  last text // 2 - 1) and pipeline options that fit it."""
  import numpy as np
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
  return ex, options


def _abstract(tree, shardings):
  import jax
  leaves, treedef = jax.tree.flatten(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(leaves) == len(sh), (len(leaves), len(sh))
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                            for x, s in zip(leaves, sh)])


RELEASE_FROZEN = {"sft": r"^visual\.", "calibrate": r"^visual\.", "grpo": ""}


def _train_state(args, cfg, opts, mesh, kind: str):
  """The abstract train state of `kind` (optimizer state included) and its shardings."""
  import jax
  import jax.numpy as jnp
  from deepintuit_jax.engine import optim
  from deepintuit_jax.engine import state as train_state
  from deepintuit_jax.models import qwen2_5_vl
  frozen_re = RELEASE_FROZEN[kind] if args.frozen is None else args.frozen
  model = qwen2_5_vl.abstract_model(cfg, opts)
  ocfg = optim.OptimConfig(frozen=tuple(p for p in frozen_re.split(",") if p))
  tx = optim.make_optimizer(ocfg, 1000)
  graphdef, params, frozen, rest = optim.partition(model, ocfg.frozen)
  state = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                 frozen=frozen, rest=rest,
                                 opt_state=jax.eval_shape(tx.init, params),
                                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return graphdef, tx, optim.schedule(ocfg, 1000), state, train_state.state_shardings(
      state, mesh, offload_optimizer=args.offload_optimizer)


def _groups(args, mesh) -> int:
  """Batch groups of the global batch: one per data-parallel shard, over all processes (a
  topology's devices belong to many hosts; each host's loader yields its own groups)."""
  from deepintuit_jax.core import sharding as sharding_lib
  groups = sharding_lib.data_parallel_size(mesh)
  if args.batch % groups:
    raise SystemExit(f"error: --batch {args.batch} must be a multiple of the {groups} "
                     f"data-parallel shards of mesh {dict(mesh.shape)} (one row per shard "
                     "at least; use --accum for a larger global batch)")
  return groups


def _abstract_batch(host: dict, mesh, row_axes=None) -> dict:
  import jax
  import numpy as np
  from deepintuit_jax.core import sharding as sharding_lib
  sh = sharding_lib.batch_shardings(host, mesh, row_axes=row_axes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                        sharding=s), host, sh)


def _build(args, cfg, opts, mesh, kind: str) -> Built:
  """The train step of `kind` (sft, grpo, calibrate) lowered from shapes. Every trainer name
  the check uses is in here."""
  import numpy as np
  from deepintuit_jax.algorithms import calibrator, sft
  from deepintuit_jax.core import sharding as sharding_lib
  from deepintuit_jax.engine import optim
  from deepintuit_jax.engine.step import TrainStep

  groups = _groups(args, mesh)
  graphdef, tx, lr_fn, state, shardings = _train_state(args, cfg, opts, mesh, kind)
  shared = kind == "grpo" and shares_prompt(args, groups)
  if shared:
    host = sharding_lib.as_groups(fake_shared_grpo_batch(
        cfg, prompts=args.batch // args.group, group=args.group, groups=groups,
        text=args.text, frames=args.frames, side=args.side))
  else:
    host = sharding_lib.as_groups(sft.device_batch(fake_batch(
        cfg, batch=args.batch, groups=groups, text=args.text, frames=args.frames,
        side=args.side)))
  if kind == "grpo":
    host, step = grpo_step(graphdef, tx, lr_fn, host, mesh=mesh, shardings=shardings,
                           loss_chunk=args.loss_chunk)
  elif kind == "calibrate":  # the release's label-token readout (loss on one token per row)
    step = TrainStep(calibrator.make_loss_fn(graphdef, "label_token", [1, 2]), tx, lr_fn,
                     mesh=mesh, state_sharding=shardings, count_name="rows")
  else:
    step = sft.make_train_step(graphdef, tx, lr_fn, mesh=mesh, state_sharding=shardings,
                               loss_chunk=args.loss_chunk)
  lowered = step.jitted.lower(_abstract(state, shardings),
                              (_abstract_batch(host, mesh, step.row_axes),) * args.accum)
  g, b, t = np.shape(host["input_ids"])
  n_dp = sharding_lib.data_parallel_size(mesh)
  info = dict(groups=groups, trainable=optim.count_params(state.params),
              frozen=optim.count_params(state.frozen), tokens_per_step=int(g * b * t),
              patches_per_group=int(np.shape(host["pixel_values_videos"])[1]))
  if kind == "grpo":
    info["layout"] = (f"prompt-shared: {g * b} prompt(s) of {t} tokens, each under "
                      f"{args.group} responses" if shared else "one prompt ++ response row "
                      "per response")
  if shared:  # the analytic estimate counts each response with its prompt (an upper bound)
    r, l = np.shape(host["response_ids"])[1:]
    info["tokens_per_step"] += int(g * r * l)
    b, t = r, t + l
  return Built(lowered=lowered, state=state, shardings=shardings,
               rows_per_device=max(g * b // n_dp, 1), seq_len=t,
               patches_per_device=int(np.shape(host["pixel_values_videos"])[1]) * max(g // n_dp, 1),
               info=info)


def shares_prompt(args, groups: int) -> bool:
  """The GRPO learner's layout for these shapes (`learner.shares_prompt`) when --batch rows
  are whole groups of --group responses."""
  from deepintuit_jax.algorithms.grpo import learner
  prompts, rest = divmod(args.batch, args.group)
  return not rest and learner.shares_prompt(args.share_prompt, prompts, groups)


def grpo_step(graphdef, tx, lr_fn, host: dict, *, mesh, shardings, loss_chunk: int):
  """The GRPO update step and `host` with GRPO's per-row arrays added (advantages [G, b],
  old / rollout log-probs [G, b, T]), so the check covers the policy-loss step too."""
  import numpy as np
  from deepintuit_jax.algorithms.grpo import learner
  if "response_ids" not in host:  # a prompt-shared batch has them already
    ids = np.asarray(host["input_ids"])
    host = dict(host, advantages=np.zeros(ids.shape[:2], np.float32),
                old_logprobs=np.zeros(ids.shape, np.float32),
                rollout_logprobs=np.zeros(ids.shape, np.float32))
  cfg = learner.GRPOConfig(group_size=1, prompts_per_rollout=1, mini_batch_prompts=1,
                           logp_chunk=loss_chunk)
  return host, learner.TrainStep(learner.make_loss_fn(graphdef, cfg), tx, lr_fn, mesh=mesh,
                                 state_sharding=shardings, finalize_aux=learner.finalize_aux)


def _build_rollout(args, cfg, opts, mesh) -> Built:
  """GRPO's rollout program (sampling.sampler): the prefill of `--batch` prompts (text +
  video, vision tower included), then `--response` decode steps of `--group` responses per
  prompt over one shared prompt cache, with the learner's parameters as they are held in
  training (fp32, sharded like the train state)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from deepintuit_jax.algorithms.grpo import rollout
  from deepintuit_jax.core import sharding as sharding_lib
  from deepintuit_jax.engine import optim
  from deepintuit_jax.models import qwen2_5_vl
  from deepintuit_jax.sampling import sampler

  groups = _groups(args, mesh)
  graphdef, state = nnx.split(qwen2_5_vl.abstract_model(cfg, opts))
  shardings = sharding_lib.state_shardings(state, mesh)
  host = sharding_lib.as_groups({k: v for k, v in fake_batch(
      cfg, batch=args.batch, groups=groups, text=args.text, frames=args.frames,
      side=args.side).items() if k in rollout.SAMPLER_KEYS})
  host["input_ids"] = np.asarray(host["input_ids"], np.int32)
  host["attention_mask"] = np.asarray(host["attention_mask"]).astype(bool)
  g, b, t = host["input_ids"].shape
  host["row_ids"] = np.arange(g * b, dtype=np.int32).reshape(g, b)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=NamedSharding(mesh, P()))  # noqa
  lowered = sampler._sample_jit.lower(
      graphdef, _abstract(state, shardings),
      _abstract_batch(host, mesh, rollout.SAMPLER_ROW_AXES),
      scalar(jax.eval_shape(lambda: jax.random.key(0)).dtype),  # a typed PRNG key
      scalar(jnp.float32), scalar(jnp.float32),
      jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(mesh, P())),
      scalar(jnp.int32), max_new_tokens=args.response, num_samples=args.group,
      cache_dtype=opts.dtype)
  n_dp = sharding_lib.data_parallel_size(mesh)
  return Built(lowered=lowered, state=state, shardings=shardings,
               rows_per_device=max(g * b * args.group // n_dp, 1), seq_len=t,
               patches_per_device=int(np.shape(host["pixel_values_videos"])[1]) * max(g // n_dp, 1),
               info=dict(groups=groups, trainable=0, frozen=optim.count_params(state),
                         tokens_per_step=int(g * b * (t + args.response * args.group)),
                         patches_per_group=int(np.shape(host["pixel_values_videos"])[1])))


STEPS: dict[str, Callable[..., Built]] = {
    "sft": lambda *a: _build(*a, kind="sft"),
    "grpo": lambda *a: _build(*a, kind="grpo"),  # the policy-loss update step
    "rollout": _build_rollout,                   # GRPO's sampler: prefill + decode loop
    "calibrate": lambda *a: _build(*a, kind="calibrate"),
}


def _mesh(args):
  """The mesh of the run checked: over a TPU slice's compile-only devices (--topology, its
  data axis x --num_slices over DCN), N fake CPU devices, or this machine's devices."""
  import jax
  from deepintuit_jax.core import sharding as sharding_lib
  shape = [int(x) for x in args.mesh.split(",")]
  devices, spec = None, None
  if args.topology:
    from launch import tpu_topologies
    spec = tpu_topologies.slice_spec(args.topology)
    try:
      devices = tpu_topologies.devices(spec, args.num_slices)
    except Exception as e:  # noqa: BLE001 (libtpu missing or refusing: one line)
      raise SystemExit(f"error: no TPU topology {spec.topology} ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0][:200]}); install libtpu: pip install "
                       '"jax[tpu]" (Python >= 3.11, one process at a time)')
    if shape[0] != -1:
      shape[0] *= args.num_slices
  elif args.num_slices != 1:
    raise SystemExit("error: --num_slices needs --topology")
  return sharding_lib.make_mesh(shape, devices=devices or jax.devices()), spec


def _attention_name(opts, mesh) -> str:
  from deepintuit_jax.core import sharding as sharding_lib
  from deepintuit_jax.models.qwen2_5_vl import attention
  impl = attention.resolve_impl(opts.attention_impl, dtype=opts.dtype, head_dim=128,
                                causal_text=True, platform=sharding_lib.mesh_platform(mesh))
  return {"pallas": "splash", "cudnn": "cudnn flash"}.get(impl, impl)


def check(args, cfg, opts, mesh, spec, name: str) -> dict:
  """Lowers and compiles one program; prints its figures and verdict; returns them."""
  import jax
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the model's per-layer FSDP gathers need the mesh in context
    built = STEPS[name](args, cfg, opts, mesh)
  out = dict(step=name, size=args.size, mesh=dict(mesh.shape), **built.info,
             lower_seconds=round(time.perf_counter() - t0, 1))
  print(f"== {name} {args.size}: {out['trainable']:,} trainable + {out['frozen']:,} frozen "
        f"parameters; mesh {dict(mesh.shape)}; {out['groups']} batch group(s); "
        f"{out['tokens_per_step']:,} token slots; lowered in {out['lower_seconds']}s",
        flush=True)
  if "layout" in out:
    print(f"learner batch: {out['layout']}", flush=True)
  if name != "rollout":
    held, transients = breakdown(args, cfg, opts, mesh, built)
    out["analytic_bytes"] = {k: int(b) for k, b in {**held, **transients}.items()}
  if args.no_compile:
    if "analytic_bytes" in out:
      print("\n".join(report(held, transients, None)))
    return out
  t0 = time.perf_counter()
  try:
    compiled = built.lowered.compile()
  except Exception as e:  # noqa: BLE001
    oom = oom_figures(e)
    if oom is None:
      raise
    out.update(oom, compile_seconds=round(time.perf_counter() - t0, 1))
    if "used_bytes" in oom:
      out["total_bytes"] = oom["used_bytes"]
      print(f"XLA:TPU refused it (CompileTimeHbmOom): {oom['used_bytes'] / GiB:.2f} GiB "
            f"needed > {oom['hbm_bytes'] / GiB:.2f} GiB HBM")
    else:
      out["total_bytes"] = bytes_per_device(built.state, built.shardings) + oom[
          "temp_size_in_bytes"]
      print(f"XLA:TPU refused it (CompileTimeHbmOom): temporaries "
            f"{oom['temp_size_in_bytes'] / GiB:.2f} GiB > {oom['hbm_bytes'] / GiB:.2f} GiB HBM")
  else:
    out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    mem = memory_figures(compiled)
    if mem:  # + the program's code, which the chip holds too
      out.update(mem, total_bytes=peak_estimate(mem) + int(getattr(
          compiled.memory_analysis(), "generated_code_size_in_bytes", 0) or 0))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      out["flops_per_device"] = float(cost["flops"])
    if "total_bytes" in out:
      print("XLA per device: arguments {:.2f}, temporaries {:.2f}, outputs {:.2f} (aliased "
            "{:.2f}) GiB; total {:.2f} GiB; {:.3e} FLOPs; compiled in {}s".format(
                *(out[k] / GiB for k in ("argument_size_in_bytes", "temp_size_in_bytes",
                                         "output_size_in_bytes", "alias_size_in_bytes",
                                         "total_bytes")),
                out.get("flops_per_device", 0.0), out["compile_seconds"]))
      if out.get("host_argument_size_in_bytes"):
        print(f"host memory per device: arguments "
              f"{out['host_argument_size_in_bytes'] / GiB:.2f} GiB (not counted above)")
  if "analytic_bytes" in out:
    print("\n".join(report(held, transients, out if "argument_size_in_bytes" in out else None)))
  if args.buffers:
    print("largest buffers (XLA's buffer assignment, per device):")
    print("\n".join(largest_buffers(args.dump_dir, args.buffers)))
  hbm = int((args.hbm_gib or (spec.hbm_gib if spec else 0)) * GiB)
  where = (args.topology + (f" x{args.num_slices}" if args.num_slices > 1 else "")
           if args.topology else f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices")
  label = f"({name} step, {args.size.upper()}, {where}, {_attention_name(opts, mesh)})"
  if hbm and "total_bytes" in out:
    out["hbm_bytes"], out["fits"] = hbm, out["total_bytes"] <= hbm
    print(f"fits: {'yes' if out['fits'] else 'no'}, {out['total_bytes'] / GiB:.1f} of "
          f"{hbm / GiB:.1f} GiB per device {label}", flush=True)
    if not out["fits"]:
      est = (sum(held.values()) + max(transients.values()) if "analytic_bytes" in out
             else out["total_bytes"])
      out["suggestions"] = suggestions(args, mesh, built, est, hbm)
      print("\n".join(f"  might fit (estimated; rerun with): {x}" for x in out["suggestions"]))
  elif "total_bytes" in out:
    print(f"total: {out['total_bytes'] / GiB:.1f} GiB per device {label} (no HBM to judge "
          "against: pass --hbm_gib)", flush=True)
  return out


def main(argv=None) -> dict:
  """Checks each program of `--step`; returns {program: figures}."""
  args = parse_args(argv)
  if args.buffers:
    if "jax" in sys.modules:
      raise RuntimeError("--buffers must be set before jax is imported")
    import tempfile
    args.dump_dir = tempfile.mkdtemp(prefix="aot_check_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={args.dump_dir} --xla_dump_hlo_module_re=.*(step|sample).*")
  if args.fake_devices:
    if "jax" in sys.modules:
      raise RuntimeError("--fake_devices must be set before jax is imported")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.fake_devices}")
  import jax.numpy as jnp

  from deepintuit_jax.models import qwen2_5_vl, tiny
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions

  cfg = tiny.tiny_config() if args.size == "tiny" else qwen2_5_vl.PRESETS[args.size]
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  opts = RuntimeOptions(dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
                        attention_impl=args.attention or None,
                        attention_block=args.attention_block)
  mesh, spec = _mesh(args)
  return {name: check(args, cfg, opts, mesh, spec, name) for name in args.steps}


if __name__ == "__main__":
  results = main()
  sys.exit(0 if all(r.get("fits", True) for r in results.values()) else 1)
