"""Memory figures of an ahead-of-time compiled program (launch/aot_check.py): XLA's own
(memory_analysis, its out-of-memory messages, the largest buffers of its buffer assignment),
an analytic breakdown of a train step (parameters, optimizer state, gradients, saved
activations, the largest transients) and what might fit when it does not."""
from __future__ import annotations

import os
import re
from typing import Any

GiB = 2 ** 30

def bytes_per_device(tree, shardings, *, host: bool = False) -> int:
  """Bytes of `tree`'s shards on one device: those in the device's memory, or (host=True)
  those its shardings place in host memory (train.offload_optimizer)."""
  import jax
  import numpy as np
  from deepintuit_jax.core.sharding import HOST_MEMORY
  leaves = jax.tree.leaves(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, sh)
             if (getattr(s, "memory_kind", None) == HOST_MEMORY) == host)


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


def breakdown(args, cfg, opts, mesh, built: Any) -> dict[str, float]:
  """Analytic per-device GiB: what is held for the whole step and the largest transients."""
  import jax.numpy as jnp
  st, sh = built.state, built.shardings
  rows, seq = built.rows_per_device, built.seq_len
  t, v = cfg.text, cfg.vision
  layers = t.num_hidden_layers
  dt = jnp.dtype(opts.dtype).itemsize
  tensor = mesh.shape["tensor"]
  params = bytes_per_device(st.params, sh.params)
  per_layer = layer_residual_bytes(cfg, opts, rows, seq, args.remat)
  mlp = t.intermediate_size // tensor
  layer_params = (4 * t.hidden_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
  out = {
      "parameters (trainable, fp32)": params,
      "parameters (frozen)": bytes_per_device(st.frozen, sh.frozen),
      "optimizer state": bytes_per_device(st.opt_state, sh.opt_state),
      "gradients": params * (2 if args.accum > 1 else 1),
      f"saved activations ({layers} layers x {per_layer / GiB:.2f} GiB, remat "
      f"{args.remat})": layers * per_layer,
  }
  host_opt = bytes_per_device(st.opt_state, sh.opt_state, host=True)
  transients = {
      "one layer's backward (recompute + gathered weights and their gradients)":
          layer_residual_bytes(cfg, opts, rows, seq, "none") + layer_params * (dt + 4) // tensor,
      f"loss chunk ({args.loss_chunk} tokens x vocab, fp32 logits + gradient)":
          3 * (args.loss_chunk or rows * seq) * t.vocab_size * 4 // tensor,
      "vision block (patches x (3 * width + 3 * mlp))":
          built.patches_per_device * (3 * v.hidden_size + 3 * v.intermediate_size) * dt,
      "MLP activations of one layer": 3 * rows * seq * mlp * 4,
  }
  if host_opt:  # the update copies the moments in, and makes the parameters' update
    transients["optimizer update (moments copied in from host memory + the update)"] = (
        host_opt + params)
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
      "alias_size_in_bytes", "host_argument_size_in_bytes")}


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
  lines += ["    (other transients: " + ", ".join(
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
            "more fsdp devices (the moments and parameters are sharded)" if "optimizer" in name
            else "fewer rows per device, or tensor parallelism (mesh third axis)")
  lines.append(f"  dominant: {top if out[top] >= peak else name} -> {hint}")
  return lines


_NUM = r"([\d.]+)([KMGT]?)"
# XLA:TPU's two CompileTimeHbmOom messages: temporaries alone over the chip, or all of it.
_OOM_TEMPS = re.compile(r"HLO temporaries \(" + _NUM + r"\).*available HBM \(" + _NUM + r"\)", re.S)
_OOM_USED = re.compile(r"Used " + _NUM + r" of " + _NUM + r" hbm")


def oom_figures(err: Exception) -> dict[str, int] | None:
  """XLA:TPU refuses at compile time a program that cannot fit (CompileTimeHbmOom); its
  message names what it needed (the temporaries, or everything) and the HBM it had."""
  unit = lambda u: 1024 ** "_KMGT".index(u or "_")  # noqa: E731
  for pattern, key in ((_OOM_TEMPS, "temp_size_in_bytes"), (_OOM_USED, "used_bytes")):
    m = pattern.search(str(err))
    if m:
      return {key: int(float(m.group(1)) * unit(m.group(2))),
              "hbm_bytes": int(float(m.group(3)) * unit(m.group(4)))}
  return None


_SIZE = re.compile(r"^\s*\S+\(\s*\d+%\);\s*([\d.]+)([KMGT]?i?B);\s*\d+;\s*(\d+);\s*(.*)$")


def largest_buffers(dump_dir: str, n: int) -> list[str]:
  """The n largest allocations of the device's memory space in XLA's memory-usage report
  of the last compiled program (`--xla_dump_to`): size, values sharing it, shapes."""
  import glob
  reports = sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")),
                   key=os.path.getmtime)
  if not reports:
    return ["(no memory-usage report: this XLA backend does not write one)"]
  rows = []
  with open(reports[-1]) as f:
    for line in f:
      if line.startswith("Memory Space:") and "default" not in line:
        break
      m = _SIZE.match(line)
      if m:
        unit = 1024 ** "BKMGT".index(m.group(2)[0]) if m.group(2) != "B" else 1
        rows.append((float(m.group(1)) * unit, int(m.group(3)), m.group(4)))
  rows.sort(key=lambda r: -r[0])
  return [f"  {size / 2 ** 20:9.1f} MiB  {shapes[:140]}" + (" (shared by %d values)" % k if k > 1
                                                      else "") for size, k, shapes in rows[:n]]


