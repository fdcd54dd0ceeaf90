"""Rollout decode throughput: our KV-cache sampler vs transformers' `generate`, same model.

    python benchmarks/rollout.py --size=tiny --batch=1,4 --groups=1,8 --prompt=64 --new=64

Both sides load one random-weight Qwen2.5-VL Hugging Face directory (written by
`models/tiny.write_tiny_checkpoint`, or a wider `--size`) and decode the same text
prompts greedily for exactly `--new` tokens (no stop token), so their tokens must agree;
the table prints that agreement. For each prompt batch B and group size G:
* ours: `sampler.sample(..., num_samples=G)`: one prefill per prompt, G continuations;
* transformers: `model.generate(do_sample=False)` on the prompts repeated G times (what
  `num_return_sequences=G` does; greedy forbids that argument).
Columns: `tok/s` = B*G*new / wall time of the whole call (prefill included); `decode tok/s`
= B*G*(new-1) / (t(new) - t(1)), the per-token loop alone. Times are the best of `--repeats`
calls after a warm-up call (our compilation is excluded; it is printed separately).

KV-cache memory: `--paper` prints, for Qwen2.5-VL-3B / 7B text dims in bf16 and the recipe's
rollout (64 prompts x G = 8, 2,048 new tokens), the bytes of a KV cache that copies each
prompt's keys/values G times (B*G*(P+N) slots) against one that shares them (B*P + B*G*N
slots). For the measured model the table adds the same two figures for its dims and the
measured temporary memory of our compiled sampler program (`memory_analysis()` of the
jitted `sample`: KV cache, logits, activations), which shows the layout the code really uses.
`--no_hf` skips transformers (ours only). `dec/CPU-s`: our decode rate over process CPU
time instead of wall time (steadier on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# text (hidden, mlp, layers, heads, kv heads); vision is the tiny default (unused: text prompts)
SIZES = {"tiny": (64, 128, 2, 4, 2), "small": (256, 704, 4, 8, 2), "medium": (512, 1408, 8, 8, 2)}


def write_checkpoint(path: str, size: str) -> str:
  from deepintuit_jax.models import tiny
  d, f, l, h, kv = SIZES[size]
  cfg = tiny.tiny_config(text=dict(hidden_size=d, intermediate_size=f, num_hidden_layers=l,
                                      num_attention_heads=h, num_key_value_heads=kv))
  return tiny.write_tiny_checkpoint(path, config=cfg)


# Text decoder dims for the on-paper cache sizes: (layers, kv heads, head dim).
PAPER = {"Qwen2.5-VL-3B": (36, 2, 128), "Qwen2.5-VL-7B": (28, 4, 128)}


def cache_bytes(layers: int, kv_heads: int, head_dim: int, itemsize: int, b: int, g: int,
                p: int, n: int) -> tuple[int, int]:
  """(copied, shared) KV-cache bytes: B*G*(P+N) slots vs B*P + B*G*N slots, K and V."""
  per_slot = 2 * layers * kv_heads * head_dim * itemsize
  return b * g * (p + n) * per_slot, (b * p + b * g * n) * per_slot


def decode_step_bytes(model, b: int, g: int, p: int, n: int) -> int:
  """The least HBM bytes one decode step of `model` reads (the roofline's denominator):
  every decoder weight once (the embedding table only when tied, where it is the lm head;
  the vision tower not at all) plus the mean live KV cache of the shared-prompt layout over
  N new tokens (B*P + B*G*N/2 slots)."""
  from deepintuit_jax.models.qwen2_5_vl import hf_io
  t = model.config.text
  weights = 0
  for path, var in hf_io.param_items(model):
    name = ".".join(map(str, path))
    if name.startswith("visual.") or (name.startswith("model.embed_tokens.")
                                      and not t.tie_word_embeddings):
      continue
    x = var.get_value()
    weights += int(x.size) * np.dtype(x.dtype).itemsize
  _, kv = cache_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim,
                      np.dtype(model.opts.dtype).itemsize, b, g, p, n // 2)
  return weights + kv


def gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.2f} MiB"


def print_paper():
  print("KV cache on paper (bf16; B = 64 prompts, G = 8, N = 2,048 new tokens):")
  print(f"{'model':>14s} {'P':>6s} | {'copied (today)':>15s} {'shared':>12s} {'saving':>7s}")
  for name, (l, k, hd) in PAPER.items():
    for p in (512, 1024, 4096):
      old, new = cache_bytes(l, k, hd, 2, 64, 8, p, 2048)
      print(f"{name:>14s} {p:6d} | {gib(old):>15s} {gib(new):>12s} {old / new:6.2f}x")


def best_time(fn, repeats: int) -> tuple[float, float]:
  """Best wall time and best process CPU time of `repeats` calls (CPU time is the steadier
  figure on a shared machine)."""
  wall = cpu = float("inf")
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
  return wall, cpu


def measure(side, ids: np.ndarray, g: int, new: int, repeats: int) -> tuple:
  """Greedy decode of `ids` [B, P] with G = `g` samples each by `side` (Ours / Theirs):
  (tokens [B*G, new], tok/s of the whole call, decode tok/s = B*G*(new-1) / (t(new) - t(1)),
  the same over process CPU time); best of `repeats` calls after a warm-up of each length."""
  rows = ids.shape[0] * g
  tokens = side.warm(ids, g, new)
  side.warm(ids, g, 1)
  full, full_cpu = best_time(lambda: side.run(ids, g, new), repeats)
  one, one_cpu = best_time(lambda: side.run(ids, g, 1), repeats)
  return (tokens, rows * new / full, rows * (new - 1) / max(full - one, 1e-9),
          rows * (new - 1) / max(full_cpu - one_cpu, 1e-9))


class Ours:
  """Our sampler on `model` (a Qwen2_5_VL); `Ours.load(path, dtype)` reads an HF directory."""

  def __init__(self, model):
    import jax
    self.jax = jax
    self.model = model
    self.compile_s = {}

  @classmethod
  def load(cls, path: str, dtype: str) -> "Ours":
    import jax.numpy as jnp
    from deepintuit_jax.models.qwen2_5_vl.hf_load import from_pretrained
    return cls(from_pretrained(path, dtype=getattr(jnp, dtype)))

  def run(self, ids: np.ndarray, g: int, new: int) -> np.ndarray:
    from deepintuit_jax.sampling import sampler
    out = sampler.sample(self.model, ids, np.ones_like(ids), rng=self.jax.random.key(0),
                         max_new_tokens=new, num_samples=g, pad_token_id=0)
    return np.asarray(out.tokens)   # blocks until ready

  def warm(self, ids, g, new):
    t0 = time.perf_counter()
    tokens = self.run(ids, g, new)
    self.compile_s[(ids.shape, g, new)] = time.perf_counter() - t0
    return tokens

  def temp_bytes(self, ids: np.ndarray, g: int, new: int) -> int:
    """Temporary memory of the compiled sampler program (its KV cache included)."""
    from deepintuit_jax.sampling import sampler
    args, kw = sampler._jit_args(
        self.model, ids, np.ones_like(ids), rng=self.jax.random.key(0), max_new_tokens=new,
        temperature=0.0, top_p=1.0, stop_token_ids=(), pad_token_id=0, position_ids=None,
        pixel_values=None, image_layout=None, pixel_values_videos=None, video_layout=None,
        num_samples=g, cache_dtype=None)
    stats = sampler._sample_jit.lower(*args, **kw).compile().memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else -1


class Theirs:
  def __init__(self, path: str, dtype: str):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    self.torch = torch
    self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    gc = self.model.generation_config
    gc.eos_token_id = None     # no stop token: exactly `new` tokens, like ours
    gc.do_sample = False

  def run(self, ids: np.ndarray, g: int, new: int) -> np.ndarray:
    torch = self.torch
    x = torch.as_tensor(np.repeat(ids, g, axis=0), dtype=torch.long)
    with torch.inference_mode():
      out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()

  warm = run


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
  ap.add_argument("--batch", default="1,4", help="prompt batch sizes B, comma-separated")
  ap.add_argument("--groups", default="1,8", help="group sizes G (num_samples), comma-separated")
  ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
  ap.add_argument("--new", type=int, default=64, help="generated tokens per response")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--checkpoint", default="", help="an HF directory instead of a random one")
  ap.add_argument("--no_hf", action="store_true", help="skip transformers (ours only)")
  ap.add_argument("--paper", action="store_true", help="also print the on-paper 3B/7B caches")
  args = ap.parse_args()
  if args.paper:
    print_paper()
  batches = [int(x) for x in args.batch.split(",")]
  groups = [int(x) for x in args.groups.split(",")]

  import jax
  import torch
  tmp = tempfile.TemporaryDirectory()
  path = args.checkpoint or write_checkpoint(tmp.name, args.size)
  ours = Ours.load(path, args.dtype)
  theirs = None if args.no_hf else Theirs(path, args.dtype)
  t = ours.model.config.text
  print(f"model: {path if args.checkpoint else 'random ' + args.size}: width {t.hidden_size}, "
        f"{t.num_hidden_layers} layers, {t.num_attention_heads} heads ({t.num_key_value_heads} "
        f"kv), vocab {t.vocab_size}; {args.dtype}; prompt {args.prompt} + {args.new} new "
        f"tokens, greedy")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  itemsize = np.dtype(args.dtype).itemsize if args.dtype == "float32" else 2
  rng = np.random.default_rng(0)
  hdr = (f"{'B':>3s} {'G':>3s} {'rows':>5s} | {'ours tok/s':>10s} {'decode':>9s} | "
         f"{'HF tok/s':>9s} {'decode':>9s} | {'ratio':>6s} {'decode':>7s} | "
         f"{'rows same':>9s} {'tok same':>8s} | {'compile s':>9s} {'dec/CPU-s':>9s} | "
         f"{'KV copied':>10s} {'KV shared':>10s} {'temp mem':>10s}")
  print(hdr)
  print("-" * len(hdr))
  for b in batches:
    ids = rng.integers(8, 1000, (b, args.prompt)).astype(np.int32)  # no special tokens
    for g in groups:
      rows = b * g
      res = {}
      for name, side in (("ours", ours), ("hf", theirs)):
        if side is None:
          continue
        res[name] = measure(side, ids, g, args.new, args.repeats)
      if theirs is None:
        hf = f"{'-':>9s} {'-':>9s} | {'-':>6s} {'-':>7s} | {'-':>9s} {'-':>8s}"
      else:
        a, bt = res["ours"][0], res["hf"][0]
        assert a.shape == bt.shape, (a.shape, bt.shape)
        same_rows = int(np.all(a == bt, axis=1).sum())
        same_tok = float(np.mean(a == bt))
        hf = (f"{res['hf'][1]:9.1f} {res['hf'][2]:9.1f} | {res['ours'][1] / res['hf'][1]:5.2f}x "
              f"{res['ours'][2] / res['hf'][2]:6.2f}x | {same_rows:4d}/{rows:<4d} "
              f"{same_tok:8.1%}")
      compile_s = ours.compile_s[(ids.shape, g, args.new)]
      copied, shared = cache_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim,
                                   itemsize, b, g, args.prompt, args.new)
      temp = ours.temp_bytes(ids, g, args.new)
      print(f"{b:3d} {g:3d} {rows:5d} | {res['ours'][1]:10.1f} {res['ours'][2]:9.1f} | {hf} | "
            f"{compile_s:9.2f} {res['ours'][3]:9.1f} | {gib(copied):>10s} {gib(shared):>10s} {gib(temp):>10s}")
  print("ratio = ours / transformers (higher is faster); compile s = our first call "
        "(trace + XLA compile + run); dec/CPU-s = our decode tokens per second of process "
        "CPU time; KV copied / shared = the cache of either layout for "
        "these dims; temp mem = our compiled program's temporary memory")


if __name__ == "__main__":
  main()
