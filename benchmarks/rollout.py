"""Rollout decode throughput: our KV-cache sampler vs transformers' `generate`, same model.

    python benchmarks/rollout.py --size=tiny --batch=1,4 --groups=1,8 --prompt=64 --new=64

Both sides load one random-weight Qwen2.5-VL Hugging Face directory (written by
`models/testing.write_tiny_checkpoint`, or a wider `--size`) and decode the same text
prompts greedily for exactly `--new` tokens (no stop token), so their tokens must agree;
the table prints that agreement. For each prompt batch B and group size G:
* ours: `sampler.sample(..., num_samples=G)`: one prefill per prompt, G continuations;
* transformers: `model.generate(do_sample=False)` on the prompts repeated G times (what
  `num_return_sequences=G` does; greedy forbids that argument).
Columns: `tok/s` = B*G*new / wall time of the whole call (prefill included); `decode tok/s`
= B*G*(new-1) / (t(new) - t(1)), the per-token loop alone. Times are the best of `--repeats`
calls after a warm-up call (our compilation is excluded; it is printed separately).
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
  from deepintuit_jax.models import testing
  d, f, l, h, kv = SIZES[size]
  cfg = testing.tiny_config(text=dict(hidden_size=d, intermediate_size=f, num_hidden_layers=l,
                                      num_attention_heads=h, num_key_value_heads=kv))
  return testing.write_tiny_checkpoint(path, config=cfg)


def best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


class Ours:
  def __init__(self, path: str, dtype: str):
    import jax
    import jax.numpy as jnp
    from deepintuit_jax.models.qwen2_5_vl.hf_load import from_pretrained
    self.jax = jax
    self.model = from_pretrained(path, dtype=getattr(jnp, dtype))
    self.compile_s = {}

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
  args = ap.parse_args()
  batches = [int(x) for x in args.batch.split(",")]
  groups = [int(x) for x in args.groups.split(",")]

  import jax
  import torch
  tmp = tempfile.TemporaryDirectory()
  path = args.checkpoint or write_checkpoint(tmp.name, args.size)
  ours, theirs = Ours(path, args.dtype), Theirs(path, args.dtype)
  t = ours.model.config.text
  print(f"model: {path if args.checkpoint else 'random ' + args.size}: width {t.hidden_size}, "
        f"{t.num_hidden_layers} layers, {t.num_attention_heads} heads ({t.num_key_value_heads} "
        f"kv), vocab {t.vocab_size}; {args.dtype}; prompt {args.prompt} + {args.new} new "
        f"tokens, greedy")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  rng = np.random.default_rng(0)
  hdr = (f"{'B':>3s} {'G':>3s} {'rows':>5s} | {'ours tok/s':>10s} {'decode':>9s} | "
         f"{'HF tok/s':>9s} {'decode':>9s} | {'ratio':>6s} {'decode':>7s} | "
         f"{'rows same':>9s} {'tok same':>8s} | {'compile s':>9s}")
  print(hdr)
  print("-" * len(hdr))
  for b in batches:
    ids = rng.integers(8, 1000, (b, args.prompt)).astype(np.int32)  # no special tokens
    for g in groups:
      rows = b * g
      res = {}
      for name, side in (("ours", ours), ("hf", theirs)):
        tokens = side.warm(ids, g, args.new)
        side.warm(ids, g, 1)
        full = best_time(lambda: side.run(ids, g, args.new), args.repeats)
        one = best_time(lambda: side.run(ids, g, 1), args.repeats)
        res[name] = (tokens, rows * args.new / full,
                     rows * (args.new - 1) / max(full - one, 1e-9))
      a, bt = res["ours"][0], res["hf"][0]
      assert a.shape == bt.shape, (a.shape, bt.shape)
      same_rows = int(np.all(a == bt, axis=1).sum())
      same_tok = float(np.mean(a == bt))
      compile_s = ours.compile_s[(ids.shape, g, args.new)]
      print(f"{b:3d} {g:3d} {rows:5d} | {res['ours'][1]:10.1f} {res['ours'][2]:9.1f} | "
            f"{res['hf'][1]:9.1f} {res['hf'][2]:9.1f} | {res['ours'][1] / res['hf'][1]:5.2f}x "
            f"{res['ours'][2] / res['hf'][2]:6.2f}x | {same_rows:4d}/{rows:<4d} {same_tok:8.1%} | "
            f"{compile_s:9.2f}")
  print("ratio = ours / transformers (higher is faster); compile s = our first call "
        "(trace + XLA compile + run)")


if __name__ == "__main__":
  main()
