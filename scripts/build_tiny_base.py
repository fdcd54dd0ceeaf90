"""Builds the tiny base: pretrains a tiny Qwen2.5-VL on the described-clips corpus.

    python scripts/build_tiny_base.py --out deepintuit_jax/assets/tiny_base [--seed 0]
        [--num_clips 4000] [--steps 750] [--batch 8] [--lr 3e-3] [--corpus DIR]

Steps: generate the corpus (`tools/tiny_base_corpus.py`) into --corpus (default: a folder in
the cache, reused when complete); write a random HF checkpoint of `tiny_base.base_config()`
with the tiny tokenizer (`tiny.write_tiny_checkpoint`); train it with the SFT pieces
(`pipeline.make_train_loader`, `state.init_state`, `sft.make_train_step`,
`optim.make_optimizer`: next-token loss on the answers given the video, everything
trainable); measure it on the held-out clips (teacher-forced answer accuracy per request);
write the HF directory (bf16 safetensors + tokenizer + configs) and `build_info.json`.
Deterministic for a seed on one machine (same data order, same init, same steps).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepintuit_jax.data import annotations, pipeline  # noqa: E402
from deepintuit_jax.models import tiny, tiny_base  # noqa: E402
from tools import tiny_base_corpus as pretrain_corpus  # noqa: E402

FRAMES, MAX_PIXELS = 8, 64 * 28 * 28  # as the embedded default's SFT (configs/sft.py)
HELDOUT_TOWER_REQUEST = "direction"  # one record per held-out clip for the tower's measure


def corpus(path: str, *, seed: int, num_clips: int, num_heldout: int) -> str:
  """The corpus folder (generated once: a temporary folder renamed into place)."""
  if os.path.isfile(os.path.join(path, "info.json")):
    with open(os.path.join(path, "info.json")) as f:
      info = json.load(f)
    if (info["version"], info["seed"], info["num_clips"], info["num_heldout"]) == (
        pretrain_corpus.VERSION, seed, num_clips, num_heldout):
      return path
    raise ValueError(f"{path}: a corpus of other settings ({info['num_clips']} clips, seed "
                     f"{info['seed']}); pass another --corpus")
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  pretrain_corpus.generate(tmp, seed=seed, num_clips=num_clips, num_heldout=num_heldout)
  os.replace(tmp, path)
  return path


def heldout_eval(graphdef, state, records, *, tokenizer, model_config, options, batch=8):
  """Teacher-forced answers on held-out clips: {request: (token accuracy, exact match)}."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepintuit_jax.algorithms import sft
  from deepintuit_jax.engine import logprobs

  @jax.jit
  def correct(params, frozen, rest, b):
    model = nnx.merge(graphdef, params, frozen, rest)
    logits = model(**logprobs.model_inputs(b)).logits
    hit = jnp.argmax(logits[:, :-1], -1) == b["input_ids"][:, 1:]
    return hit, b["loss_mask"][:, :-1]

  by_req = collections.defaultdict(lambda: [0, 0, 0, 0])  # tokens hit, tokens, exact, n
  it = pipeline.make_eval_batches(records, tokenizer=tokenizer, model_config=model_config,
                                  options=options, batch_size=batch, for_generation=False)
  req_of = {r.item_id: r.extra["synthetic"]["request"] for r in records}
  for b in it:
    feed = {k: v for k, v in sft.device_batch(b).items()}
    hit, mask = jax.device_get(correct(state.params, state.frozen, state.rest, feed))
    for i, item in enumerate(b["item_id"]):
      if not item:
        continue
      m = mask[i].astype(bool)
      s = by_req[req_of[item]]
      s[0] += int(hit[i][m].sum())
      s[1] += int(m.sum())
      s[2] += int(hit[i][m].all())
      s[3] += 1
  return {k: dict(token_acc=v[0] / max(v[1], 1), exact=v[2] / max(v[3], 1), n=v[3])
          for k, v in sorted(by_req.items())}


def vision_stats(model, records, *, tokenizer, options, n: int = 8) -> dict:
  """How much the merged vision tokens differ from each other: the norm of their mean
  vector against the mean over dims of their std (across the tokens of `n` clips). A mean
  far above the spread means every video token looks alike to the decoder (in bf16 the
  spread is then near rounding level): the tower has collapsed to a constant."""
  import jax.numpy as jnp
  b = next(iter(pipeline.make_eval_batches(records[:n], tokenizer=tokenizer,
                                           model_config=model.config, options=options,
                                           batch_size=n, for_generation=False)))
  feats = np.asarray(model.visual(jnp.asarray(b["pixel_values_videos"]), b["video_layout"]),
                     np.float32)[np.asarray(b["video_layout"].merged_valid).astype(bool)]
  return dict(mean_norm=float(np.linalg.norm(feats.mean(0))),
              token_std=float(feats.std(0).mean()),
              token_norm=float(np.linalg.norm(feats, axis=1).mean()))


