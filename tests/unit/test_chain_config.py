"""The chain's plan and handover (pure config logic): registered steps only, the shared keys
copied into every step, each step pointed at the previous steps' outputs."""
from __future__ import annotations

import os

import pytest

from configs import deepintuit
from deepintuit_jax.stages import chain

ALL = {"sft", "grpo", "traces", "calibrate", "infer"}


def _config(*overrides):
  c = deepintuit.get_config("pulse")
  c.model.checkpoint = "/models/qwen"
  c.data.eval_files = "test_close=/d/c.json,test_open=/d/o.json"
  c.sft.data.train_file = "/d/coldstart.json"
  return c


def test_plan_skips_unregistered_stages(capsys):
  c = _config()
  steps = chain.plan(c, {s: None for s in ALL})
  assert steps[:1] == ["sft"] and steps[-4:] == ["traces", "calibrate", "calibrate_hidden",
                                                  "infer"]
  assert ("grpo" in steps) == ("grpo" in c)
  without = chain.plan(c, {s: None for s in ALL - {"grpo"}})
  assert "grpo" not in without
  if "grpo" in c:
    assert "skipping step 'grpo'" in capsys.readouterr().out
  with pytest.raises(ValueError, match="chain step 'nope' has no config"):
    c.steps = "sft,nope"
    chain.plan(c, {s: None for s in ALL})


def test_handover_with_and_without_grpo():
  c = _config()
  with_grpo = ["sft", "grpo", "traces", "calibrate", "calibrate_hidden", "infer"]
  inf = chain.step_config(c, "infer", with_grpo, "/w")
  assert inf.infer.policy == "/w/grpo/hf" and inf.infer.policy_name == "SFT + GRPO"
  assert inf.infer.baselines == "SFT=/w/sft/hf"
  assert inf.infer.calibrators == ("label token=/w/calibrate,"
                                   "hidden-state head=/w/calibrate_hidden")
  cal = chain.step_config(c, "calibrate_hidden", with_grpo, "/w")
  assert (cal.init_from, cal.traces, cal.calibrate.head) == ("/w/grpo/hf", "/w/traces",
                                                            "hidden_state")
  no_grpo = [s for s in with_grpo if s != "grpo"]
  tr = chain.step_config(c, "traces", no_grpo, "/w")
  assert tr.init_from == "/w/sft/hf"
  inf = chain.step_config(c, "infer", no_grpo, "/w")
  assert (inf.infer.policy, inf.infer.policy_name, inf.infer.baselines) == (
      "/w/sft/hf", "SFT", "")


def test_shared_keys_reach_every_step_and_stay_locked():
  c = _config()
  steps = chain.plan(c, {s: None for s in ALL})
  for name in steps:
    sub = chain.step_config(c, name, steps, "/w")
    assert sub.model.checkpoint == "/models/qwen" and sub.seed == c.seed
    assert sub.data.eval_files == ("none" if name in ("sft", "grpo", "grpo_control")
                                    else c.data.eval_files)
    with pytest.raises(AttributeError):
      sub.not_a_key = 1
  assert chain.step_config(c, "sft", steps, "/w").data.train_file == "/d/coldstart.json"
  assert chain.step_config(c, "traces", steps, "/w").data.train_file == ""


def test_a_failed_chain_keeps_its_finished_steps(tmp_path):
  from deepintuit_jax.core import workdir as wd
  fresh = str(tmp_path / "chain")
  with pytest.raises(RuntimeError):
    with wd.Guard(fresh):
      os.makedirs(os.path.join(fresh, "sft", "checkpoints", "185"))  # a finished step
      os.makedirs(os.path.join(fresh, "traces"))
      raise RuntimeError("a later step fails")
  assert os.path.isdir(os.path.join(fresh, "sft", "checkpoints", "185"))
  other = str(tmp_path / "other")
  with pytest.raises(RuntimeError):
    with wd.Guard(other):
      os.makedirs(os.path.join(other, "traces"))
      raise RuntimeError("fails before any checkpoint")
  assert not os.path.exists(other)


def test_every_data_key_of_the_chain_reaches_the_steps_or_is_refused():
  """A chain-level data key either reaches every step that has it or stops the chain with
  a message; none is silently ignored (the train files are per step)."""
  c = deepintuit.get_config()
  c.data.max_seq_len, c.data.prefetch_steps = 4096, 0
  steps = chain.plan(c, {s: None for s in ALL})
  for name in steps:
    sub = chain.step_config(c, name, steps, "/w")
    assert (sub.data.max_seq_len, sub.data.prefetch_steps) == (4096, 0), name
  own = {k for k in c.data.keys()} - set(chain.SHARED_DATA_KEYS)
  assert own == {"train_file"}
  chain.from_config(c)
  c.data.train_file = "/d/train.json"
  with pytest.raises(ValueError, match=r"--config.<step>.data.train_file"):
    chain.from_config(c)
