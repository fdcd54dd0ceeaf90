"""grpo.reward_modules: a user's reward file, imported before the rewards are looked up, lets
the command line name its reward; imported once per process; bad entries are one error."""
from __future__ import annotations

import pytest

from configs import grpo as grpo_config
from deepintuit_jax.algorithms.grpo import rewards
from deepintuit_jax.stages import grpo as grpo_stage


def _config(**grpo):
  c = grpo_config.get_config("pulse")
  with c.unlocked():
    c.grpo.update(grpo)
  return c


def test_a_reward_file_registers_a_reward_the_config_can_name(tmp_path):
  path = tmp_path / "my_reward.py"
  path.write_text(
      "import numpy as np\n"
      "from deepintuit_jax.algorithms.grpo import rewards\n"
      "@rewards.register('tmp_long_answer')\n"
      "def long_answer(responses, examples):\n"
      "  return np.array([float(len(r) > 3) for r in responses], np.float32)\n")
  c = _config(reward_modules=str(path), rewards="tmp_long_answer:2,format:1")
  run = grpo_stage.from_config(c)
  assert run.grpo.rewards == (("tmp_long_answer", 2.0), ("format", 1.0))
  total, parts = rewards.combine(dict(run.grpo.rewards), ["abcd", "ab"],
                                 [{"label": "x"}, {"label": "x"}])
  assert parts["tmp_long_answer"].tolist() == [1.0, 0.0]
  assert grpo_stage.from_config(c).grpo.rewards == run.grpo.rewards  # imported once


def test_bad_reward_modules_are_one_error(tmp_path):
  with pytest.raises(ValueError, match="is not a file"):
    grpo_stage.from_config(_config(reward_modules=str(tmp_path / "missing.py")))
  with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
    grpo_stage.from_config(_config(reward_modules="no_such_module_here"))
  with pytest.raises(ValueError, match="unknown reward 'not_registered'"):
    grpo_stage.from_config(_config(rewards="not_registered:1"))
