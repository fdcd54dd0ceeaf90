"""Recipes live in the config files (deepintuit_jax/core/recipes.py): each stage config's fields hold
the tiny recipe, `:real` and a real checkpoint give the release's, a key set on the command
line keeps its value. The expected numbers are written out here from the two recipes as the
stage modules held them before they moved (and from ../shared/RECIPE.md for the release), so
the move is checked against values not read from the code under test."""
from __future__ import annotations

import pytest

from configs import calibrate, deepintuit, grpo, imitation, infer, sft, traces
from deepintuit_jax.core import recipes

P_TINY, P_REAL = 64 * 28 * 28, 200704
# stage config -> {key: (tiny, release)}
EXPECTED = {
    sft: {"train.learning_rate": (1e-3, 2e-5), "train.epochs": (5, 5),
          "train.batch_size": (8, 64), "data.max_frames": (8, 32),
          "data.max_pixels": (P_TINY, P_REAL), "train.frozen": (r"^visual\.", r"^visual\."),
          "eval.max_new_tokens": (192, 2048), "checkpoint.every_steps": (50, 500)},
    grpo: {"train.learning_rate": (1e-4, 1e-6), "train.warmup_steps": (2, 10),
           "train.epochs": (1, 20), "train.num_steps": (180, 0), "grpo.group_size": (8, 8),
           "grpo.prompts_per_rollout": (8, 64), "grpo.mini_batch_prompts": (4, 32),
           "grpo.max_response_tokens": (160, 2048), "data.max_frames": (8, 32),
           "data.max_pixels": (P_TINY, P_REAL), "eval.max_new_tokens": (192, 2048),
           "checkpoint.every_steps": (10, 50), "grpo.temperature": (0.7, 1.0),
           "train.frozen": (r"^visual\.", ""), "grpo.dynamic_sampling": (True, False)},
    calibrate: {"train.learning_rate": (1e-3, 2e-5), "train.head_learning_rate": (1e-2, 1e-3),
                "train.epochs": (1, 10), "train.batch_size": (16, 256),
                "data.max_frames": (8, 32), "data.max_pixels": (P_TINY, P_REAL),
                "checkpoint.every_steps": (50, 500)},
    imitation: {"train.learning_rate": (3e-4, 5e-5), "train.epochs": (10, 10),
                "train.batch_size": (8, 64), "train.weight_decay": (0.0, 0.05),
                "data.max_frames": (8, 32), "data.max_pixels": (P_TINY, P_REAL),
                "checkpoint.every_steps": (100, 500), "imitation.head_width": (64, 512),
                "imitation.head_depth": (1, 2), "imitation.head_heads": (4, 8)},
    infer: {"infer.max_new_tokens": (192, 2048), "data.max_frames": (8, 32),
            "data.max_pixels": (P_TINY, P_REAL), "infer.prompt": ("compact", "full"),
            "eval.max_new_tokens": (192, 2048)},
    traces: {"traces.num_traces": (4, 4), "traces.max_new_tokens": (192, 2048),
             "data.max_frames": (8, 32), "data.max_pixels": (P_TINY, P_REAL),
             "traces.prompt": ("compact", "full"), "traces.temperature": (0.7, 1.0)},
}


def _values(c, which: int, module) -> dict:
  return ({k: recipes.get(c, k) for k in EXPECTED[module]},
          {k: v[which] for k, v in EXPECTED[module].items()})


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_fields_hold_the_tiny_recipe_and_real_the_release(module):
  c = module.get_config()
  got, want = _values(recipes.resolve(c), 0, module)
  assert got == want and recipes.resolve(c).recipe == "tiny"
  real = module.get_config("real")
  got, want = _values(real, 1, module)
  assert got == want and real.recipe == "release"
  assert _values(recipes.resolve(real), 1, module)[0] == want


@pytest.mark.parametrize("module", list(EXPECTED), ids=lambda m: m.__name__)
def test_a_real_checkpoint_takes_the_release_recipe_but_not_over_a_set_key(module):
  c = module.get_config()
  key = sorted(EXPECTED[module])[0]
  tiny, release = EXPECTED[module][key]
  mine = "mine" if isinstance(tiny, str) else (not tiny if isinstance(tiny, bool)
                                                else type(tiny)(tiny * 3 + 1))
  with c.unlocked():
    c.model.checkpoint = "/models/Qwen2.5-VL-7B-Instruct"
  got, want = _values(recipes.resolve(c), 1, module)
  assert got == want and recipes.resolve(c).recipe == "release"
  recipes.set_value(c, key, mine)  # as --config.<key>=... on the command line
  r = recipes.resolve(c)
  assert recipes.get(r, key) == mine
  assert {k: v for k, v in _values(r, 1, module)[0].items() if k != key} == {
      k: v for k, v in want.items() if k != key}
  with c.unlocked():
    c.recipe = "tiny"  # the tiny recipe with a real model
  got, want = _values(recipes.resolve(c), 0, module)
  assert {k: v for k, v in got.items() if k != key} == {k: v for k, v in want.items()
                                                        if k != key}


def test_resolving_twice_changes_nothing_and_keeps_the_lock():
  c = sft.get_config()
  with c.unlocked():
    c.model.checkpoint = "/m"
  c.lock()
  once = recipes.resolve(c)
  assert once.is_locked and recipes.resolve(once).to_dict() == once.to_dict()
  with pytest.raises(ValueError, match="recipe='big'"):
    with c.unlocked():
      c.recipe = "big"
    recipes.resolve(c)


def test_the_chain_steps_get_their_recipes():
  """configs/deepintuit.py: the shared frame settings are the tiny ones; each step keeps its
  own recipe tables, so a real checkpoint turns every step to the release's values."""
  c = deepintuit.get_config()
  assert (c.data.max_frames, c.data.max_pixels) == (8, P_TINY)
  for step in ("sft", "grpo", "traces", "calibrate", "infer", "imitation"):
    assert "recipes" in c[step], step
  real = deepintuit.get_config("real")
  assert real.grpo.train.learning_rate == 1e-6 and real.data.max_frames == 32
