"""Pulse runs of `python -m deepintuit_jax.main --config=configs/grpo.py` in subprocesses:
a short run end to end (metrics, eval, checkpoints, export), exact resume after SIGKILL
(the same rewards and losses at every later step), and the missing-SFT message."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.integration.test_sft_main import REPO, SMALL, env  # noqa: F401 (fixture)

# 2 prompts x G = 2 per rollout, one optimizer step per prompt (2 per rollout).
GRPO_SMALL = [a for a in SMALL if not a.startswith("--config.train.batch_size")] + [
    "--config.grpo.group_size=2", "--config.grpo.prompts_per_rollout=2",
    "--config.grpo.mini_batch_prompts=1", "--config.grpo.max_response_tokens=8"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "deepintuit_jax.main", "--config=configs/grpo.py:pulse",
          f"--workdir={workdir}", *GRPO_SMALL, *extra]


def _run(env, workdir, *extra, check=True):
  p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  if check and p.returncode:
    raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
  return p


def _train_rows(workdir) -> dict[int, dict]:
  """step -> the last training row logged for it (a resumed run re-logs steps)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows if "reward_mean" in r}


@pytest.fixture(scope="module")
def pulse(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grpo_pulse") / "run")
  p = _run(env, workdir, "--config.train.num_steps=6")
  return workdir, p


def test_pulse_run_outputs(pulse):
  workdir, p = pulse
  rows = _train_rows(workdir)
  assert sorted(rows) == [2, 4, 6]  # one row per rollout, two optimizer steps each
  for r in rows.values():
    for k in ("loss", "pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy",
              "grad_norm", "lr", "reward_mean", "reward_std", "reward/format",
              "reward/accuracy", "format_rate", "accuracy", "response_length_mean",
              "response_length_max", "response_truncated", "advantage_mean",
              "advantage_std", "rollout_time", "old_logp_time", "update_time",
              "rollout_tokens_per_second", "update_tokens_per_second"):
      assert k in r and np.isfinite(r[k]), k
    assert 1 <= r["response_length_mean"] <= r["response_length_max"] <= 8
    assert 0 <= r["accuracy"] <= 1 and r["optimizer_steps"] == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = {r["split"] for r in map(json.loads, f) if "split" in r}
  assert evals == {"test_close", "test_open"}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "model_source.json"]
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["stage"] == "grpo"
  from transformers import AutoConfig
  assert AutoConfig.from_pretrained(os.path.join(workdir, "hf")).model_type == "qwen2_5_vl"


def test_exact_resume_after_sigkill(env, pulse, tmp_path):
  reference = _train_rows(pulse[0])
  workdir = str(tmp_path / "killed")
  args = ["--config.train.num_steps=6", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.export=False", "--config.data.eval_files=none"]
  proc = subprocess.Popen(_cmd(workdir, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt2 = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  _run(env, workdir, *args)
  resumed = _train_rows(workdir)
  assert sorted(resumed) == [2, 4, 6]
  for step in (4, 6):
    for k in ("reward_mean", "loss", "pg_loss", "response_length_mean", "grad_norm"):
      assert resumed[step][k] == reference[step][k], (step, k)


def test_missing_sft_result_names_the_command(env, tmp_path):
  p = _run(env, str(tmp_path / "w"), f"--config.init_from={tmp_path / 'no_sft'}", check=False)
  assert p.returncode != 0
  assert "--config=configs/sft.py" in p.stderr and "no_sft" in p.stderr
  assert not os.path.exists(tmp_path / "w")
