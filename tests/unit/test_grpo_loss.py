"""GRPO losses, aggregation and KL against NumPy transcriptions of verl's formulas and
hand-worked cases; the REINFORCE gradient on-policy; micro-batch accumulation."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepintuit_jax.algorithms.grpo import loss

MODES = loss.AGG_MODES


# ----------------------------------------------------------------------------- references
def _ref_aggregate(v, m, mode):
  """Loop transcription; rows without a masked token are not sequences."""
  seqs = [(row, mrow) for row, mrow in zip(v, m) if mrow.sum() > 0]
  if mode == "token-mean":
    return sum(x for row, mrow in seqs for x, k in zip(row, mrow) if k) / m.sum()
  sums = [sum(x for x, k in zip(row, mrow) if k) for row, mrow in seqs]
  if mode == "seq-mean-token-sum":
    return sum(sums) / len(seqs)
  if mode == "seq-mean-token-mean":
    return sum(s / mrow.sum() for s, (_, mrow) in zip(sums, seqs)) / len(seqs)
  return sum(s / v.shape[1] for s in sums) / len(seqs)


def _ref_vanilla(logp, old, adv, rollout=None, lo=0.2, hi=0.28, c=3.0, cap=2.0):
  """Per-token loss, d(loss)/d(logp), clip flags, -log ratio; NumPy, element by element."""
  adv = np.broadcast_to(adv if adv.ndim == 2 else adv[:, None], logp.shape)
  out = np.zeros((5,) + logp.shape)
  for idx in np.ndindex(logp.shape):
    a, d = adv[idx], logp[idx] - old[idx]
    dc = min(max(d, -20.0), 20.0)
    ratio = math.exp(dc)
    pg1, pg2 = -a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi)
    l = max(pg1, pg2)
    # gradient flows through pg1 (or the identical pg2) only while the ratio is unclipped
    grad = -a * ratio if (pg1 >= pg2 and -20 < d < 20) else 0.0
    lower = a < 0 and l > -a * c
    if a < 0 and -a * c < l:
      l, grad = -a * c, 0.0
    w = 1.0 if rollout is None else min(math.exp(old[idx] - rollout[idx]), cap)
    out[:, idx[0], idx[1]] = (l * w, grad * w, float(pg2 > pg1), float(lower), -dc)
  return out


def _ref_gspo(logp, old, adv, mask, lo=3e-4, hi=4e-4):
  adv = np.broadcast_to(adv[:, None], logp.shape)
  out = np.zeros((3,) + logp.shape)
  for i in range(logp.shape[0]):
    s = math.exp(min((((logp[i] - old[i]) * mask[i]).sum() / max(mask[i].sum(), 1)), 10.0))
    for t in range(logp.shape[1]):
      a = adv[i, t]
      pg1, pg2 = -a * s, -a * min(max(s, 1 - lo), 1 + hi)
      out[:, i, t] = (max(pg1, pg2), -a * s if pg1 >= pg2 else 0.0, float(pg2 > pg1))
  return out


def _agg_weights(mask, mode):
  """d(aggregate)/d(values) [B, L]: the weight each token gets in each mode."""
  n = mask.sum(-1, keepdims=True)
  seqs = (n > 0).sum()
  if mode == "token-mean":
    return mask / mask.sum()
  if mode == "seq-mean-token-sum":
    return mask / seqs
  if mode == "seq-mean-token-mean":
    return mask / np.maximum(n, 1) / seqs
  return mask / mask.shape[1] / seqs


def _batch(seed=0, b=6, l=7):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.5, 0.5, (b, l))
  logp = old + rng.normal(0, 0.4, (b, l))         # ratios from ~0.3 to ~3: every branch
  rollout = old + rng.normal(0, 0.6, (b, l))
  adv = rng.normal(0, 1.0, b)
  adv[0], logp[0, 0] = -1.0, old[0, 0] + 1.5      # ratio e^1.5 > 3 with A < 0: dual clip
  logp[1, 0] = old[1, 0] + 25.0                   # beyond the +-20 clamp of the exponent
  n = rng.integers(1, l + 1, b)
  mask = (np.arange(l)[None] < n[:, None]).astype(np.float64)
  return logp, old, rollout, adv, mask


# ----------------------------------------------------------------------------- hand cases
def test_vanilla_hand_worked():
  # Four real tokens and one padded one (garbage values must not count).
  logp = np.log([[1.5, 0.5, 4.0, 1.0, 50.0]])
  old = np.zeros((1, 5))
  adv = np.array([[1.0, -1.0, -1.0, 2.0, -7.0]])
  mask = np.array([[1, 1, 1, 1, 0]])
  # token 1: A=1,  r=1.5: max(-1.5, -1.28) = -1.28 (clip-higher active)
  # token 2: A=-1, r=0.5: max(0.5, 0.8) = 0.8 (lower clip active); dual bound 3 inactive
  # token 3: A=-1, r=4:   max(4, 1.28) = 4 -> min(4, 3) = 3 (dual clip active)
  # token 4: A=2,  r=1:   -2
  value, metrics = loss.policy_loss(logp, old, adv, mask)
  np.testing.assert_allclose(value, (-1.28 + 0.8 + 3.0 - 2.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_clipfrac"], 0.5)
  np.testing.assert_allclose(metrics["pg_clipfrac_lower"], 0.25)
  np.testing.assert_allclose(metrics["ppo_kl"], -math.log(3.0) / 4, rtol=1e-6)  # -(ln 1.5+ln .5+ln 4)/4
  # TIS weights min(exp(old - rollout), 2) = [1, 2 (3 capped), 0.5, 1].
  rollout = -np.log([[1.0, 3.0, 0.5, 1.0, 9.0]])
  value, _ = loss.policy_loss(logp, old, adv, mask, rollout_logp=rollout)
  np.testing.assert_allclose(value, (-1.28 + 1.6 + 1.5 - 2.0) / 4, rtol=1e-6)


def test_aggregate_hand_worked():
  v = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  m = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row is all padding
  expected = {"token-mean": 7 / 3, "seq-mean-token-sum": 3.5, "seq-mean-token-mean": 2.75,
              "seq-mean-token-sum-norm": (3 / 3 + 4 / 3) / 2}
  for mode, want in expected.items():
    np.testing.assert_allclose(loss.aggregate(v, m, mode), want, rtol=1e-6, err_msg=mode)
  np.testing.assert_allclose(loss.aggregate(v, m, "seq-mean-token-sum-norm", norm_length=10),
                             (0.3 + 0.4) / 2, rtol=1e-6)
  assert float(loss.aggregate(v, np.zeros_like(m), "token-mean")) == 0.0  # nothing to average


def test_kl_hand_worked_and_numpy():
  logp, ref = np.zeros((1, 1)), np.full((1, 1), math.log(2.0))
  want = {"k1": -0.693147, "kl": -0.693147, "abs": 0.693147, "k2": 0.240227, "mse": 0.240227,
          "k3": 0.306853, "low_var_kl": 0.306853}   # k3 = 2 - ln 2 - 1
  for kind, w in want.items():
    np.testing.assert_allclose(loss.kl_penalty(logp, ref, kind)[0, 0], w, atol=1e-6, err_msg=kind)
  # verl's clamps: ref - logp clipped to [-20, 20], k3 to [-10, 10].
  assert float(loss.kl_penalty(np.zeros((1, 1)), np.full((1, 1), 30.0), "k3")[0, 0]) == 10.0
  rng = np.random.default_rng(1)
  a, b = rng.normal(0, 1, (3, 4)), rng.normal(0, 1, (3, 4))
  for kind, fn in {"k1": lambda: a - b, "abs": lambda: np.abs(a - b),
                   "k2": lambda: 0.5 * (a - b) ** 2,
                   "k3": lambda: np.exp(b - a) - (b - a) - 1}.items():
    np.testing.assert_allclose(loss.kl_penalty(a, b, kind), fn(), rtol=1e-5, atol=1e-6)


def test_entropy_from_logits():
  logits = np.random.default_rng(2).normal(0, 3, (2, 3, 11))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(loss.entropy_from_logits(logits), -(p * np.log(p)).sum(-1),
                             rtol=1e-5)
  np.testing.assert_allclose(loss.entropy_from_logits(np.zeros((4,))), math.log(4), rtol=1e-6)


# ----------------------------------------------------------------------------- transcriptions
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tis", [False, True])
def test_vanilla_against_numpy(mode, tis):
  logp, old, rollout, adv, mask = _batch()
  ref = _ref_vanilla(logp, old, adv, rollout if tis else None)
  per_token, dper_token, clip, lower, kl = ref
  assert (clip * mask).sum() > 0 and (lower * mask).sum() > 0  # both clip branches exercised
  kw = dict(rollout_logp=rollout if tis else None, agg=mode)
  value, metrics = loss.policy_loss(logp, old, adv, mask, **kw)
  np.testing.assert_allclose(value, _ref_aggregate(per_token, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(metrics["pg_clipfrac"], (clip * mask).sum() / mask.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_clipfrac_lower"], (lower * mask).sum() / mask.sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["ppo_kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)
  grad = jax.grad(lambda x: loss.policy_loss(x, old, adv, mask, **kw)[0])(logp)
  np.testing.assert_allclose(grad, dper_token * _agg_weights(mask, mode), rtol=1e-4, atol=1e-7)


def test_clip_higher_is_asymmetric():
  # ratio 1.25 with A > 0 is inside [0.8, 1.28]: no clip; ratio 0.75 with A < 0 is clipped.
  logp = np.log([[1.25, 0.75]])
  value, metrics = loss.policy_loss(logp, np.zeros((1, 2)), np.array([[1.0, -1.0]]),
                                    np.ones((1, 2)))
  np.testing.assert_allclose(value, (-1.25 + 0.8) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["pg_clipfrac"], 0.5)
  _, m2 = loss.policy_loss(logp, np.zeros((1, 2)), np.array([[1.0, -1.0]]), np.ones((1, 2)),
                           clip_high=0.2)
  np.testing.assert_allclose(m2["pg_clipfrac"], 1.0)  # symmetric 0.2 clips 1.25 too


@pytest.mark.parametrize("tis", [False, True])
def test_gspo_against_numpy(tis):
  logp, old, rollout, adv, mask = _batch(seed=3)
  logp = old + (logp - old) * 2e-3      # GSPO's clip range is ~1e-4: use tiny ratios
  ref_loss, ref_grad, clip = _ref_gspo(logp, old, adv, mask)
  assert 0 < (clip * mask).sum() < mask.sum()
  w = np.minimum(np.exp(old - rollout), 2.0) if tis else 1.0
  value, metrics = loss.gspo_loss(logp, old, adv, mask, rollout_logp=rollout if tis else None)
  mode = "seq-mean-token-mean"
  np.testing.assert_allclose(value, _ref_aggregate(ref_loss * w, mask, mode), rtol=1e-5)
  np.testing.assert_allclose(metrics["pg_clipfrac"], (clip * mask).sum() / mask.sum(), rtol=1e-6)
  assert float(metrics["pg_clipfrac_lower"]) == 0.0
  grad = jax.grad(lambda x: loss.gspo_loss(x, old, adv, mask,
                                           rollout_logp=rollout if tis else None)[0])(logp)
  np.testing.assert_allclose(grad, ref_grad * w * _agg_weights(mask, mode), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", ["vanilla", "gspo"])
@pytest.mark.parametrize("mode", MODES)
def test_on_policy_gradient_is_reinforce(name, mode):
  _, old, _, adv, mask = _batch(seed=4)
  fn = loss.get(name)

  def value(logp):
    total, count, _ = fn(logp, old, adv, mask, rollout_logp=old, agg=mode)
    return total / count

  grad = jax.grad(value)(jnp.asarray(old, jnp.float32))
  # d/dlogp of the aggregate of -A * logp: -A times each token's aggregation weight.
  np.testing.assert_allclose(grad, -adv[:, None] * _agg_weights(mask, mode), rtol=1e-5,
                             atol=1e-8)
  if mode == "token-mean":
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["vanilla", "gspo"])
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_equal_one_batch(name, mode):
  logp, old, rollout, adv, mask = _batch(seed=5, b=6)
  mask[2] = 0   # a filler row with no tokens
  fn = jax.jit(lambda *a: loss.get(name)(*a[:4], rollout_logp=a[4], agg=mode))
  total, count, aux = fn(logp, old, adv, mask, rollout)

  def accumulated(x):
    parts = [loss.get(name)(x[s], old[s], adv[s], mask[s], rollout_logp=rollout[s], agg=mode)
             for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    t = sum(p[0] for p in parts)
    c = sum(p[1] for p in parts)
    a = {k: sum(p[2][k] for p in parts) for k in parts[0][2]}
    return t / c, a

  one = lambda x: loss.get(name)(x, old, adv, mask, rollout_logp=rollout, agg=mode)
  value, aux_acc = accumulated(logp)
  np.testing.assert_allclose(value, total / count, rtol=1e-6)
  for k, v in loss.finalize_metrics(aux_acc).items():
    np.testing.assert_allclose(v, loss.finalize_metrics(aux)[k], rtol=1e-6, atol=1e-8)
  g_acc = jax.grad(lambda x: accumulated(x)[0])(logp)
  g_one = jax.grad(lambda x: one(x)[0] / one(x)[1])(logp)
  np.testing.assert_allclose(g_acc, g_one, rtol=1e-5, atol=1e-8)


def test_sequence_and_token_advantages_agree():
  logp, old, rollout, adv, mask = _batch(seed=6)
  for name in loss.names():
    a = loss.get(name)(logp, old, adv, mask, rollout_logp=rollout)
    b = loss.get(name)(logp, old, np.repeat(adv[:, None], logp.shape[1], 1), mask,
                       rollout_logp=rollout)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1])


def test_errors():
  z = np.zeros((2, 3))
  with pytest.raises(ValueError, match=r"unknown policy loss 'vanila'; known: gspo, vanilla"):
    loss.get("vanila")
  with pytest.raises(ValueError, match="already registered"):
    loss.register("gspo")(lambda *a, **k: None)
  with pytest.raises(ValueError, match=r"unknown loss aggregation mode 'mean'; known: token-mean"):
    loss.aggregate(z, z, "mean")
  with pytest.raises(ValueError, match="unknown KL kind 'k4'"):
    loss.kl_penalty(z, z, "k4")
  with pytest.raises(ValueError, match="advantages shape"):
    loss.policy_loss(z, z, np.zeros(3), z)
  with pytest.raises(ValueError, match="old_logp shape"):
    loss.policy_loss(z, np.zeros((2, 4)), np.zeros(2), z)
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    loss.policy_loss(z, z, np.zeros(2), z, dual_clip=1.0)
