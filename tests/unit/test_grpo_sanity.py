"""GRPO learns: on the tiny model, a reward its starting policy earns rarely climbs well above
a frozen control within a few dozen iterations, and the same run with a known bug does not.

The reward is 1 when a response's first token is one of a fixed tenth of the vocabulary
(about 0.1 for the random starting policy at temperature 1). It depends on where a token
sits, so the learner must score exactly the sampler's tokens at exactly their positions.
Four runs share one learner (one compile each of rollout, log-prob and update passes), from
the same starting state and rollout keys:
  learn      the real iteration;
  control    advantages zeroed: no gradient reaches the parameters (the frozen policy; also
             what a cut gradient gives);
  flipped    advantages negated (a sign bug);
  shifted    the learner receives each response one position late (the sampler's tokens do
             not match the learner's: an alignment bug).
The real run must climb >= 0.3 above the control in its last quarter, with the sampler's and
the learner's probabilities of its tokens equal to float noise; the flipped run must stay
below control + 0.1; the shifted run's probabilities must disagree (the check that catches
it: see the last test).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.algorithms.grpo import advantages as advantages_lib
from deepintuit_jax.algorithms.grpo import learner as learner_lib
from deepintuit_jax.data import batching
from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.engine import optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

CFG = tiny.micro_config()  # vocab 50: each target token is sampled often enough to learn
OPTS = PipelineOptions(length_buckets=(32,), max_seq_len=32, patch_buckets=(256,),
                       max_frame_patches=16)
PAD = tiny.TOKEN_IDS["<|endoftext|>"]
PROMPTS, G, ITERATIONS = 4, 8, 24
TARGET = np.arange(CFG.text.vocab_size) % 10 == 3  # a fixed tenth of the vocabulary


def _prompt_batch(seed: int) -> dict:
  """PROMPTS generation prompts: text, one 2x4x4 video (8 merged tokens), text."""
  rng = np.random.default_rng(seed)
  items = []
  for i in range(PROMPTS):
    ids = np.concatenate([rng.integers(10, 40, 4), [CFG.vision_start_token_id],
                          np.full(8, CFG.video_token_id), [CFG.vision_end_token_id],
                          rng.integers(10, 40, 4)]).astype(np.int32)
    items.append(dict(input_ids=ids, loss_mask=np.zeros(len(ids), np.int32),
                      video_grid_thw=np.array([[2, 4, 4]], np.int32),
                      second_per_grid_ts=np.array([1.0], np.float32),
                      pixel_values_videos=rng.normal(size=(32, CFG.vision.patch_dim)
                                                     ).astype(np.float32),
                      label="c0", item_id=f"p{seed}_{i}"))
  return batching.collate(items, batch_size=PROMPTS, options=OPTS, model_config=CFG,
                          pad_id=PAD)


class _Learner(learner_lib.GRPOLearner):
  """The real learner with the test's reward (on the sampled first tokens) and a switch that
  shifts the responses the learner sees."""
  shift = False

  def _rollout(self, state, batch, attempt):
    ro = super()._rollout(state, batch, attempt)
    ro.sampled_first = ro.tokens[:, 0].copy()
    if self.shift:  # the learner sees each response one position late (an off-by-one)
      ro.tokens = np.roll(ro.tokens, 1, axis=1)
    return ro

  def _score(self, ro):
    r = TARGET[ro.sampled_first].astype(np.float32)
    return r, {"target": r}


@pytest.fixture(scope="module")
def runs():
  model = Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))
  ocfg = optim.OptimConfig(learning_rate=1e-2, warmup_ratio=0.0, decay="constant",
                              grad_clip=1.0)
  tx = optim.make_optimizer(ocfg, ITERATIONS)
  graphdef, start = train_state.init_state(model, tx, (), 0)
  cfg = learner_lib.GRPOConfig(group_size=G, prompts_per_rollout=PROMPTS,
                               mini_batch_prompts=PROMPTS, max_response_tokens=3,
                               temperature=1.0, logp_chunk=0)
  learner = _Learner(graphdef, tx, optim.schedule(ocfg, ITERATIONS), cfg=cfg,
                     tokenizer=tiny.build_tokenizer(), options=OPTS, model_config=CFG,
                     pad_id=PAD)
  compute = advantages_lib.compute
  out = {}
  for name, scale, shift in (("learn", 1.0, False), ("control", 0.0, False),
                               ("flipped", -1.0, False), ("shifted", 1.0, True)):
    learner.shift = shift
    advantages_lib.compute = lambda *a, s=scale: s * np.asarray(compute(*a))
    try:
      state, curve = jax.tree.map(jnp.copy, start), []
      for i in range(ITERATIONS):
        state, m = learner.iteration(state, _prompt_batch(i))
        assert m["ok"]
        curve.append(m["reward_mean"])
    finally:
      advantages_lib.compute = compute
    out[name] = (np.asarray(curve), m)
  assert learner.update.num_traces() == 1  # every run shared the compiled passes
  return out


def _last_quarter(curve: np.ndarray) -> float:
  return float(curve[-len(curve) // 4:].mean())


def _assert_on_policy(m: dict) -> None:
  """The learner scored the sampler's tokens: their probabilities agree to float noise."""
  assert m["rollout_probs_diff_max"] < 1e-3, m["rollout_probs_diff_max"]
  assert m["rollout_actor_probs_pearson_corr"] > 0.999, m["rollout_actor_probs_pearson_corr"]


def test_a_rare_reward_climbs_well_above_the_frozen_control(runs):
  learn, control = runs["learn"][0], runs["control"][0]
  assert 0.0 < control.mean() < 0.25, control  # the starting policy earns it rarely
  assert _last_quarter(learn) >= _last_quarter(control) + 0.3, (learn, control)
  assert _last_quarter(learn) >= learn[:len(learn) // 4].mean() + 0.3, learn
  _assert_on_policy(runs["learn"][1])
  assert 0.0 <= runs["learn"][1]["groups_all_equal"] <= 1.0


def test_a_flipped_advantage_does_not_climb(runs):
  assert _last_quarter(runs["flipped"][0]) < _last_quarter(runs["control"][0]) + 0.1, (
      runs["flipped"][0])


def test_tokens_the_learner_misreads_are_caught(runs):
  """Here the reward still climbs (the tiny model learns "emit target tokens" at every
  position, so training the first position on the wrong token hardly matters); the
  sampler-vs-learner probability check is what fails, as the climb test's does with it."""
  m = runs["shifted"][1]
  with pytest.raises(AssertionError):
    _assert_on_policy(m)
  assert m["rollout_probs_diff_max"] > 0.2 and m["rollout_actor_probs_pearson_corr"] < 0.5
