"""SFT train-step throughput: this framework vs transformers' PyTorch step, same config.

    python benchmarks/sft_step.py --size=small --frames=8 --side=224 --text=256 --batch=1
    python benchmarks/sft_step.py --size=3b --frames=32 --side=448 --text=512   # on a GPU

Both sides run one optimizer step per iteration on the same random-weight model and the
same synthetic batch: B sequences of `text` text tokens plus one video of `frames` frames at
side x side pixels (its vision tokens inside the prompt), loss on the last `resp` tokens,
AdamW, fp32 master weights with `--dtype` compute (torch: autocast), no remat.

Model FLOPs per step (forward + backward, the PaLM convention):
  6 * N_text * T_total * B            text decoder + lm_head (embeddings excluded)
  + 6 * N_vision * P                  vision tower over its P patches (merger on P/4)
  + 12 * L * d_model * T_total^2 * B  text attention scores and values (no causal halving)
  + 12 * d_vision * sum_blocks sum_segments len^2   vision attention (windows / frames)
MFU = model FLOPs / step time / peak. Peak: --peak_tflops, else the GPU's dense bf16 spec
(H100 989, H200 989, A100 312), else on CPU a measured dense matmul peak of this machine
in the compute dtype (so CPU MFU is relative to what XLA reaches on a large matmul).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {  # text (hidden, mlp, layers, heads, kv, vocab, tied), vision (depth, width, mlp, heads)
    "tiny": ((64, 128, 2, 4, 2, 1088, False), (2, 32, 64, 2)),
    "small": ((512, 1408, 4, 8, 2, 32000, False), (4, 256, 688, 4)),
    "3b": ((2048, 11008, 36, 16, 2, 151936, True), (32, 1280, 3420, 16)),
    "7b": ((3584, 18944, 28, 28, 4, 152064, False), (32, 1280, 3420, 16)),
}


def model_config(size: str):
  from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
  (d, f, l, h, kv, v, tied), (vd, vw, vf, vh) = SIZES[size]
  hd = d // h
  t = hd // 2 // 4
  mrope = (t, (hd // 2 - t) // 2, hd // 2 - t - (hd // 2 - t) // 2)
  full = tuple(i for i in (7, 15, 23, 31) if i < vd) or (vd - 1,)
  return Qwen2_5_VLConfig(
      vision=VisionConfig(depth=vd, hidden_size=vw, intermediate_size=vf, num_heads=vh,
                          out_hidden_size=d, fullatt_block_indexes=full),
      text=TextConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=l,
                      num_attention_heads=h, num_key_value_heads=kv, mrope_section=mrope,
                      tie_word_embeddings=tied),
      image_token_id=v - 5, video_token_id=v - 4, vision_start_token_id=v - 3,
      vision_end_token_id=v - 2, bos_token_id=v - 1, eos_token_id=v - 6)


def make_batch(cfg, frames: int, side: int, text: int, resp: int, batch: int, seed: int = 0):
  """NumPy inputs: one video per row; ids [B, T], loss_mask (logit-aligned), pixels, grid."""
  from deepintuit_jax.models.qwen2_5_vl import rope
  rng = np.random.default_rng(seed)
  v = cfg.vision
  grid_hw = side // v.patch_size // v.spatial_merge_size * v.spatial_merge_size
  grid = np.array([[max(frames // v.temporal_patch_size, 1), grid_hw, grid_hw]] * batch)
  n_vis = int(grid[0].prod()) // v.spatial_merge_size ** 2
  t = text + n_vis + 2
  ids = rng.integers(0, cfg.text.vocab_size - 16, (batch, t)).astype(np.int32)
  ids[:, 4] = cfg.vision_start_token_id
  ids[:, 5:5 + n_vis] = cfg.video_token_id
  ids[:, 5 + n_vis] = cfg.vision_end_token_id
  mask = np.ones_like(ids)
  loss = np.zeros_like(ids)
  loss[:, t - resp - 1:t - 1] = 1
  pixels = rng.standard_normal((int(grid.prod(-1).sum()), v.patch_dim)).astype(np.float32)
  pos, _ = rope.get_rope_index(cfg, ids, mask, None, grid, np.ones(batch, np.float32))
  return dict(input_ids=ids, attention_mask=mask, loss_mask=loss, grid=grid, pixels=pixels,
              position_ids=pos)


def model_flops(cfg, b: dict, layout) -> float:
  t, v = cfg.text, cfg.vision
  bsz, seq = b["input_ids"].shape
  d, f, hd = t.hidden_size, t.intermediate_size, t.head_dim
  per_layer = d * (t.num_attention_heads * hd) * 2 + d * (t.num_key_value_heads * hd) * 2 + d * f * 3
  n_text = t.num_hidden_layers * per_layer + d * t.vocab_size
  vw = v.hidden_size
  n_vis_block = 4 * vw * vw + 3 * vw * v.intermediate_size
  patches = b["pixels"].shape[0]
  merger = (4 * vw) ** 2 + 4 * vw * d
  flops = 6 * n_text * seq * bsz + 6 * (v.depth * n_vis_block + v.patch_dim * vw) * patches
  flops += 6 * merger * patches / 4
  flops += 12 * t.num_hidden_layers * t.num_attention_heads * hd * seq ** 2 * bsz
  for kind, blocks in (("windowed", layout.windowed), ("full", layout.full)):
    n_blocks = len(v.fullatt_block_indexes) if kind == "full" else v.depth - len(v.fullatt_block_indexes)
    seg = np.asarray(blocks.segment)
    sq = sum(int((seg == s).sum()) ** 2 for s in np.unique(seg[seg >= 0]))
    flops += 12 * vw * sq * n_blocks
  return float(flops)


def peak_flops(dtype: str, override: float) -> tuple[float, str]:
  import jax
  import jax.numpy as jnp
  if override:
    return override * 1e12, "given"
  dev = jax.devices()[0]
  name = getattr(dev, "device_kind", "")
  for key, tf in (("H100", 989), ("H200", 989), ("A100", 312)):
    if key in name:
      return tf * 1e12, f"{name} spec"
  n = 2048
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jnp.ones((n, n), dt)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 5 * 2 * n ** 3 / (time.perf_counter() - t0), f"measured {n}^3 {dtype} matmul on {name or dev.platform}"


def build_jax(cfg, b: dict, *, dtype: str, remat: str, loss_chunk: int = 0,
              attention_impl: str | None = None):
  """Our SFT step on a random model: (step, train state, host batch dict, vision layout).

  b: `make_batch`'s arrays; the batch is un-grouped ([B, T]); fp32 master weights and
  AdamW state, `dtype` compute; attention_impl None = auto (cuDNN on GPU for bf16 text).
  """
  import jax.numpy as jnp
  from flax import nnx
  from deepintuit_jax.algorithms import sft
  from deepintuit_jax.engine import optim
  from deepintuit_jax.engine import state as train_state
  from deepintuit_jax.models.qwen2_5_vl import vision
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
  dt = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
  model = Qwen2_5_VL(cfg, RuntimeOptions(dtype=dt, param_dtype=jnp.float32, remat=remat,
                                         attention_impl=attention_impl), rngs=nnx.Rngs(0))
  ocfg = optim.OptimConfig(learning_rate=1e-5, warmup_ratio=0.0)
  tx = optim.make_optimizer(ocfg, 1000)
  graphdef, state = train_state.init_state(model, tx, (), 0)
  del model
  layout = vision.vision_layout(b["grid"], cfg.vision)
  batch = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
               loss_mask=b["loss_mask"], position_ids=b["position_ids"],
               pixel_values_videos=b["pixels"], video_layout=layout)
  step = sft.make_train_step(graphdef, tx, optim.schedule(ocfg, 1000), loss_chunk=loss_chunk)
  return step, state, batch, layout


def time_steps(step, state, micro: tuple, warmup: int, steps: int):
  """Mean seconds of `steps` calls `state, metrics = step(state, micro)` after `warmup`
  calls (compilation excluded when warmup >= 1); returns (seconds, state, metrics)."""
  import jax
  for _ in range(warmup):
    state, m = step(state, micro)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, micro)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps, state, m


def bench_jax(cfg, b, args) -> tuple[float, object]:
  step, state, batch, layout = build_jax(cfg, b, dtype=args.dtype, remat=args.remat,
                                         loss_chunk=args.loss_chunk)
  seconds, _, _ = time_steps(step, state, (batch,), args.warmup, args.steps)
  return seconds, layout


def bench_torch(cfg, b, args) -> float:
  import torch
  from transformers import Qwen2_5_VLConfig as HFConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  hf = HFConfig(**cfg.to_hf_dict())
  model = Qwen2_5_VLForConditionalGeneration(hf).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
  ids = torch.as_tensor(b["input_ids"], dtype=torch.long)
  labels = torch.full_like(ids, -100)
  sel = np.zeros_like(b["loss_mask"], bool)
  sel[:, 1:] = b["loss_mask"][:, :-1] > 0  # HF labels are target-aligned
  labels[torch.as_tensor(sel)] = ids[torch.as_tensor(sel)]
  kw = dict(input_ids=ids, attention_mask=torch.as_tensor(b["attention_mask"]), labels=labels,
            pixel_values_videos=torch.as_tensor(b["pixels"]),
            video_grid_thw=torch.as_tensor(b["grid"]))
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(dev)
  kw = {k: v.to(dev) for k, v in kw.items()}
  amp = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

  def step():
    with torch.autocast(dev, dtype=amp, enabled=args.dtype == "bfloat16"):
      loss = model(**kw).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
  for _ in range(args.warmup):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
  return (time.perf_counter() - t0) / args.steps


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="small", choices=sorted(SIZES))
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--side", type=int, default=224, help="frame side in pixels")
  ap.add_argument("--text", type=int, default=256, help="text tokens per sequence")
  ap.add_argument("--resp", type=int, default=128, help="loss tokens per sequence")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--remat", default="none")
  ap.add_argument("--loss_chunk", type=int, default=0,
                  help="tokens per cross-entropy chunk (train.loss_chunk); 0 = full logits")
  ap.add_argument("--peak_tflops", type=float, default=0.0)
  ap.add_argument("--skip_torch", action="store_true")
  args = ap.parse_args()
  cfg = model_config(args.size)
  b = make_batch(cfg, args.frames, args.side, args.text, args.resp, args.batch)
  tokens = b["input_ids"].size
  jax_s, layout = bench_jax(cfg, b, args)
  flops = model_flops(cfg, b, layout)
  peak, peak_src = peak_flops(args.dtype, args.peak_tflops)
  torch_s = None if args.skip_torch else bench_torch(cfg, b, args)
  print(f"config: size={args.size} frames={args.frames} side={args.side}px batch={args.batch} "
        f"tokens/step={tokens} (video tokens/seq {int((b['input_ids'][0] == cfg.video_token_id).sum())}, "
        f"patches {b['pixels'].shape[0]}) dtype={args.dtype}")
  print(f"model FLOPs/step {flops:.3e}; peak {peak / 1e12:.2f} TFLOP/s ({peak_src})")
  print(f"{'':14s}{'step s':>10s}{'tokens/s':>12s}{'MFU':>9s}")
  for name, s in (("deepintuit_jax", jax_s), ("transformers", torch_s)):
    if s is not None:
      print(f"{name:14s}{s:10.4f}{tokens / s:12.1f}{flops / s / peak:9.2%}")
  if torch_s is not None:
    print(f"speed ratio (transformers step time / ours): {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