def suggestions(args, mesh, built: Any, total: int, hbm: int) -> list[str]:
  """What could fit, estimated from `total` (the analytic held + largest transient where
  there is one: XLA:TPU's CompileTimeHbmOom figure overstates the temporaries, e.g. 17.8
  GiB for the 7B SFT step on v5e-8 where the same per-device program compiled for v5p-16
  takes 8.8): the sharded train state and
  its gradients shrink with more fsdp devices, activations with fewer rows per device, one
  layer's gathered weights with tensor parallelism. Each comes with the command that checks
  it (XLA's figures under pressure are not additive: compile it)."""
  import numpy as np
  out = []
  held = (bytes_per_device(built.state, built.shardings)
          + bytes_per_device(built.state.params, built.shardings.params))  # + gradients
  n = int(np.prod(list(mesh.shape.values())))
  fsdp = mesh.shape["fsdp"]
  for more in (2, 4, 8, 16):
    if total - held + held / more <= hbm:
      chips = (f"--topology={args.topology.split('-')[0]}-{int(args.topology.split('-')[1]) * more}"
               if args.topology else f"{n * more} devices")
      out.append(f"{chips} --batch={args.batch * more} (fsdp x{more}: the train state and "
                 f"gradients {held / GiB:.1f} -> {held / more / GiB:.1f} GiB per device)")
      break
  if built.rows_per_device > 1:
    out.append(f"--batch={args.batch // 2} --accum={2 * args.accum} (half the activations per "
               "device, the same global batch)")
  if args.remat != "full":
    out.append("--remat=full (keep only each layer's input for the backward)")
  opt = bytes_per_device(built.state.opt_state, built.shardings.opt_state)
  if opt:  # the update still needs the moments on the device, with their update beside them
    update = 3 * bytes_per_device(built.state.params, built.shardings.params) + opt
    if max(total - opt, update) <= hbm:
      out.append(f"--offload_optimizer (the optimizer state, {opt / GiB:.1f} GiB per device, "
                 "in host memory between steps: config train.offload_optimizer=True)")
  if mesh.shape["tensor"] == 1 and fsdp % 2 == 0:
    out.append(f"--mesh=1,{fsdp // 2},2 --batch={max(args.batch // 2, 1)} (tensor parallelism "
               "splits each layer's gathered weights, their gradients and the MLP activations)")
  if not out:
    out.append("a chip with more HBM, or fewer trainable parameters (--frozen)")
  return out
