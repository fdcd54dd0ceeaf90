"""Two processes on localhost (CPU, 2 devices each, gloo collectives) run the SFT pulse
through `python -m deepintuit_jax.main` with an explicit coordinator: the same per-step
losses as one process with 4 devices (the same global batches), one checkpoint set, an eval
over every item of each split, and a rerun that finds the run finished. Then the same for
the GRPO pulse, started from the 1-process SFT run's checkpoint: each process rolls out
its own prompts, and the rewards, response lengths and losses equal the 1-process run's."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The pulse at tiny sizes: a global batch of 4 (one row per device), 3 eval items per split
# (odd, so a per-process shard of them could not reach n = 3).
ARGS = ["--config=configs/sft.py:pulse", "--config.train.batch_size=4",
        "--config.data.max_frames=4", "--config.data.max_pixels=12544",
        "--config.eval.batch_size=4", "--config.data.synthetic_test=3",
        "--config.checkpoint.export=False"]
TIMEOUT = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _devices(env: dict, n: int) -> dict:
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  return dict(env, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The GRPO pulse: 4 prompts x G = 2 per rollout (one prompt per device), 2 optimizer steps
# per rollout (mini-batches of 2 prompts), 2 rollouts; responses of up to 8 tokens. The
# little-trained tiny model earns no reward (zero advantages): the entropy bonus gives the
# update a gradient, so the second rollout tests the updated parameters too.
GRPO_ARGS = ["--config=configs/grpo.py:pulse", "--config.train.num_steps=4",
             "--config.grpo.group_size=2", "--config.grpo.prompts_per_rollout=4",
             "--config.grpo.mini_batch_prompts=2", "--config.grpo.max_response_tokens=8",
             "--config.grpo.entropy_coef=0.01",
             "--config.data.max_frames=4", "--config.data.max_pixels=12544",
             "--config.eval.batch_size=4", "--config.data.synthetic_test=3",
             "--config.checkpoint.export=False"]


def _cmd(workdir: str, args=ARGS) -> list[str]:
  return [sys.executable, "-m", "deepintuit_jax.main", f"--workdir={workdir}", *args]


def _check(p, out: str, err: str, what: str) -> None:
  if p.returncode:
    raise AssertionError(f"{what} failed ({p.returncode}):\n{out[-3000:]}\n{err[-5000:]}")


def run_one(env, workdir: str, args=ARGS) -> str:
  p = subprocess.run(_cmd(workdir, args), cwd=REPO, env=_devices(env, 4), capture_output=True,
                     text=True, timeout=TIMEOUT)
  _check(p, p.stdout, p.stderr, "1-process run")
  return p.stdout


def run_two(env, workdir: str, args=ARGS) -> list[str]:
  """Both processes of a 2-process run (2 CPU devices each); returns their stdouts."""
  port, procs = _free_port(), []
  for i in range(2):
    e = dict(_devices(env, 2), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(_cmd(workdir, args), cwd=REPO, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=TIMEOUT)
      _check(p, out, err, f"process {i}")
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  one, two = str(root / "one"), str(root / "two")
  run_one(env, one)  # also builds the cached tiny model and benchmark for the two processes
  run_two(env, two)
  return one, two


def test_two_processes_train_as_one(runs):
  one, two = runs
  ref = {r["step"]: r for r in _rows(one) if "loss" in r}
  got = {r["step"]: r for r in _rows(two) if "loss" in r}
  assert sorted(ref) == sorted(got) == [1, 2, 3]  # one row per step: only process 0 writes
  for step in ref:
    assert got[step]["tokens"] == ref[step]["tokens"], step  # the same global batch
    np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-5, err_msg=step)
    np.testing.assert_allclose(got[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-4)


def test_one_checkpoint_set(runs):
  _, two = runs
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "3", "model_source.json"]  # keep 2
  for step in ("2", "3"):
    items = sorted(os.listdir(os.path.join(two, "checkpoints", step)))
    assert {"params", "opt", "meta", "data"} <= set(items), items


def test_eval_covers_every_process_items(runs):
  one, two = runs
  evals = {r["split"]: r for r in _rows(two) if "split" in r}
  assert set(evals) == {"test_close", "test_open"}
  for name, r in evals.items():
    assert r["n"] == 3, (name, r["n"])
    with open(os.path.join(two, f"predictions_{name}_step3.jsonl")) as f:
      preds = [json.loads(line) for line in f]
    with open(os.path.join(one, f"predictions_{name}_step3.jsonl")) as f:
      ref = [json.loads(line) for line in f]
    assert sorted(p["item_id"] for p in preds) == sorted(p["item_id"] for p in ref)
    assert len({p["item_id"] for p in preds}) == 3


def test_rerun_of_both_processes_finds_the_run_finished(env, runs):
  _, two = runs
  before = _rows(two)
  outs = run_two(env, two)
  assert "this run is finished (step 3" in outs[0]
  assert _rows(two) == before


# ------------------------------------------------------------------------ GRPO
@pytest.fixture(scope="module")
def grpo_runs(env, runs, tmp_path_factory):
  sft_one, _ = runs
  root = tmp_path_factory.mktemp("grpo_runs")
  one, two = str(root / "one"), str(root / "two")
  args = GRPO_ARGS + [f"--config.init_from={sft_one}"]
  run_one(env, one, args + ["--config.data.eval_files=none"])  # the reference: training only
  run_two(env, two, args)
  return one, two, args


def test_grpo_two_processes_roll_out_and_train_as_one(grpo_runs):
  one, two, _ = grpo_runs
  ref = {r["step"]: r for r in _rows(one) if "reward_mean" in r}
  got = {r["step"]: r for r in _rows(two) if "reward_mean" in r}
  assert sorted(ref) == sorted(got) == [2, 4]  # one row per rollout, written by process 0
  for step in ref:
    # The same responses (each prompt's sampling stream follows its global index) ...
    for k in ("response_length_mean", "response_length_max", "reward_mean", "reward_std",
              "reward/format", "reward/accuracy", "advantage_std", "update_tokens"):
      np.testing.assert_allclose(got[step][k], ref[step][k], rtol=1e-6, err_msg=(step, k))
    # ... and the same update on the global batch.
    assert got[step]["grad_norm"] > 0, step
    for k in ("loss", "pg_loss", "grad_norm", "ppo_kl", "entropy"):
      np.testing.assert_allclose(got[step][k], ref[step][k], rtol=1e-4, atol=1e-6,
                                 err_msg=(step, k))


def test_grpo_one_checkpoint_set_and_eval_over_every_process(grpo_runs):
  _, two, _ = grpo_runs
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4", "model_source.json"]
  # Started from the SFT run's checkpoints, GRPO built the model they were trained as (the
  # tiny base of the SFT default), not its own `model.checkpoint` (the random tiny model).
  with open(os.path.join(two, "checkpoints", "model_source.json")) as f:
    assert os.path.basename(json.load(f)["source"]).startswith("tiny_base_v")
  evals = {r["split"]: r for r in _rows(two) if "split" in r}
  assert set(evals) == {"test_close", "test_open"}
  for name, r in evals.items():
    assert r["n"] == 3, (name, r["n"])
    with open(os.path.join(two, f"predictions_{name}_step4.jsonl")) as f:
      assert len({json.loads(line)["item_id"] for line in f}) == 3


def test_grpo_rerun_of_both_processes_finds_the_run_finished(env, grpo_runs):
  _, two, args = grpo_runs
  before = _rows(two)
  outs = run_two(env, two, args)
  assert "this run is finished (step 4" in outs[0]
  assert _rows(two) == before
