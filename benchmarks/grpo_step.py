"""One full GRPO iteration (rollout -> rewards -> old log-probs -> policy updates): time split
and tokens/s; optionally side by side with TRL's GRPOTrainer on the same workload.

    python benchmarks/grpo_step.py --size=tiny --prompts=4 --group=4 --new=64 --iters=3
    python benchmarks/grpo_step.py --size=3b --prompts=8 --group=8 --new=512 --frames=8
    python benchmarks/grpo_step.py --checkpoint=/tmp/x/hf --prompts=4 --group=4 --mini=2 \\
        --new=160 --temperature=0.7 --dtype=float32 --iters=5 --cores=1 \\
        --trl_python=/work/venv-trl/bin/python

Without `--checkpoint`: a random model (`--size`: `tiny`, the test model, or a preset such
as 3b / 7b with random weights) and random video prompts. With `--checkpoint=HF_DIR` (an
export of our SFT stage): the GRPO stage's own set-up (configs/grpo.py, the tiny recipe's
frame and pixel limits) on that export and the stage's first rollout batch of `--prompts`
training prompts of the generated benchmark (`--synthetic` training items), as the stage's
loader feeds them; every iteration reuses that batch.

`--trl_python=PY` (with `--checkpoint`) then runs benchmarks/trl_grpo_peer.py with that
Python (a separate environment with torch, transformers and trl; never this one's) on the
same export, prompts, group size, prompts per iteration and per optimizer step, response
length, temperature, optimizer settings and rewards (format + accuracy, re-implemented
there), and prints both sides per part with the ratio TRL / ours. TRL's GRPOTrainer feeds
Qwen2.5-VL images, not videos: the peer gets each clip as one image of the same vision
patches (the first frame of each temporal pair, side by side), so both sides see the same
prompt tokens and vision-token counts; ours keeps the video.

The first iteration compiles (sampler, old-logp pass, update step; TRL: its warm-up) and is
reported apart; the others are timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PARTS = ("iteration", "iteration_cpu", "rollout", "rewards", "logprobs", "update", "other")
PART_NAMES = {"iteration": "one iteration", "iteration_cpu": "one iteration, CPU time",
              "rollout": "rollout (generation)",
              "rewards": "rewards", "logprobs": "old log-probs", "update": "update",
              "other": "other"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny")
  p.add_argument("--layers", type=int, default=0, help="override the decoder depth")
  p.add_argument("--checkpoint", default="",
                 help="an HF export (our SFT stage's): the GRPO stage's set-up and the "
                      "generated benchmark's training prompts instead of random ones")
  p.add_argument("--synthetic", type=int, default=16,
                 help="training items of the generated benchmark (with --checkpoint)")
  p.add_argument("--prompts", type=int, default=4, help="prompts per rollout")
  p.add_argument("--group", type=int, default=4, help="G responses per prompt")
  p.add_argument("--mini", type=int, default=0, help="prompts per optimizer step (0 = all)")
  p.add_argument("--micro", type=int, default=0, help="prompts per accumulation pass")
  p.add_argument("--new", type=int, default=64, help="max response tokens")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--text", type=int, default=64, help="prompt text tokens (random prompts)")
  p.add_argument("--frames", type=int, default=4, help="frames (random prompts)")
  p.add_argument("--side", type=int, default=112, help="frame side, multiple of 28 (random)")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--remat", default="none")
  p.add_argument("--attention", default="",
                 help="attention_impl (models/qwen2_5_vl/attention.py; '' = auto: blockwise "
                      "on CPU)")
  p.add_argument("--length_buckets", default="",
                 help="comma-separated token lengths learner rows are padded to (with "
                      "--checkpoint; default: the pipeline's 256, 512, 1024, ...)")
  p.add_argument("--length_steps", type=int, default=0,
                 help="grpo.length_steps (with --checkpoint; 0 = the config's default; 1 = "
                      "learner rows padded to the length buckets themselves)")
  p.add_argument("--share_prompt", default="", choices=("", "on", "off"),
                 help="grpo.share_prompt (with --checkpoint; default: the config's, on)")
  p.add_argument("--cores", type=int, default=0,
                 help="run on this many CPU cores (affinity, set before jax starts and "
                      "inherited by the peer; 0 = all)")
  p.add_argument("--trl_python", default="",
                 help="a Python with torch, transformers and trl: also run TRL's GRPOTrainer")
  p.add_argument("--peer_dir", default="",
                 help="where the peer's workload goes (default: a temporary folder)")
  args = p.parse_args(argv)
  if args.trl_python and not args.checkpoint:
    p.error("--trl_python needs --checkpoint (both sides load the same export)")
  return args


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


@dataclasses.dataclass
class Workload:
  """What one benchmark run trains on: the learner, its state, one rollout batch of prompts,
  and (from an export) what the peer needs to feed the same prompts."""
  learner: object
  state: object
  batch: dict
  grpo: object
  optim: object = None
  tokenizer: object = None
  records: dict = dataclasses.field(default_factory=dict)
  options: object = None
  cleanup: object = None


def random_workload(args) -> Workload:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepintuit_jax.algorithms.grpo import learner as learner_lib
  from deepintuit_jax.engine import optim
  from deepintuit_jax.engine import state as train_state
  from deepintuit_jax.models import qwen2_5_vl, tiny
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

  cfg = tiny.tiny_config() if args.size == "tiny" else qwen2_5_vl.PRESETS[args.size]
  if args.layers:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
  opts = RuntimeOptions(dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32, remat=args.remat,
                        attention_impl=args.attention or None)
  model = Qwen2_5_VL(cfg, opts, rngs=nnx.Rngs(0))
  ocfg = optim.OptimConfig(learning_rate=1e-6, warmup_ratio=0.0)
  tx = optim.make_optimizer(ocfg, 1000)
  graphdef, state = train_state.init_state(model, tx, (), 0)
  del model
  gcfg = learner_lib.GRPOConfig(group_size=args.group, prompts_per_rollout=args.prompts,
                                mini_batch_prompts=args.mini or args.prompts,
                                micro_batch_prompts=args.micro,
                                max_response_tokens=args.new, temperature=args.temperature)
  rng = np.random.default_rng(0)
  batch, options = prompt_batch(cfg, rng, n=args.prompts, text=args.text, frames=args.frames,
                                side=args.side)
  learner = learner_lib.GRPOLearner(graphdef, tx, optim.schedule(ocfg, 1000), cfg=gcfg,
                                    tokenizer=tiny.build_tokenizer(), options=options,
                                    model_config=cfg, pad_id=0)
  return Workload(learner=learner, state=state, batch=batch, grpo=gcfg, optim=ocfg)


def export_workload(args) -> Workload:
  """The GRPO stage's set-up (configs/grpo.py, resolved by grpo_stage.from_config, loaded by
  stage.prepare / init_train_state) on the export, and its first rollout batch."""
  from configs import grpo as grpo_configs
  from deepintuit_jax.algorithms.grpo import learner as learner_lib
  from deepintuit_jax.core import sharding
  from deepintuit_jax.data import chat, pipeline
  from deepintuit_jax.engine import optim
  from deepintuit_jax.stages import grpo as grpo_stage, common as stage

  c = grpo_configs.get_config()
  c.init_from = args.checkpoint
  c.model.dtype, c.model.remat, c.model.attention_impl = args.dtype, args.remat, args.attention
  c.data.synthetic_train, c.data.synthetic_test = args.synthetic, 4
  c.data.eval_files = "none"
  c.train.warmup_steps = 0
  c.train.frozen = ""  # the whole model trains, vision included, as on TRL's side
  c.grpo.group_size, c.grpo.prompts_per_rollout = args.group, args.prompts
  c.grpo.mini_batch_prompts, c.grpo.micro_batch_prompts = args.mini or args.prompts, args.micro
  c.grpo.max_response_tokens, c.grpo.temperature = args.new, args.temperature
  c.grpo.rewards = "format:1.0,accuracy:1.0"  # the peer's (the release's) rewards
  if args.length_steps:
    c.grpo.length_steps = args.length_steps
  if args.share_prompt:
    c.grpo.share_prompt = args.share_prompt == "on"
  run = grpo_stage.from_config(c)
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  workdir = tempfile.mkdtemp(prefix="grpo_step_")
  setup = stage.prepare(seed=run.seed, init_from=run.init_from, model=run.model,
                        data=run.data, checkpoint=dataclasses.replace(run.checkpoint,
                                                                      async_save=False),
                        workdir=workdir, mesh=mesh)
  model_config = setup.model.config
  options = dataclasses.replace(setup.options, drop_remainder=True)
  if args.length_buckets:
    options = dataclasses.replace(options, length_buckets=tuple(
        int(b) for b in args.length_buckets.split(",")))
  loader = pipeline.make_train_loader(
      setup.records, tokenizer=setup.tokenizer, model_config=model_config, options=options,
      batch_size=args.prompts, num_epochs=None, ledger=setup.ledger, for_generation=True)
  batch = next(loader)
  loader.close()
  total = 1000
  tx = optim.make_optimizer(run.optim, total)
  graphdef, state, shardings, _ = stage.init_train_state(
      setup, tx, run.optim, seed=run.seed, init_from=run.init_from, mesh=mesh)
  learner = learner_lib.GRPOLearner(
      graphdef, tx, optim.schedule(run.optim, total), cfg=run.grpo, tokenizer=setup.tokenizer,
      options=options, model_config=model_config, pad_id=chat.pad_id(setup.tokenizer),
      mesh=mesh, state_sharding=shardings, groups=1)
  records = {r.item_id: r for r in setup.records}

  def cleanup():  # the stage's (empty) workdir
    import shutil
    setup.checkpointer.close()
    shutil.rmtree(workdir, ignore_errors=True)
  return Workload(learner=learner, state=state, batch=batch, grpo=run.grpo, optim=run.optim,
                  tokenizer=setup.tokenizer, records=records, options=options, cleanup=cleanup)


def clip_image(path: str, grid, options):
  """The clip as one uint8 RGB image of the same vision patches: the first frame of each
  temporal pair, resized as our preprocessing resizes it ([h*14, w*14], antialiased
  bicubic), side by side: grid (t, h, w) -> an image of grid (1, h, t*w)."""
  import numpy as np
  from deepintuit_jax.data import video
  clip = video.load_video(path, sampling=options.sampling, max_frames=options.max_frames,
                          fps=options.fps, min_frames=options.min_frames)
  t, h, w = (int(x) for x in grid)
  frames = video.resize_bicubic_aa(clip.frames, h * 14, w * 14)[0::2][:t]
  if len(frames) != t:
    raise ValueError(f"{path}: {len(frames)} frame pairs for a grid of {t}")
  return np.concatenate(list(frames), axis=1)


def write_peer_workload(work: Workload, args, out_dir: str) -> str:
  """workload.json + one PNG per prompt under out_dir, for benchmarks/trl_grpo_peer.py."""
  import cv2
  import numpy as np
  from deepintuit_jax.algorithms.grpo import loss as loss_lib
  from deepintuit_jax.data import annotations, chat

  os.makedirs(out_dir, exist_ok=True)
  b = work.batch
  ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"]).astype(bool)
  grids = np.asarray(b["video_grid_thw"]).reshape(-1, 3)
  prompts = []
  for i in range(args.prompts):
    rec = work.records[b["item_id"][i]]
    path = annotations.resolve_video_path(rec.video, work.options.video_root,
                                          item_id=rec.item_id)
    image = clip_image(path, grids[i], work.options)
    name = f"prompt_{i}.png"
    cv2.imwrite(os.path.join(out_dir, name), image[..., ::-1])
    prompts.append(dict(text=rec.prompt, label=b["labels"][i], item_id=rec.item_id,
                        image=name, image_hw=list(image.shape[:2]),
                        video_grid_thw=grids[i].tolist(),
                        prompt_ids=ids[i][mask[i]].tolist()))
  g, o = work.grpo, work.optim
  defaults = loss_lib.get(g.policy_loss)  # the loss's own clip defaults when None
  clip_low = g.clip_low if g.clip_low is not None else _default(defaults, "clip_low")
  clip_high = g.clip_high if g.clip_high is not None else _default(defaults, "clip_high")
  spec = dict(checkpoint=os.path.abspath(args.checkpoint), group=g.group_size,
              prompts_per_iteration=g.prompts_per_rollout,
              mini_batch_prompts=g.mini_batch_prompts, new=g.max_response_tokens,
              temperature=g.temperature, top_p=g.top_p, iters=args.iters, seed=0,
              dtype=args.dtype, learning_rate=o.learning_rate, weight_decay=o.weight_decay,
              b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip, clip_low=clip_low,
              clip_high=clip_high, stop_ids=chat.stop_ids(work.tokenizer),
              threads=len(os.sched_getaffinity(0)), prompts=prompts)
  path = os.path.join(out_dir, "workload.json")
  with open(path, "w") as f:
    json.dump(spec, f, indent=1)
  return path


def _default(fn, name: str) -> float:
  import inspect
  return float(inspect.signature(fn).parameters[name].default)


def run_peer(python: str, workload: str) -> dict:
  out = os.path.join(os.path.dirname(workload), "trl.json")
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env.pop("PYTHONPATH", None)
  cmd = [python, os.path.join(ROOT, "benchmarks", "trl_grpo_peer.py"),
         f"--workload={workload}", f"--out={out}"]
  print("running the peer:", " ".join(cmd), flush=True)
  subprocess.run(cmd, env=env, check=True)
  with open(out) as f:
    return json.load(f)


def iteration_parts(m: dict) -> dict:
  """One iteration's metrics -> the parts of PARTS (rollout without the rewards; other =
  what no part covers: advantages, metric gathering)."""
  return dict(iteration=m["iteration_time"], iteration_cpu=m["iteration_cpu_time"],
              rollout=m["rollout_time"] - m["reward_time"],
              rewards=m["reward_time"], logprobs=m["old_logp_time"], update=m["update_time"],
              other=m["iteration_time"] - m["rollout_time"] - m["old_logp_time"]
              - m["update_time"])


def header(args, jax_version: str, theirs: dict) -> str:
  v = theirs["versions"]
  steps = args.prompts // (args.mini or args.prompts)
  trl_dtype = "bf16 autocast" if args.dtype == "bfloat16" else "float32"
  return (f"GRPO iteration, ours (jax {jax_version}, {args.dtype} compute, video prompts) vs "
          f"TRL {v['trl']} GRPOTrainer (torch {v['torch']}, transformers {v['transformers']}, "
          f"{trl_dtype}, image prompts of the same patch count); {args.prompts} prompts x "
          f"G={args.group}, {steps} optimizer step(s) per iteration, up to {args.new} new "
          f"tokens, temperature {args.temperature}; seconds, median of the "
          f"{max(args.iters - 1, 1)} iteration(s) after the first:")


def side_by_side(ours: dict, theirs: dict) -> str:
  """The table of parts: ours s, TRL s, TRL / ours."""
  lines = ["| part | ours s | TRL s | TRL / ours |", "|---|---|---|---|"]
  for k in PARTS:
    a, b = ours[k], theirs[k]
    ratio = f"{b / a:.1f}x" if a > 0 and b > 0 else "-"
    lines.append(f"| {PART_NAMES[k]} | {a:.3f} | {b:.3f} | {ratio} |")
  return "\n".join(lines)


def pin_cores(n: int) -> list[int]:
  """Restricts this process (and what it starts later) to its first n allowed cores."""
  cores = sorted(os.sched_getaffinity(0))
  if n:
    if n > len(cores):
      raise ValueError(f"--cores={n}: only {len(cores)} core(s) available")
    cores = cores[:n]
    os.sched_setaffinity(0, cores)
  return cores


def main(argv=None) -> dict:
  args = parse_args(argv)
  if "jax" in sys.modules and args.cores:
    raise RuntimeError("--cores must take effect before jax is imported")
  cores = pin_cores(args.cores)
  import jax
  import numpy as np

  work = export_workload(args) if args.checkpoint else random_workload(args)
  learner, state = work.learner, work.state
  score, spent = learner._score, [0.0]

  def timed_score(ro):  # the rewards, inside the rollout time
    t0 = time.perf_counter()
    try:
      return score(ro)
    finally:
      spent[0] += time.perf_counter() - t0
  learner._score = timed_score
  batches, lengths = learner._micro_batches, []

  def sized(*a, **k):  # the padded learner length, for the report
    out = batches(*a, **k)
    mb = out[0]
    lengths.append((int(mb["input_ids"].shape[-1]),
                    int(mb["response_ids"].shape[-1]) if "response_ids" in mb else 0))
    return out
  learner._micro_batches = sized
  cpu = {"rollout": 0.0, "logprobs": 0.0}

  def cpu_timed(fn, part):  # this process's CPU time per part (the wall times are the loop's)
    def wrapped(*a, **k):
      c0 = time.process_time()
      try:
        return fn(*a, **k)
      finally:
        cpu[part] += time.process_time() - c0
    return wrapped
  learner._sample = cpu_timed(learner._sample, "rollout")
  learner._logprobs = cpu_timed(learner._logprobs, "logprobs")
  rows = []
  try:
    for it in range(args.iters):
      spent[0] = 0.0
      cpu.update(rollout=0.0, logprobs=0.0)
      t0, c0 = time.perf_counter(), time.process_time()
      state, m = learner.iteration(state, work.batch)
      m["iteration_time"] = time.perf_counter() - t0
      m["iteration_cpu_time"] = time.process_time() - c0
      m["reward_time"] = spent[0]
      m["rollout_cpu_time"], m["old_logp_cpu_time"] = cpu["rollout"], cpu["logprobs"]
      m["update_cpu_time"] = m["iteration_cpu_time"] - cpu["rollout"] - cpu["logprobs"]
      rows.append(m)
      print(f"iteration {it}{' (compiles)' if it == 0 else ''}: {m['iteration_time']:.2f}s = "
            f"rollout {m['rollout_time']:.2f}s (rewards {m['reward_time']:.3f}s) + old-logp "
            f"{m['old_logp_time']:.2f}s + update {m['update_time']:.2f}s; response length "
            f"{m['response_length_mean']:.1f}; rollout {m['rollout_tokens_per_second']:.0f} "
            f"tok/s, update {m['update_tokens_per_second']:.0f} tok/s; CPU time "
            f"{m['iteration_cpu_time']:.2f}s = rollout {m['rollout_cpu_time']:.2f}s + old-logp "
            f"{m['old_logp_cpu_time']:.2f}s + update and the rest "
            f"{m['update_cpu_time']:.2f}s", flush=True)
  finally:
    if work.cleanup:
      work.cleanup()
  timed = rows[1:] or rows
  out = {k: float(np.mean([r[k] for r in timed])) for k in (
      "iteration_time", "rollout_time", "reward_time", "old_logp_time", "update_time",
      "rollout_tokens_per_second", "update_tokens_per_second", "response_length_mean",
      "reward_mean", "iteration_cpu_time", "rollout_cpu_time", "old_logp_cpu_time",
      "update_cpu_time")}
  out["padded_length"] = max(t for t, _ in lengths) if lengths else 0
  out["padded_response_length"] = max(r for _, r in lengths) if lengths else 0
  out["cores"] = len(cores)
  print(f"{args.checkpoint or args.size}, {args.prompts} prompts x G={args.group}, up to "
        f"{args.new} new tokens, {jax.device_count()} {jax.devices()[0].platform} device(s): "
        f"mean of {len(timed)} iteration(s): {out}")
  out["iterations"] = [iteration_parts(r) for r in rows]
  out["median"] = {k: float(np.median([p[k] for p in out["iterations"][1:] or
                                       out["iterations"]])) for k in PARTS}
  if args.checkpoint:
    peer_dir = args.peer_dir or tempfile.mkdtemp(prefix="grpo_peer_")
    workload = write_peer_workload(work, args, peer_dir)
    if args.trl_python:
      theirs = run_peer(args.trl_python, workload)
      out["trl"] = theirs
      print("\n" + header(args, jax.__version__, theirs))
      print(side_by_side(out["median"], theirs["median"]))
      ours = (f"each prompt once, padded to {out['padded_length']} tokens, under its "
              f"{args.group} responses padded to {out['padded_response_length']}"
              if out["padded_response_length"] else
              f"prompt ++ response rows padded to {out['padded_length']} tokens")
      print(f"cores: {out['cores']} (torch threads {theirs['torch_threads']}, attention "
            f"{theirs['attention']}); learner batches: ours {ours} (length grid); TRL "
            f"prompt ++ response rows padded to {theirs['padded_length']} (longest row)")
      print(f"response length mean: ours {out['response_length_mean']:.1f}, TRL "
            f"{theirs['response_length_mean']:.1f}; reward mean: ours {out['reward_mean']:.2f}, "
            f"TRL {theirs['reward_mean']:.2f}; prompts tokenised alike: "
            f"{theirs['same_prompts']}; TRL old log-prob pass: {theirs['old_logprobs_pass']}")
  return out


if __name__ == "__main__":
  main()
