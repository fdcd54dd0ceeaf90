"""The GPU check: five measurements with a verdict each, for the first GPU lent.

    python benchmarks/gpu_check.py --size=3b --out=gpu_check.json   # one H100 / H200, < 10 min
    python benchmarks/gpu_check.py --size=tiny                       # any CPU, < 1 min (CI)

Checks, in this order (`--checks=attention,parity,sft,decode` picks some); each prints its
figure, the rule it is held to and PASS / FAIL (a check that raises is a FAIL with the error,
and the others still run); `--out` gets every figure as JSON; the exit code is 1 if one fails.
* attention: cuDNN flash (`cudnn_attention`; on CPU its implementation="xla") and the
  blockwise kernel on the same bf16 q, k, v (3B heads, GQA, one left-padded row) against
  an fp32 oracle, output and dq, dk, dv: cuDNN's error <= 2x blockwise's. Also the
  forward + backward milliseconds of both.
* parity_fp32, parity_bf16: our forward (text + one video) against transformers'
  `Qwen2_5_VLForConditionalGeneration` with the same random weights (norms and biases
  randomised too). 3b: the 3B widths (decoder 2048, 16 / 2 heads of 128, vocab 151,936,
  vision 1280) at reduced depth (8 of 36 decoder layers, 8 of 32 vision blocks: every
  kernel at its real size, in about a minute), 322 tokens (64 text, 256 video: 8 frames at
  224 px). Error = relative L2 of the logits against transformers in fp32 (TF32 off,
  "highest" matmuls). fp32: ours <= 1e-4 (rounding only). bf16 (ours: auto attention =
  cuDNN on GPU): ours <= 2x transformers' own bf16 error (the reference's own rounding).
* sft_mfu: one SFT step of the 3B model (32 frames at 448 px + 512 text tokens, remat
  full, bf16 compute, fp32 AdamW; benchmarks/sft_step.py), MFU against the device's dense
  bf16 peak (sft_step.peak_flops; on CPU a measured matmul). Floor 20% on GPU.
* peak_memory: `peak_bytes_in_use` after that step against XLA's estimate of the same
  compiled step (arguments + temporaries + outputs - aliased, launch/aot_memory.py): the
  ratio must lie in [0.8, 1.2]. No memory statistics (CPU): the estimate only.
* decode_roofline: greedy decode tokens/s of the 3B model in bf16 (8 prompts x G = 8,
  512-token prompts, 256 new tokens; benchmarks/rollout.py) against the HBM bound: rows /
  (bytes read per step / bandwidth), bytes = decoder weights (the tied embedding as the lm
  head) + the mean live shared-prompt KV cache. Floor 25% of the bound; unknown device:
  tokens/s only.
Thresholds on speed are first-run floors (what "not broken" means), to be raised once
measured. Imports neither grain nor ml_collections (absent on the GPU machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention_check, parity_check, rollout, sft_step  # noqa: E402
from launch import aot_memory  # noqa: E402

# HBM bandwidth in bytes/s by a substring of jax's device_kind (first match wins).
HBM_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))


@dataclasses.dataclass(frozen=True)
class Profile:
  """The shapes of one --size. parity_depth: (decoder layers, vision blocks) or None =
  the model's; attention: (B, T, heads, kv heads, head_dim, left padding of row 1, block);
  sft: make_batch's (frames, side, text, resp, batch); decode: (B, G, P, N, repeats)."""
  model: str
  parity_depth: tuple[int, int] | None
  parity_video: tuple[int, int, int]  # frames, side, text tokens
  attention: tuple[int, ...]
  sft: tuple[int, ...]
  sft_steps: tuple[int, int]  # warm-up calls (after the AOT compile), timed calls
  decode: tuple[int, ...]
  mfu_floor: float
  roofline_floor: float
  compiler_options: dict | None = None  # of the SFT step's compile


PROFILES = {
    "3b": Profile("3b", (8, 8), (8, 224, 64), (2, 4096, 16, 2, 128, 1000, 512),
                  (32, 448, 512, 256, 1), (1, 3), (8, 8, 512, 256, 2), 0.20, 0.25),
    # XLA:CPU's LLVM at -O0 halves the step's compile (~20 s on 2 cores): CI checks that the
    # code runs, not how fast XLA:CPU makes it.
    "tiny": Profile("tiny", None, (4, 56, 16), (2, 96, 4, 2, 16, 20, 32),
                    (4, 56, 32, 16, 2), (0, 1), (2, 2, 16, 8, 1), 0.0, 0.25,
                    {"xla_backend_optimization_level": 0}),
}


