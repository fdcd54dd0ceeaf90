"""Pulse runs of `python -m deepintuit_jax.main --config=configs/sft.py` in subprocesses:
a short run end to end, exact resume after SIGKILL, bad data in error and skip modes, and
an unknown config key."""
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
# Tiny sizes: 2-item batches, 4 frames of at most 16 patches-of-28.
SMALL = ["--config.train.batch_size=2", "--config.data.max_frames=4",
         "--config.data.max_pixels=12544", "--config.eval.batch_size=4",
         "--config.data.synthetic_train=12", "--config.data.synthetic_test=2"]


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "deepintuit_jax.main", "--config=configs/sft.py:pulse",
          f"--workdir={workdir}", *SMALL, *extra]


def _run(env, workdir, *extra, check=True):
  p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=600)
  if check and p.returncode:
    raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
  return p


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict[int, float]:
  """step -> loss of the training row of that step (there is exactly one, resumed or not)."""
  steps = [r["step"] for r in _rows(workdir) if "loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate metric rows: {steps}"
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def pulse(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pulse") / "run")
  p = _run(env, workdir, "--config.train.num_steps=5")
  return workdir, p


def test_pulse_run_outputs(pulse):
  workdir, p = pulse
  rows = _rows(workdir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
  for r in train:
    assert np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 and r["grad_norm"] > 0
    assert 0 <= r["lr"] <= 5e-3 * (1 + 1e-6)
  evals = {r["split"]: r for r in rows if "split" in r}
  assert set(evals) == {"test_close", "test_open"}
  for r in evals.values():
    assert r["n"] == 2 and 0 <= r["accuracy"] <= 1 and 0 <= r["format_rate"] <= 1
  assert "test_open" in open(os.path.join(workdir, "eval_report.md")).read()
  assert "trainable" in p.stdout and "frozen" in p.stdout and "mesh" in p.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5", "model_source.json"]  # keep 2; the HF source
  assert os.listdir(os.path.join(workdir, "tb"))
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["stage"] == "sft"
  # The export loads back (with the extended tokenizer) and holds the trained weights.
  from deepintuit_jax.models import qwen2_5_vl
  from transformers import AutoTokenizer
  model = qwen2_5_vl.from_pretrained(os.path.join(workdir, "hf"), dtype=np.float32)
  tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "hf"))
  assert len(tok.encode("<answer>", add_special_tokens=False)) == 1
  assert model.config.text.vocab_size >= len(tok)


def test_exact_resume_after_sigkill(env, pulse, tmp_path):
  reference = _losses(pulse[0])
  workdir = str(tmp_path / "killed")
  args = ["--config.train.num_steps=5", "--config.checkpoint.every_steps=2"]
  proc = subprocess.Popen(_cmd(workdir, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt2 = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
  _run(env, workdir, *args)
  resumed = _losses(workdir)  # rows of steps 3, 4 logged before the kill were dropped once
  assert [r["step"] for r in _rows(workdir) if "loss" in r] == [1, 2, 3, 4, 5]
  for step in range(3, 6):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def _bad_train_file(tmp_path, env) -> str:
  """The generated train split with one malformed record and one missing video."""
  cache = env["DEEPINTUIT_CACHE"]  # shared by the run: this module's benchmark (12 / 2 clips)
  (root,) = [os.path.join(cache, d) for d in os.listdir(cache)
             if d.startswith("synthetic") and d.endswith("_s0_12_2")]
  with open(os.path.join(root, "train.json")) as f:
    recs = json.load(f)
  for r in recs:
    for turn in r["conversations"]:
      if isinstance(turn["content"], list):
        for c in turn["content"]:
          if c.get("type") == "video":
            c["video"] = os.path.join(root, c["video"])
  recs[1]["conversations"][0]["content"][0]["video"] = os.path.join(root, "missing.mp4")
  del recs[2]["conversations"]
  path = str(tmp_path / "bad.json")
  with open(path, "w") as f:
    json.dump(recs, f)
  return path


def test_bad_data_error_and_skip(env, pulse, tmp_path):
  bad = _bad_train_file(tmp_path, env)
  common = [f"--config.data.train_file={bad}", "--config.data.eval_files=none",
            "--config.checkpoint.export=False", "--config.train.num_steps=2"]
  p = _run(env, str(tmp_path / "err"), *common, check=False)
  assert p.returncode != 0
  assert "bad sample (bad_record)" in p.stderr and "bad.json" in p.stderr
  p = _run(env, str(tmp_path / "skip"), *common, "--config.data.on_bad_sample=skip")
  skipped = [r for r in _rows(str(tmp_path / "skip")) if "skipped/total" in r]
  assert skipped and skipped[-1]["skipped/bad_record"] == 1
  assert "skipped" in p.stdout


def test_unknown_config_key_fails_clearly(env, tmp_path):
  p = _run(env, str(tmp_path / "w"), "--config.train.lerning_rate=1", check=False)
  assert p.returncode != 0
  assert "lerning_rate" in p.stderr
  assert not os.path.exists(tmp_path / "w")