def build(out: str, *, seed: int = 0, num_clips: int = 4000, num_heldout: int = 180,
          steps: int = 750, batch: int = 8, lr: float = 3e-3, corpus_dir: str = "",
          config=None, min_pixels: int = 3136, eval_every: int = 0,
          compute_dtype: str = "bfloat16", dtype: str = "bfloat16", tower_steps: int = 2500,
          tower_clips: int = 4000, tower_batch: int = 16, tower_lr: float = 1e-3,
          frozen: str = r"^visual\.") -> dict:
  """Pretrains and writes the HF directory `out`; returns build_info (also in the dir)."""
  import jax
  import jax.numpy as jnp
  from deepintuit_jax.algorithms import sft
  from deepintuit_jax.core import sharding
  from deepintuit_jax.engine import loop, optim
  from deepintuit_jax.engine import state as train_state
  from deepintuit_jax.models import qwen2_5_vl
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions

  t0 = time.time()
  corpus_dir = corpus_dir or os.path.join(
      os.path.expanduser(os.environ.get("DEEPINTUIT_CACHE", "") or "~/.cache/deepintuit_jax"),
      f"pretrain_corpus_v{pretrain_corpus.VERSION}_s{seed}_{num_clips}_{num_heldout}")
  root = corpus(corpus_dir, seed=seed, num_clips=num_clips, num_heldout=num_heldout)
  t_corpus = time.time() - t0
  config = config or tiny_base.base_config()
  init_dir = tempfile.mkdtemp(prefix="tiny_base_init_")
  tiny.write_tiny_checkpoint(init_dir, seed=seed, config=config)
  tokenizer = tiny.build_tokenizer(seed=0)
  # One device: the model is a few MB, and data parallelism over host devices only adds
  # compile time.
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  opts = RuntimeOptions(dtype=getattr(jnp, compute_dtype), param_dtype=jnp.float32)
  model = qwen2_5_vl.from_pretrained(init_dir, mesh=mesh, opts=opts)
  records = annotations.load_records(os.path.join(root, "corpus.json"))
  heldout = annotations.load_records(os.path.join(root, "heldout.json"))
  options = pipeline.PipelineOptions(video_root=root, max_frames=FRAMES, max_pixels=MAX_PIXELS,
                                     min_pixels=min_pixels, seed=seed,
                                     length_buckets=(64, 96, 128, 192, 256))
  tower = None
  if tower_steps:
    # The tower stage computes in float32 (what was measured to learn motion; the subtle
    # 2-frame differences of a token are the target), then hands `visual.*` to the model.
    from flax import nnx
    model32 = qwen2_5_vl.from_pretrained(
        init_dir, mesh=mesh, opts=RuntimeOptions(dtype=jnp.float32, param_dtype=jnp.float32))
    tower = pretrain_tower(model32, records[:tower_clips], heldout, root, options, seed=seed,
                           steps=tower_steps, batch=tower_batch, lr=tower_lr)
    nnx.update(model.visual, nnx.state(model32.visual, nnx.Param))
    tower["compute_dtype"] = "float32"
    del model32
  groups = sharding.local_data_groups(mesh)
  if batch % groups:
    groups = 1
  loader = pipeline.make_train_loader(records, tokenizer=tokenizer, model_config=model.config,
                                      options=options, batch_size=batch, groups=groups)
  ocfg = optim.OptimConfig(learning_rate=lr, warmup_ratio=0.05, weight_decay=0.01)
  tx = optim.make_optimizer(ocfg, steps)
  graphdef, state = train_state.init_state(model, tx, tuple(p for p in frozen.split(",") if p),
                                           seed)
  model_config = model.config
  del model
  shardings = train_state.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step_fn = sft.make_train_step(graphdef, tx, optim.schedule(ocfg, steps), mesh=mesh,
                                state_sharding=shardings)

  def batches():
    while True:
      yield (step_fn.place(sft.device_batch(next(loader))),), 0, None

  evals, losses = [], []
  feed = loop.Prefetcher(batches(), size=2)
  t1 = time.time()
  try:
    for step in range(1, steps + 1):
      state, m = step_fn(state, next(feed)[0])
      if not bool(m["ok"]):
        raise FloatingPointError(f"non-finite loss at step {step}")
      losses.append(float(m["loss"]))
      if step % 25 == 0 or step == steps:
        print(f"step {step}/{steps} loss {np.mean(losses[-25:]):.4f} "
              f"({(time.time() - t1) / step:.2f}s/step)", flush=True)
      if eval_every and step % eval_every == 0 and step < steps:
        evals.append(dict(step=step, **_eval_row(graphdef, state, heldout, tokenizer,
                                                 model_config, options)))
  finally:
    feed.close()
    loader.close()
  t_train = time.time() - t1
  evals.append(dict(step=steps, **_eval_row(graphdef, state, heldout, tokenizer, model_config,
                                            options)))
  model = train_state.trainable_model(graphdef, state)
  stats = vision_stats(model, heldout, tokenizer=tokenizer, options=options)
  print(f"vision tokens: mean-vector norm {stats['mean_norm']:.2f}, per-dim std across tokens "
        f"{stats['token_std']:.3f}", flush=True)
  tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  qwen2_5_vl.save_pretrained(model, tmp, dtype=getattr(jnp, dtype), source_dir=init_dir)
  info = dict(seed=seed, corpus=dict(version=pretrain_corpus.VERSION, num_clips=num_clips,
                                     num_heldout=num_heldout, pools=pretrain_corpus.POOLS,
                                     motions=list(pretrain_corpus.MOTIONS)),
              tower=tower, frozen=frozen,
              steps=steps, batch=batch, lr=lr, min_pixels=min_pixels, frames=FRAMES,
              max_pixels=MAX_PIXELS, dtype=dtype, compute_dtype=compute_dtype,
              final_loss=float(np.mean(losses[-25:])), heldout=evals, vision_tokens=stats,
              seconds=dict(corpus=round(t_corpus, 1), train=round(t_train, 1),
                           total=round(time.time() - t0, 1)))
  with open(os.path.join(tmp, "build_info.json"), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write("\n")
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  shutil.rmtree(init_dir, ignore_errors=True)
  return info


def pretrain_tower(model, records, heldout, root, options, *, seed, steps, batch, lr) -> dict:
  """Stage 1: `visual.*` alone on the dense per-token targets (tools/tiny_base_tower.py),
  updated in place; returns its build_info entry (held-out per-token accuracies)."""
  from tools import tiny_base_tower as tower_pretrain
  t = time.time()
  vcfg = model.config.vision
  one = [r for r in heldout if r.extra["synthetic"]["request"] == HELDOUT_TOWER_REQUEST]
  data = tower_pretrain.TowerData.load(records, root, options, vcfg)
  held = tower_pretrain.TowerData.load(one, root, options, vcfg)
  t_load = time.time() - t
  print(f"tower: {len(data)} clips loaded in {t_load:.0f}s", flush=True)
  r = tower_pretrain.train(model.visual, data, steps=steps, batch=batch, lr=lr, seed=seed,
                           heldout=held, log_every=50)
  r.pop("head")
  print(f"tower held-out: {r['heldout']}", flush=True)
  return dict(r, clips=len(data), heldout_clips=len(held), load_seconds=round(t_load, 1))


def _eval_row(graphdef, state, heldout, tokenizer, model_config, options) -> dict:
  t = time.time()
  r = heldout_eval(graphdef, state, heldout, tokenizer=tokenizer, model_config=model_config,
                   options=options)
  print("heldout " + ", ".join(f"{k}: tok {v['token_acc']:.3f} exact {v['exact']:.3f}"
                               for k, v in r.items()) + f" ({time.time() - t:.0f}s)", flush=True)
  return r


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="the HF directory to write")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num_clips", type=int, default=4000)
  ap.add_argument("--num_heldout", type=int, default=180)
  ap.add_argument("--steps", type=int, default=750)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--min_pixels", type=int, default=3136)
  ap.add_argument("--eval_every", type=int, default=0)
  ap.add_argument("--compute_dtype", default="bfloat16", help="bfloat16 | float32")
  ap.add_argument("--corpus", default="", help="corpus folder (default: in the cache)")
  ap.add_argument("--tower_steps", type=int, default=2500, help="0 = no tower pretraining")
  ap.add_argument("--tower_clips", type=int, default=4000)
  ap.add_argument("--tower_batch", type=int, default=16)
  ap.add_argument("--tower_lr", type=float, default=1e-3,
                  help="5e-3 learns colour and presence but never motion (measured)")
  ap.add_argument("--frozen", default=r"^visual\.",
                  help="regexes frozen in the VLM stage ('' = everything trainable)")
  ap.add_argument("--config", default="base", help="base | tiny (tiny.tiny_config)")
  a = ap.parse_args(argv)
  config = tiny_base.base_config() if a.config == "base" else tiny.tiny_config()
  info = build(a.out, seed=a.seed, num_clips=a.num_clips, num_heldout=a.num_heldout,
               steps=a.steps, batch=a.batch, lr=a.lr, corpus_dir=a.corpus, config=config,
               min_pixels=a.min_pixels, eval_every=a.eval_every,
               compute_dtype=a.compute_dtype, tower_steps=a.tower_steps,
               tower_clips=a.tower_clips, tower_batch=a.tower_batch, tower_lr=a.tower_lr,
               frozen=a.frozen)
  print(json.dumps({k: info[k] for k in ("final_loss", "seconds")}))


if __name__ == "__main__":
  main()