@dataclasses.dataclass
class Result:
  """One verdict: `value` (the headline figure, in `unit`) held to `rule`; `figures`:
  the numbers behind it; `note`: what was skipped and why."""
  name: str
  value: float
  unit: str
  passed: bool
  rule: str
  figures: dict = dataclasses.field(default_factory=dict)
  note: str = ""
  seconds: float = 0.0


def _device():
  import jax
  return jax.devices()[0]


def check_parity(prof: Profile) -> list[Result]:
  cfg = sft_step.model_config(prof.model)
  if prof.parity_depth:
    cfg = parity_check.shallow(cfg, *prof.parity_depth)
  err = parity_check.logit_errors(cfg, *prof.parity_video)
  shape = (f"decoder {cfg.text.num_hidden_layers} x {cfg.text.hidden_size}, vision "
           f"{cfg.vision.depth} x {cfg.vision.hidden_size}, {err.pop('tokens')} tokens")
  ratio = err["ours_bf16"] / max(err["hf_bf16"], 1e-30)
  return [Result("parity_fp32", err["ours_fp32"], "rel. L2 logit error",
                 err["ours_fp32"] <= 1e-4, "<= 1e-4", err, shape),
          Result("parity_bf16", ratio, "x transformers' own bf16 error", ratio <= 2.0,
                 "<= 2.0", err, shape)]


def check_attention(prof: Profile) -> list[Result]:
  err = attention_check.compare(*prof.attention)
  worst = max(err[f"cudnn_{k}"] / max(err[f"blockwise_{k}"], 1e-30)
              for k in ("out", "dq", "dk", "dv"))
  return [Result("attention", worst, "x blockwise's error (worst of out, dq, dk, dv)",
                 worst <= 2.0, "<= 2.0", err, f"(B, T, H, K, hd, pad, block) {prof.attention}")]


def check_sft(prof: Profile) -> list[Result]:
  frames, side, text, resp, batch = prof.sft
  cfg = sft_step.model_config(prof.model)
  b = sft_step.make_batch(cfg, frames, side, text, resp, batch)
  step, state, host, layout = sft_step.build_jax(cfg, b, dtype="bfloat16", remat="full",
                                                 loss_chunk=1024)
  micro = (step.place(host),)
  t0 = time.perf_counter()
  # One compile for the estimate and the timed program.
  compiled = step.jitted.lower(state, micro).compile(prof.compiler_options)
  compile_s = time.perf_counter() - t0
  mem = aot_memory.memory_figures(compiled)
  seconds, state, metrics = sft_step.time_steps(compiled, state, micro, *prof.sft_steps)
  flops = sft_step.model_flops(cfg, b, layout)
  peak, peak_src = sft_step.peak_flops("bfloat16", 0.0)
  mfu = flops / seconds / peak
  figs = dict(step_seconds=seconds, compile_seconds=compile_s, model_flops=flops,
              peak_flops=peak, tokens_per_step=int(b["input_ids"].size),
              loss=float(metrics["loss"]))
  shape = f"{frames} frames at {side} px + {text} text tokens x {batch}; peak: {peak_src}"
  out = [Result("sft_mfu", mfu, "MFU", mfu > prof.mfu_floor and math.isfinite(figs["loss"]),
                f"> {prof.mfu_floor:.2f}", figs, shape)]
  try:
    stats = _device().memory_stats() or {}
  except Exception:  # some backends raise instead of returning None
    stats = {}
  estimate = aot_memory.peak_estimate(mem) if mem else float("nan")
  figs = dict(mem or {}, estimate_bytes=estimate)
  if "peak_bytes_in_use" not in stats:
    return out + [Result("peak_memory", estimate / 2**30, "GiB estimated (no measured peak)",
                         estimate > 0, "> 0", figs, "this backend reports no memory stats")]
  figs.update(peak_bytes_in_use=stats["peak_bytes_in_use"],
              bytes_in_use_after=stats.get("bytes_in_use", -1))
  ratio = stats["peak_bytes_in_use"] / estimate
  return out + [Result("peak_memory", ratio, "x the AOT estimate (measured peak)",
                       0.8 <= ratio <= 1.2, "in [0.8, 1.2]", figs)]


