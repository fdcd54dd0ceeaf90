"""The whole chain (configs/deepintuit.py): each step is a registered stage run in its own
sub-workdir, in one process; the steps hand over through their HF exports and workdirs.

Handover (`step_config`): grpo starts from sft/hf; traces, calibrate and calibrate_hidden
from the policy (grpo/hf, or sft/hf when GRPO is not run); calibrate* read traces/; infer
evaluates the policy, its calibrators and (when GRPO ran) SFT alone. The chain evaluates
every model once, in `infer`: the SFT and GRPO steps run without their own eval. Any other
step (e.g. the imitation baseline) gets only the shared keys; if it writes an
`eval_report.json` (evals.report), its models join the results table.

Resume: a finished step leaves `<step>/stage_done.json` and is never rerun; the step a kill
interrupted resumes from its own state (checkpoints, trace files) when the chain is rerun.
One run per workdir: `main` holds the root's lease, and each step's own while it runs, so a
second run in the chain or in one of its steps' workdirs is refused (`deepintuit_jax.core.lease`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import jax

from deepintuit_jax.core import interrupts, lease
from deepintuit_jax.core import paths as paths_lib, recipes
from deepintuit_jax.evals import curves
from deepintuit_jax.evals import results as results_lib
from deepintuit_jax.stages import preflight

DONE = "stage_done.json"
SHARED_TOP = ("seed", "recipe")
CALIBRATOR_NAMES = {"label_token": "label token", "hidden_state": "hidden-state head"}
# Data keys copied from the chain into every step that has them (train files stay per step).
SHARED_DATA_KEYS = ("eval_files", "class_file", "video_root", "on_bad_sample", "max_frames",
                    "max_pixels", "min_pixels", "max_seq_len", "sampling", "num_workers",
                    "prefetch_steps", "special_tokens", "synthetic_train", "synthetic_test")


def _stage_of(sub) -> str:
  return sub.stage


def plan(c, stages: Mapping[str, Callable]) -> list[str]:
  """The steps that run: named in `c.steps`, with a config and a registered stage."""
  out = []
  for name in filter(None, (s.strip() for s in c.steps.split(","))):
    if name not in c:
      raise ValueError(f"chain step {name!r} has no config (known: {_known(c)})")
    if _stage_of(c[name]) not in stages:
      print(f"[chain] skipping step {name!r}: stage {_stage_of(c[name])!r} is not registered "
            f"(registered: {sorted(stages)})", flush=True)
      continue
    out.append(name)
  return out


def _known(c) -> list[str]:
  return [k for k in c.keys() if hasattr(c[k], "stage")]


def step_config(c, name: str, steps: list[str], workdir: str):
  """The step's ConfigDict with the chain's shared keys and the handovers set."""
  sub = c[name].copy_and_resolve_references()
  d = lambda step, *rest: os.path.join(workdir, step, *rest)
  policy = d("grpo", "hf") if "grpo" in steps else d("sft", "hf")
  with sub.unlocked():
    for k in SHARED_TOP:
      if k in sub:
        sub[k] = c[k]
    for k in ("model", "mesh"):
      if k in sub:
        sub[k] = c[k].copy_and_resolve_references()
    if "data" in sub:
      for k in SHARED_DATA_KEYS:
        if k in sub.data:
          sub.data[k] = c.data[k]
    stage = sub.stage
    if stage in ("sft", "grpo"):
      sub.data.eval_files = "none"  # evaluated once, by the infer step
    if stage == "grpo":
      sub.init_from = d("sft", "hf")
    elif stage in ("traces", "calibrate"):
      sub.init_from = policy
      if stage == "calibrate":
        sub.traces = d("traces")
    elif stage == "infer":
      sub.infer.policy = policy
      sub.infer.policy_name = "SFT + GRPO" if "grpo" in steps else "SFT"
      sub.infer.baselines = f"SFT={d('sft', 'hf')}" if "grpo" in steps else ""
      cals = [(CALIBRATOR_NAMES[c[s].calibrate.head], d(s)) for s in steps
              if c[s].stage == "calibrate"]
      sub.infer.calibrators = ",".join(f"{n}={p}" for n, p in cals)
  sub = recipes.resolve(sub)  # the numbers the step runs, as its run_config.json records
  sub.lock()
  return sub


def from_config(c):
  """The chain keeps the (locked, copied) ConfigDict: each step's own `from_config` turns
  its sub-config into dataclasses when the step starts (a step may only be resolvable once
  the one before it has run, e.g. its init_from must exist)."""
  for key in ("close_split", "open_split"):
    if not c[key]:
      raise ValueError(f"config.{key} is empty: name the eval split of that results column")
  if c.data.train_file:  # each step trains on its own split; one shared file would be ignored
    raise ValueError(f"config.data.train_file={c.data.train_file!r}: the chain's steps train "
                     "on their own files; set --config.<step>.data.train_file (sft, grpo, "
                     "traces, ...) instead")
  return c.copy_and_resolve_references()


def run(c, *, workdir: str, mesh, stages: Mapping[str, Callable]) -> dict[str, Any]:
  """Runs the steps in order (skipping finished ones), then writes results.md / .json."""
  steps = plan(c, stages)
  is_main = jax.process_index() == 0
  print(f"[chain] steps: {', '.join(steps)} in {workdir}", flush=True)
  t_chain = time.perf_counter()
  for name in steps:
    sub_dir = os.path.join(workdir, name)
    done = os.path.join(sub_dir, DONE)
    if paths_lib.isfile(done):
      print(f"[chain] step {name}: finished before, skipped ({done})", flush=True)
      continue
    sub = step_config(c, name, steps, workdir)
    stage = stages[sub.stage]()
    print(f"[chain] step {name} (stage {sub.stage}) in {sub_dir}", flush=True)
    t0 = time.perf_counter()
    preflight.check_config(sub)  # the checks main runs on a stage's own config
    cfg = stage.from_config(sub)
    paths_lib.makedirs(sub_dir)
    # The step's own lease (the chain holds its root's too): a run started by hand in the
    # step's workdir meanwhile is refused, and none is overwritten by this one.
    with lease.Lease(sub_dir, enabled=is_main):
      if is_main:
        paths_lib.write_json(os.path.join(sub_dir, "run_config.json"), sub.to_dict(), indent=2,
                             sort_keys=True, default=str)
        paths_lib.write_text(os.path.join(sub_dir, "resolved_config.txt"), repr(cfg) + "\n")
      stage.run(cfg, workdir=sub_dir, mesh=mesh)
    seconds = time.perf_counter() - t0
    if is_main:
      paths_lib.write_json(done, {"step": name, "stage": sub.stage, "seconds": seconds,
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1)
    interrupts.kill_point(f"chain step {name} done ({done})")
    print(f"[chain] step {name} done in {seconds:.0f} s", flush=True)
  reports = results_lib.collect_reports(workdir, steps)
  rows = results_lib.results_rows(reports, close=c.close_split, open_=c.open_split)
  if is_main:
    grpo_runs = {curves.run_name(c[s].grpo.control): os.path.join(workdir, s, "metrics.jsonl")
                 for s in steps if c[s].stage == "grpo"}
    summary = curves.write_reward_curves(workdir, grpo_runs)
    paths = results_lib.write_results(
        workdir, rows, close=c.close_split, open_=c.open_split,
        sections={"grpo_rewards": (curves.markdown(summary), summary["runs"])})
    print(paths_lib.read_text(paths["markdown"]), flush=True)
    print(f"[chain] finished in {time.perf_counter() - t_chain:.0f} s this run; results in "
          f"{paths['markdown']}", flush=True)
  return {"rows": rows}
