"""The optional GRPO parts at stage level (issue 10 item 4), through `GRPOLearner.iteration`
on the one-layer tiny model: KL to the reference, the entropy bonus, dynamic sampling,
several PPO epochs and the `gspo` loss. Expected values come from NumPy transcriptions of
the formulas on the arrays the iteration produced (rollout, learner batches, log-probs of a
separate pass), or from the construction of the case (planted rewards).

Every learner records what it did: `_Record` wraps its sampler call and its train step
(the micro-batches each step got, its metrics, and a copy of the parameters before it).
Six learners compile (sampler once, old-logp pass and train step per learner): ~75 s of CPU
in all on 2 shared cores, hence `slow`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepintuit_jax.algorithms.grpo import learner as learner_lib
from deepintuit_jax.algorithms.grpo import rewards as rewards_lib
from deepintuit_jax.engine import logprobs
from deepintuit_jax.engine.state import trainable_model
from tests.unit.test_grpo_learner import CFG, OPTS, PAD, _prompt_batch, _setup, tokenizer  # noqa: F401

pytestmark = pytest.mark.slow

G = 2
LR = 0.5  # SGD: updates follow the gradients linearly (Adam's sign-like first step would
#           turn rounding-level gradient differences into lr-sized ones)


@rewards_lib.register("planted") if "planted" not in rewards_lib.REWARDS else (lambda f: f)
def planted_rewards(responses, examples):
  """1 for the first response of each prompt whose item_id does not start with "flat", 0
  otherwise: a "flat*" prompt's group has equal rewards, every other group has not."""
  out = np.zeros(len(responses), np.float32)
  for i, ex in enumerate(examples):
    first = i == 0 or examples[i - 1]["item_id"] != ex["item_id"]
    out[i] = float(first and not str(ex["item_id"]).startswith("flat"))
  return out


def _batch(seed, *item_ids):
  b = _prompt_batch(seed, len(item_ids))
  b["item_id"] = list(item_ids)
  return b


class _Record:
  """Wraps a learner's `_sample` and `update` (attributes pass through to the step)."""

  def __init__(self, learner):
    self.learner, self.step = learner, learner.update
    self.samples, self.steps = [], []  # (_sample outputs), (params before, micro, metrics)
    sample = learner._sample

    def recorded_sample(state, batch):
      out = sample(state, batch)
      self.samples.append(out)
      return out
    learner._sample = recorded_sample
    learner.update = self

  def __call__(self, state, micro):
    before = jax.tree.map(jnp.copy, (state.params, state.frozen, state.rest))  # state is donated
    state, m = self.step(state, micro)
    self.steps.append((before, micro, jax.device_get(m)))
    return state, m

  def __getattr__(self, name):
    return getattr(self.step, name)


@pytest.fixture(scope="module")
def start():
  """(graphdef, initial state): every case starts from copies of it."""
  graphdef, state, _, _ = _setup(seed=0, tx=optax.sgd(LR))
  return graphdef, state


def _learner(start, tokenizer, more_prompts=None, ref=False, **kw):
  graphdef, state = start
  kw = dict(dict(group_size=G, prompts_per_rollout=2, mini_batch_prompts=2,
                 max_response_tokens=6, logp_chunk=64, rewards=(("planted", 1.0),)), **kw)
  cfg = learner_lib.GRPOConfig(**kw)
  ref_params = (jax.tree.map(jnp.copy, (state.params, state.frozen, state.rest)) if ref
                else None)
  learner = learner_lib.GRPOLearner(graphdef, optax.sgd(LR), lambda s: LR, cfg=cfg,
                                    tokenizer=tokenizer, options=OPTS, model_config=CFG,
                                    pad_id=PAD, more_prompts=more_prompts, ref_params=ref_params)
  rec = _Record(learner)
  return learner, rec, jax.tree.map(jnp.copy, state)


def _masked(mb, *names):
  """Host arrays of a (non-grouped) learner micro-batch at the loss mask: 1-D each."""
  mask = np.asarray(mb["loss_mask"]).astype(bool)
  return [np.asarray(mb[n], np.float64)[mask] for n in names]