def check_decode(prof: Profile) -> list[Result]:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
  b, g, p, n, repeats = prof.decode
  cfg = sft_step.model_config(prof.model)
  model = Qwen2_5_VL(cfg, RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
                     rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(8, cfg.text.vocab_size - 16, (b, p)).astype(np.int32)
  _, tok_s, decode, _ = rollout.measure(rollout.Ours(model), ids, g, n, repeats)
  step_bytes = rollout.decode_step_bytes(model, b, g, p, n)
  figs = dict(decode_tokens_per_s=decode, tokens_per_s=tok_s, bytes_per_step=step_bytes)
  kind = _device().device_kind
  bw = next((v for k, v in HBM_BANDWIDTH if k in kind), None)
  shape = f"B={b} G={g} P={p} N={n}"
  if bw is None:
    return [Result("decode_roofline", decode, "decode tokens/s (no HBM figure)",
                   decode > 0, "> 0", figs, f"{shape}; no HBM bandwidth for {kind!r}")]
  figs["bound_tokens_per_s"] = b * g * bw / step_bytes
  ratio = decode / figs["bound_tokens_per_s"]
  return [Result("decode_roofline", ratio, "x the HBM roofline", ratio >= prof.roofline_floor,
                 f">= {prof.roofline_floor:.2f}", figs, f"{shape}; {bw / 1e12:.2f} TB/s")]


# Attention first: its cuDNN call loads JAX's CUDA libraries before torch loads its own.
CHECKS = {"attention": check_attention, "parity": check_parity, "sft": check_sft,
          "decode": check_decode}


def _print(r: Result) -> None:
  nums = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in r.figures.items())
  print(f"[{'PASS' if r.passed else 'FAIL'}] {r.name}: {r.value:.4g} {r.unit} (rule {r.rule}; "
        f"{r.seconds:.1f} s)\n    {nums}" + (f"\n    {r.note}" if r.note else ""), flush=True)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="3b", choices=sorted(PROFILES))
  ap.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset")
  ap.add_argument("--out", default="", help="write every figure to this JSON file")
  args = ap.parse_args(argv)
  names = [c for c in args.checks.split(",") if c]
  unknown = sorted(set(names) - set(CHECKS))
  if unknown:
    ap.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
  if "parity" in names:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
      sys.exit(f"gpu_check: the parity check needs {' and '.join(missing)} (pip install "
               f"torch transformers), or run --checks without parity")
  # torch (parity) and JAX share the GPU: no 75% preallocation, and the SFT step may use
  # most of the memory once torch has released its cache.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  import jax
  dev = _device()  # JAX's CUDA libraries load before torch's (cuDNN version clashes)
  print(f"gpu_check --size={args.size}: jax {jax.__version__} on {dev.device_kind} "
        f"({jax.device_count()} device(s)); checks {names}", flush=True)
  prof, results, t_all = PROFILES[args.size], [], time.perf_counter()
  for name in names:
    t0 = time.perf_counter()
    try:
      got = CHECKS[name](prof)
    except Exception as e:  # a broken check must not hide the other checks' figures
      traceback.print_exc()
      got = [Result(name, float("nan"), "", False, "runs", note=f"{type(e).__name__}: {e}"[:800])]
    gc.collect()  # the check's models and states go before the next one's
    for r in got:
      r.seconds = time.perf_counter() - t0
      _print(r)
    results += got
  ok = all(r.passed and math.isfinite(r.value) for r in results)
  out = dict(size=args.size, device_kind=dev.device_kind, jax=jax.__version__, passed=ok,
             seconds=time.perf_counter() - t_all, profile=dataclasses.asdict(prof),
             checks=[dataclasses.asdict(r) for r in results])
  print(f"gpu_check: {'all passed' if ok else 'FAILED'} ({sum(r.passed for r in results)} of "
        f"{len(results)}) in {out['seconds']:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2, default=float)
  return out


if __name__ == "__main__":
  sys.exit(0 if main()["passed"] else 1)
