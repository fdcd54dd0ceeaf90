"""Trace generation and two-stage inference throughput (items/s) of a random-weight model.

    python benchmarks/two_stage.py --size=3b --items=32 --batch=8 --new=256 --frames=16

A `--size` model (3b: Qwen2.5-VL-3B's decoder and vision tower, the tiny tokenizer's
vocabulary; tiny: the embedded default's) is written once as an HF directory under
`--cache`, with generated clips (data.synthetic, `--side` px). Then, timed after a warm-up
pass over the same items (compilation excluded, printed separately):
* traces: `two_stage.write_traces` with K = `--traces` samples per item at temperature 1.0,
  `--new` tokens each (no stop token is forced, random weights decode to the limit rarely
  stopping early), batch `--batch` videos;
* two-stage: one trace per item at temperature 0.01 plus the calibrator's forward step
  (`Calibrator.scores`, the same model as calibrator), i.e. `evals.two_stage.two_stage`.
Prints items/s and generated tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# text (hidden, mlp, layers, heads, kv heads), vision (depth, hidden, mlp, heads)
SIZES = {"tiny": ((64, 128, 2, 4, 2), (2, 32, 64, 2)),
         "3b": ((2048, 11008, 36, 16, 2), (32, 1280, 3420, 16))}


def checkpoint(cache: str, size: str) -> str:
  from deepintuit_jax.models import tiny
  path = os.path.join(cache, f"random_{size}")
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  (d, f, l, h, kv), (vd, vw, vf, vh) = SIZES[size]
  vision = {} if size == "tiny" else dict(depth=vd, hidden_size=vw, intermediate_size=vf,
                                          num_heads=vh, window_size=112,
                                          fullatt_block_indexes=(7, 15, 23, 31))
  cfg = tiny.tiny_config(text=dict(hidden_size=d, intermediate_size=f, num_hidden_layers=l,
                                      num_attention_heads=h, num_key_value_heads=kv),
                            vision=vision)
  return tiny.write_tiny_checkpoint(path, config=cfg)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny", choices=sorted(SIZES))
  p.add_argument("--items", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--traces", type=int, default=4)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--side", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "di_bench"))
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  from deepintuit_jax.data import annotations, pipeline, synthetic
  from deepintuit_jax.evals import generation, two_stage

  path = checkpoint(a.cache, a.size)
  data = os.path.join(a.cache, f"clips_{a.items}_{a.side}_{a.frames}")
  if not os.path.isdir(data):
    synthetic.generate(data, seed=0, num_train=a.items, num_test=1, min_frames=a.frames,
                       max_frames=a.frames, sides=(a.side,))
  defs = annotations.load_class_file(os.path.join(data, "classes.json"))
  records = annotations.load_records(os.path.join(data, "train.json"))
  opts = pipeline.PipelineOptions(video_root=data, max_frames=a.frames, shuffle=False,
                                  max_pixels=a.side * a.side)
  dtype = getattr(jnp, a.dtype)
  model, tok = two_stage.load_model(path, list(defs), dtype=dtype)
  out = tempfile.mkdtemp()
  print(f"{a.size} on {jax.devices()[0].device_kind} x{jax.device_count()}: {a.items} clips "
        f"of {a.frames} frames at {a.side} px, batch {a.batch}", flush=True)

  def traces(tag: str) -> float:
    cfg = generation.EvalConfig(batch_size=a.batch, max_new_tokens=a.new, temperature=1.0)
    t0 = time.perf_counter()
    two_stage.write_traces(model, tok, records, os.path.join(out, f"{tag}.jsonl"),
                           options=opts, cfg=cfg, num_traces=a.traces)
    return time.perf_counter() - t0

  warm, t = traces("warm"), traces("timed")
  print(f"traces (K={a.traces}, {a.new} tokens): {a.items / t:.2f} items/s, "
        f"{a.items * a.traces * a.new / t:.0f} generated tok/s (upper bound: early stops "
        f"count as full); warm-up incl. compile {warm:.1f} s", flush=True)
  del model
  cfg = two_stage.TwoStageConfig(batch_size=a.batch, max_new_tokens=a.new, dtype=dtype,
                                 prompt="compact")
  times = []
  for tag in ("warm", "timed"):
    t0 = time.perf_counter()
    two_stage.two_stage(path, path, records, classes=defs, options=opts, cfg=cfg,
                        out_dir=os.path.join(out, f"two_stage_{tag}"))
    times.append(time.perf_counter() - t0)
  print(f"two-stage (1 trace at T=0.01 + calibrator step, model loads included): "
        f"{a.items / times[1]:.2f} items/s; warm-up incl. compile {times[0]:.1f} s", flush=True)
  shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
  main()
