"""`main` on the user's mistakes, in subprocesses: one short line naming the problem, exit
code 2, no traceback (`--traceback` shows it) and no workdir left behind. Each run fails
before training, in seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.main_env import main_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def env(xla_cache):
  return main_env(xla_cache)


def _fail(env, workdir, *args):
  p = subprocess.run([sys.executable, "-m", "deepintuit_jax.main",
                      "--config=configs/sft.py:pulse", f"--workdir={workdir}", *args],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr
  lines = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
  assert len(lines) == 1, p.stderr
  assert not os.path.exists(workdir), os.listdir(workdir)
  return lines[0]


def test_config_and_input_mistakes_are_one_line(env, tmp_path):
  w = str(tmp_path / "w")
  line = _fail(env, w, "--config.train.lerning_rate=1")
  assert line.startswith("error: did you mean --config.train.learning_rate?")
  line = _fail(env, w, "--config.train.num_steps=-2")
  assert "train.num_steps=-2" in line and ">= 0" in line
  line = _fail(env, w, "--config.model.checkpoint=Qwen/Qwen2.5-VL-7B-Instruct")
  assert "model.checkpoint='Qwen/Qwen2.5-VL-7B-Instruct'" in line and "no such directory" in line
  only_bin = tmp_path / "torch_model"
  only_bin.mkdir()
  (only_bin / "pytorch_model.bin").write_bytes(b"not loaded")
  line = _fail(env, w, f"--config.model.checkpoint={only_bin}")
  assert "pickled weights (pytorch_model.bin)" in line and "safetensors" in line


def test_empty_train_file_fails_named_and_leaves_no_workdir(env, tmp_path):
  empty = tmp_path / "train.json"
  empty.write_text("[]")
  classes = tmp_path / "classes.json"
  classes.write_text(json.dumps(["a", "b"]))
  w = str(tmp_path / "w")
  # Fails inside the stage, after the workdir was made: the workdir is removed again.
  line = _fail(env, w, f"--config.data.train_file={empty}", f"--config.data.class_file={classes}",
               "--config.data.eval_files=none")
  assert str(empty) in line and "holds no records" in line
  p = subprocess.run([sys.executable, "-m", "deepintuit_jax.main", "--config=configs/sft.py:pulse",
                      f"--workdir={w}", "--config.train.num_steps=-2", "--traceback"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr
