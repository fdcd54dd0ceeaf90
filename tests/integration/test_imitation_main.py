"""Pulse runs of `python -m deepintuit_jax.main --config=configs/imitation.py` in subprocesses
(issue 11 item 6, "the baseline pulse run"): both inits end to end with the report another
stage's chain reads, and exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny sizes: 2-clip batches, 4 frames of at most 16 patches-of-28.
SMALL = ["--config.train.batch_size=2", "--config.data.max_frames=4",
         "--config.data.max_pixels=12544", "--config.eval.batch_size=4",
         "--config.data.synthetic_train=12", "--config.data.synthetic_test=2"]


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _cmd(workdir, arg="pulse", *extra):
  return [sys.executable, "-m", "deepintuit_jax.main", f"--config=configs/imitation.py:{arg}",
          f"--workdir={workdir}", *SMALL, *extra]


def _run(env, workdir, *extra, arg="pulse", check=True):
  p = subprocess.run(_cmd(workdir, arg, *extra), cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode:
    raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
  return p


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict[int, float]:
  """step -> loss of the *last* row logged for that step (a resumed run re-logs steps)."""
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def pulse(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pulse") / "run")
  p = _run(env, workdir, "--config.train.num_steps=5")
  return workdir, p


def _check_report(workdir, model, step):
  with open(os.path.join(workdir, "eval_report.json")) as f:
    rep = json.load(f)
  assert rep["final"] is True and rep["step"] == step and list(rep["models"]) == [model]
  splits = rep["models"][model]
  assert set(splits) == {"test_close", "test_open"}
  for m in splits.values():
    assert m["n"] == 2 and 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert m["valid_rate"] == 1.0 and 0 <= m["ece"] <= 1  # every item gets a class + scores
  assert model in open(os.path.join(workdir, "eval_report.md")).read()


def test_pulse_run_outputs(pulse):
  workdir, p = pulse
  rows = _rows(workdir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
  for r in train:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["examples"] == 2
    assert 0 <= r["accuracy"] <= 1 and r["tokens_per_second"] > 0
  evals = {r["split"]: r for r in rows if "split" in r}
  assert set(evals) == {"test_close", "test_open"}
  _check_report(workdir, "imitation (pretrained tower)", 5)
  with open(os.path.join(workdir, "predictions_test_open_step5.jsonl")) as f:
    preds = [json.loads(line) for line in f]
  assert len(preds) == 2
  for q in preds:
    assert abs(sum(q["scores"].values()) - 1) < 1e-5
    assert q["prediction"] == max(q["scores"], key=q["scores"].get)
  assert "trainable" in p.stdout and "mesh" in p.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5", "model_source.json"]  # keep 2; the HF source
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["stage"] == "imitation"


def test_scratch_pulse(env, tmp_path):
  workdir = str(tmp_path / "scratch")
  _run(env, workdir, arg="pulse,scratch")
  assert [r["step"] for r in _rows(workdir) if "loss" in r] == [1, 2, 3]
  _check_report(workdir, "imitation (scratch)", 3)


def test_exact_resume_after_sigkill(env, pulse, tmp_path):
  reference = _losses(pulse[0])
  workdir = str(tmp_path / "killed")
  args = ["--config.train.num_steps=5", "--config.checkpoint.every_steps=2"]
  proc = subprocess.Popen(_cmd(workdir, "pulse", *args), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt2 = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
  _run(env, workdir, *args)
  resumed = _losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4, 5]
  for step in range(3, 6):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])
  _check_report(workdir, "imitation (pretrained tower)", 5)


def test_export_is_refused(env, tmp_path):
  p = _run(env, str(tmp_path / "w"), "--config.checkpoint.export=True", check=False)
  assert p.returncode != 0 and "not an HF model" in p.stderr
