"""One full GRPO iteration (rollout -> rewards -> old log-probs -> policy updates): time split
and tokens/s, on a random model and random video prompts (no data, no weights needed).

    python benchmarks/grpo_step.py --size=tiny --prompts=4 --group=4 --new=64 --iters=3
    python benchmarks/grpo_step.py --size=3b --prompts=8 --group=8 --new=512 --frames=8

The first iteration compiles (sampler, old-logp pass, update step) and is reported apart;
the others are timed. `--size` is `tiny` (the test model) or a preset (3b, 7b, ...; random
weights, bf16 compute, fp32 master weights; needs an accelerator's memory).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny")
  p.add_argument("--layers", type=int, default=0, help="override the decoder depth")
  p.add_argument("--prompts", type=int, default=4, help="prompts per rollout")
  p.add_argument("--group", type=int, default=4, help="G responses per prompt")
  p.add_argument("--mini", type=int, default=0, help="prompts per optimizer step (0 = all)")
  p.add_argument("--micro", type=int, default=0, help="prompts per accumulation pass")
  p.add_argument("--new", type=int, default=64, help="max response tokens")
  p.add_argument("--text", type=int, default=64, help="prompt text tokens")
  p.add_argument("--frames", type=int, default=4)
  p.add_argument("--side", type=int, default=112, help="frame side (multiple of 28)")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--remat", default="none")
  return p.parse_args(argv)


def prompt_batch(cfg, rng, *, n: int, text: int, frames: int, side: int):
  """n generation prompts, each `text` random tokens around one random video."""
  import numpy as np
  from deepintuit_jax.data import batching
  from deepintuit_jax.data.examples import PipelineOptions
  g = side // 14
  grid = np.array([[max(frames // 2, 1), g, g]], np.int32)
  n_video = int(grid.prod()) // 4
  examples = []
  for i in range(n):
    ids = np.concatenate([rng.integers(10, 900, text // 2), [cfg.vision_start_token_id],
                          np.full(n_video, cfg.video_token_id), [cfg.vision_end_token_id],
                          rng.integers(10, 900, text - text // 2)]).astype(np.int32)
    examples.append(dict(input_ids=ids, loss_mask=np.zeros(len(ids), np.int32),
                         video_grid_thw=grid, second_per_grid_ts=np.ones(1, np.float32),
                         pixel_values_videos=rng.normal(size=(int(grid.prod()),
                                                              cfg.vision.patch_dim)
                                                        ).astype(np.float32),
                         label="normal", item_id=f"p{i}"))
  options = PipelineOptions(max_pixels=side * side, min_pixels=28 * 28, max_seq_len=1 << 16)
  return batching.collate(examples, batch_size=n, options=options, model_config=cfg,
                          pad_id=0), options


def main(argv=None) -> dict:
  args = parse_args(argv)
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepintuit_jax.models import qwen2_5_vl, testing
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
  from deepintuit_jax.trainers import optim
  from deepintuit_jax.trainers import state as train_state
  from deepintuit_jax.trainers.grpo import learner as learner_lib

  cfg = testing.tiny_config() if args.size == "tiny" else qwen2_5_vl.PRESETS[args.size]
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
  opts = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat)
  model = Qwen2_5_VL(cfg, opts, rngs=nnx.Rngs(0))
  ocfg = optim.OptimConfig(learning_rate=1e-6, warmup_ratio=0.0)
  tx = optim.make_optimizer(ocfg, 1000)
  graphdef, state = train_state.init_state(model, tx, (), 0)
  del model
  gcfg = learner_lib.GRPOConfig(group_size=args.group, prompts_per_rollout=args.prompts,
                                mini_batch_prompts=args.mini or args.prompts,
                                micro_batch_prompts=args.micro,
                                max_response_tokens=args.new)
  rng = np.random.default_rng(0)
  batch, options = prompt_batch(cfg, rng, n=args.prompts, text=args.text, frames=args.frames,
                                side=args.side)
  learner = learner_lib.GRPOLearner(graphdef, tx, optim.schedule(ocfg, 1000), cfg=gcfg,
                                    tokenizer=testing.build_tokenizer(), options=options,
                                    model_config=cfg, pad_id=0)
  rows = []
  for it in range(args.iters):
    t0 = time.perf_counter()
    state, m = learner.iteration(state, batch)
    m["iteration_time"] = time.perf_counter() - t0
    rows.append(m)
    print(f"iteration {it}{' (compiles)' if it == 0 else ''}: {m['iteration_time']:.2f}s = "
          f"rollout {m['rollout_time']:.2f}s + old-logp {m['old_logp_time']:.2f}s + update "
          f"{m['update_time']:.2f}s; response length {m['response_length_mean']:.1f}; "
          f"rollout {m['rollout_tokens_per_second']:.0f} tok/s, update "
          f"{m['update_tokens_per_second']:.0f} tok/s", flush=True)
  timed = rows[1:] or rows
  out = {k: float(np.mean([r[k] for r in timed])) for k in (
      "iteration_time", "rollout_time", "old_logp_time", "update_time",
      "rollout_tokens_per_second", "update_tokens_per_second", "response_length_mean")}
  print(f"{args.size}, {args.prompts} prompts x G={args.group}, up to {args.new} new tokens, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s): mean of "
        f"{len(timed)} iteration(s): {out}")
  return out


if __name__ == "__main__":
  main()