def _row_adv(mb):
  """Per masked token, its row's advantage."""
  mask = np.asarray(mb["loss_mask"]).astype(bool)
  return np.broadcast_to(np.asarray(mb["advantages"], np.float64)[:, None], mask.shape)[mask]


def _place(ro, values):
  """[N*G, L] response-aligned values at the loss mask of the micro-batch of all prompts."""
  return np.concatenate([values[r, :int(ro.lengths[r])] for r in range(len(ro.lengths))])


def _tree_max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


BATCHES = ((1, "a", "b"), (2, "c", "d"))


@pytest.fixture(scope="module")
def baseline(start, tokenizer):
  """The recipe's learner (no KL, no entropy bonus) for two iterations on BATCHES:
  (recorder, [params after each iteration], [metrics of each iteration])."""
  learner, rec, state = _learner(start, tokenizer)
  params, metrics = [], []
  for spec in BATCHES:
    state, m = learner.iteration(state, _batch(*spec))
    params.append(jax.tree.map(jnp.copy, state.params))
    metrics.append(m)
  return rec, params, metrics


def test_kl_to_reference_is_zero_at_the_start_and_steers_later_updates(start, tokenizer,
                                                                       baseline):
  """kl_coef > 0 with the reference = the start: the first update sees KL 0 with zero
  gradient (low_var_kl is flat at 0), so it equals the kl_coef = 0 update; the second sees
  the KL of the updated policy (NumPy k3 of the old-logp and reference passes), its loss
  is the KL-free loss + kl_coef * KL, and its update differs."""
  coef = 0.5
  learner, rec, state = _learner(start, tokenizer, ref=True, kl_coef=coef)
  rec_0, params_0, metrics_0 = baseline
  metrics = []
  for it, spec in enumerate(BATCHES):
    state, m = learner.iteration(state, _batch(*spec))
    metrics.append(m)
    assert m["ok"] and m["optimizer_steps"] == 1
    # The same policy samples the same rollout.
    np.testing.assert_array_equal(rec.samples[it][0].tokens, rec_0.samples[it][0].tokens)
    if it == 0:
      assert abs(m["kl"]) < 1e-10
      np.testing.assert_allclose(m["loss"], metrics_0[0]["loss"], rtol=1e-6, atol=1e-9)
      assert _tree_max_diff(state.params, params_0[0]) < 1e-6
      assert _tree_max_diff(state.params, start[1].params) > 1e-3  # the update did move
  m1, m1_0 = metrics[1], metrics_0[1]
  (mb,) = rec.steps[1][1]
  old, ref = _masked(mb, "old_logprobs", "ref_logprobs")
  d = ref - old
  want_kl = np.mean(np.exp(d) - d - 1.0)  # k3 with current = old (on-policy first epoch)
  assert want_kl > 1e-6
  np.testing.assert_allclose(m1["kl"], want_kl, rtol=1e-3)
  # The reference log-probs are those of the start parameters.
  ro = rec.samples[1][0]
  st = start[1]
  np.testing.assert_allclose(
      ref, _place(ro, learner._logprobs((st.params, st.frozen, st.rest), ro,
                                        np.asarray(mb["advantages"]))), atol=1e-5)
  np.testing.assert_allclose(m1["pg_loss"], m1_0["pg_loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m1["loss"] - m1_0["loss"], coef * m1["kl"], rtol=1e-3, atol=1e-8)
  assert _tree_max_diff(state.params, params_0[1]) > 1e-5


def test_entropy_bonus_enters_the_loss_as_minus_coef_times_entropy(start, tokenizer, baseline):
  """loss = pg_loss - coef * entropy (token-mean); the entropy is the policy's at the
  response positions (NumPy, from a plain forward's logits of the learner's rows: one
  prompt ++ response row per response here); pg_loss as without the bonus (the baseline's
  learner shares the prompt: equal to float rounding)."""
  coef = 0.1
  learner, rec, state = _learner(start, tokenizer, entropy_coef=coef, share_prompt=False)
  _, m = learner.iteration(state, _batch(*BATCHES[0]))
  m0 = baseline[2][0]
  np.testing.assert_allclose(m["loss"], m["pg_loss"] - coef * m["entropy"], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(m["pg_loss"], m0["pg_loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["entropy"], m0["entropy"], rtol=1e-5)
  np.testing.assert_allclose(m["loss"] - m0["loss"], -coef * m["entropy"], rtol=1e-5)
  (mb,) = rec.steps[0][1]
  graphdef, st = start
  model = trainable_model(graphdef, st)
  logits = np.asarray(jax.jit(lambda inputs: model(**inputs).logits)(
      logprobs.model_inputs({k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                             for k, v in mb.items()})), np.float64)
  mask = np.asarray(mb["loss_mask"]).astype(bool)
  z = logits[mask]
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.mean(-(p * np.log(np.maximum(p, 1e-300))).sum(-1))
  np.testing.assert_allclose(m["entropy"], want, rtol=1e-4)
  assert want > 1.0  # a random tiny policy is far from deterministic: the bonus is not 0


def test_dynamic_sampling_keeps_varied_groups_and_refills_up_to_the_bound(start, tokenizer):
  queue: list[dict] = []
  learner, rec, state = _learner(start, tokenizer, more_prompts=lambda: queue.pop(0),
                                 dynamic_sampling=True, max_refills=2)

  def run(batch, *refills):
    nonlocal state
    queue[:] = list(refills)
    state, m = learner.iteration(state, batch)
    ro, total = rec.samples[-1][:2]
    return m, ro, total, len(refills) - len(queue)

  # One flat group: one refill gives a second varied group; the flat ones are dropped.
  m, ro, total, used = run(_batch(1, "flat0", "v1"), _batch(2, "v2", "flat1"),
                           _batch(3, "v3", "v4"))
  assert [p["item_id"] for p in ro.prompts] == ["v1", "v2"] and used == 1
  assert (m["groups_kept"], m["groups_sampled"], m["prompt_batches"]) == (2, 4, 2)
  r = total.reshape(-1, G)
  assert (r.max(1) > r.min(1)).all()  # recomputed from the kept rows' rewards
  np.testing.assert_array_equal(total, [1, 0, 1, 0])
  # The trained batch's rewards are batch_*; the headline ones are every sampled response's
  # (flat0, v1, v2, flat1: 2 rewarded responses of 4 * G), the policy's unbiased figures.
  np.testing.assert_allclose(m["batch_reward_mean"], 0.5)
  np.testing.assert_allclose(m["reward_mean"], 2 / (4 * G))
  assert (m["batch_groups_all_equal"], m["groups_all_equal"]) == (0.0, 0.5)
  (mb,) = rec.steps[-1][1]
  assert (np.abs(np.asarray(mb["advantages"])) > 0.5).all()  # every row carries signal

  # Enough varied groups at once: no refill.
  m, ro, _, used = run(_batch(4, "v5", "v6"), _batch(5, "v7", "v8"))
  assert used == 0 and [p["item_id"] for p in ro.prompts] == ["v5", "v6"]
  assert (m["groups_kept"], m["groups_sampled"], m["prompt_batches"]) == (2, 2, 1)

  # More varied groups than needed: the first ones in sampling order are kept.
  m, ro, _, used = run(_batch(6, "flat2", "v9"), _batch(7, "v10", "v11"))
  assert used == 1 and [p["item_id"] for p in ro.prompts] == ["v9", "v10"]
  assert (m["groups_kept"], m["groups_sampled"], m["prompt_batches"]) == (2, 4, 2)

  # All flat: refills stop at max_refills; the batch is filled with flat groups (advantage
  # 0, no gradient) and the metrics say how few were kept.
  m, ro, total, used = run(_batch(8, "flat3", "flat4"), _batch(9, "flat5", "flat6"),
                           _batch(10, "flat7", "flat8"), _batch(11, "v12", "v13"))
  assert used == 2
  assert [p["item_id"] for p in ro.prompts] == ["flat3", "flat4"]
  assert (m["groups_kept"], m["groups_sampled"], m["prompt_batches"]) == (0, 6, 3)
  assert not total.any() and m["pg_loss"] == 0.0 and m["grad_norm"] == 0.0
  assert learner.logp.num_traces() == 1 and learner.update.num_traces() == 1


def test_two_ppo_epochs_take_two_steps_on_one_rollout(start, tokenizer):
  """ppo_epochs = 2: two optimizer steps on the same micro-batches from one rollout; the
  first is on-policy (ppo_kl 0, no clipping), the second's ppo_kl is the token mean of
  old - current log-probs after the first step (NumPy, from the old-logp pass)."""
  learner, rec, state = _learner(start, tokenizer, ppo_epochs=2)
  state, m = learner.iteration(state, _batch(1, "a", "b"))
  assert m["ok"] and m["optimizer_steps"] == 2 and int(state.step) == 2
  assert len(rec.samples) == 1 and len(rec.steps) == 2
  (_, micro1, m1), (after1, micro2, m2) = rec.steps
  assert micro1[0] is micro2[0]  # the same rollout's batches, old log-probs included
  assert abs(float(m1["ppo_kl"])) < 1e-6 and float(m1["pg_clipfrac"]) == 0.0
  (mb,) = micro1
  ro = rec.samples[0][0]
  cur = _place(ro, learner._logprobs(after1, ro, np.asarray(mb["advantages"])))
  (old,) = _masked(mb, "old_logprobs")
  want = np.mean(old - cur)
  assert abs(want) > 1e-4
  np.testing.assert_allclose(float(m2["ppo_kl"]), want, rtol=2e-3)
  np.testing.assert_allclose(m["ppo_kl"], (float(m1["ppo_kl"]) + float(m2["ppo_kl"])) / 2,
                             rtol=1e-6)


def _gspo_numpy(logp, old, rollout, adv, lengths, clip_low, clip_high, tis_cap):
  """GSPO's per-token loss (token-mean) from 1-D masked arrays, rows given by lengths."""
  rows = np.repeat(np.arange(len(lengths)), lengths)
  seq = np.array([np.mean((logp - old)[rows == i]) for i in range(len(lengths))])
  s = np.exp(seq)[rows]
  w = np.minimum(np.exp(old - rollout), tis_cap)
  return np.mean(np.maximum(-adv * s, -adv * np.clip(s, 1 - clip_low, 1 + clip_high)) * w)


def test_gspo_end_to_end_on_and_off_policy(start, tokenizer):
  """policy_loss = gspo with two epochs: the first (on-policy, sequence ratios 1) has
  pg_loss = token mean of -A * TIS weight; the second uses each sequence's ratio
  exp(mean over its tokens of logp - old), clipped to [1 - 3e-4, 1 + 4e-4] (NumPy)."""
  learner, rec, state = _learner(start, tokenizer, policy_loss="gspo", ppo_epochs=2)
  state, m = learner.iteration(state, _batch(1, "a", "b"))
  assert m["ok"] and m["optimizer_steps"] == 2 and np.isfinite(m["loss"])
  (before1, (mb,), m1), (after1, _, m2) = rec.steps
  ro = rec.samples[0][0]
  old, rollout = _masked(mb, "old_logprobs", "rollout_logprobs")
  adv = _row_adv(mb)
  lengths = np.asarray(mb["loss_mask"]).sum(-1)
  w = np.minimum(np.exp(old - rollout), 2.0)
  # (Equal response lengths make this ~0: group-centred advantages, TIS weights ~1.)
  np.testing.assert_allclose(float(m1["pg_loss"]), np.mean(-adv * w), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(m1["pg_loss"]),
                             _gspo_numpy(old, old, rollout, adv, lengths, 3e-4, 4e-4, 2.0),
                             rtol=1e-5, atol=1e-7)
  assert float(m1["pg_clipfrac"]) == 0.0
  cur = _place(ro, learner._logprobs(after1, ro, np.asarray(mb["advantages"])))
  want = _gspo_numpy(cur, old, rollout, adv, lengths, 3e-4, 4e-4, 2.0)
  np.testing.assert_allclose(float(m2["pg_loss"]), want, rtol=1e-3, atol=1e-6)
  assert float(m2["pg_clipfrac"]) > 0  # after an SGD step at lr 0.5 the tight clip bites
  np.testing.assert_allclose(float(m2["ppo_kl"]), np.mean(old - cur), rtol=2e-3)
