"""KV-cache sampler: greedy == step-by-step argmax, stop tokens, top-p, determinism; G
samples under one shared prompt cache == the former G-fold copied cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from deepintuit_jax.sampling.sampler import choose_tokens, generate, sample, top_p_filter

CFG = tiny.micro_config()
N = 6


@pytest.fixture(scope="module")
def model() -> Qwen2_5_VL:
  m = Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))
  # Larger weights make the tiny model's next-token distribution input-dependent
  # (greedy margins >> float error) while sampling stays far from deterministic.
  emb, head = m.model.embed_tokens.embedding, m.lm_head.kernel
  emb.set_value(emb[...] * 3.0)
  head.set_value(head[...] * 10.0)
  return m


def _prompts():
  """Left-padded [3, 7] prompts and the same prompts right-padded."""
  rng = np.random.default_rng(0)
  lens = [7, 4, 5]
  rows = [rng.integers(1, 40, n) for n in lens]
  left = np.zeros((3, 7), np.int32)
  right = np.zeros((3, 7), np.int32)
  lmask = np.zeros((3, 7), np.int32)
  rmask = np.zeros((3, 7), np.int32)
  for i, r in enumerate(rows):
    left[i, 7 - len(r):], lmask[i, 7 - len(r):] = r, 1
    right[i, :len(r)], rmask[i, :len(r)] = r, 1
  return left, lmask, right, rmask


@nnx.jit
def _log_probs_jit(model, ids, mask):
  return model(ids, mask).logits


def _log_probs(model, ids, mask, temperature: float = 1.0) -> np.ndarray:
  """Full-forward log-probs [B, T, V] of logits / temperature, in NumPy (the forward is
  jitted: eager dispatch is slow on 2 cores)."""
  z = np.asarray(_log_probs_jit(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
  z = z / temperature
  z = z - z.max(-1, keepdims=True)
  return (z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32)


def _reference_greedy(model, ids, mask, n):
  """Argmax decoding with the full forward (no cache), one token at a time.

  The sequence is kept at its final length [B, P + n]: causal attention makes the logits at
  position t independent of later (not yet chosen) tokens, so one compiled forward serves.
  """
  b, p = ids.shape
  ids = np.concatenate([ids, np.zeros((b, n), ids.dtype)], 1)
  mask = np.concatenate([mask, np.ones((b, n), mask.dtype)], 1)
  tokens, logps = [], []
  for i in range(n):
    logp = _log_probs(model, ids, mask)[:, p - 1 + i]
    tok = logp.argmax(-1)
    logps.append(logp[np.arange(b), tok])
    tokens.append(tok)
    ids[:, p + i] = tok
  return np.stack(tokens, 1), np.stack(logps, 1)


def test_greedy_equals_full_forward_argmax(model):
  left, lmask, right, rmask = _prompts()
  want_tok, want_lp = _reference_greedy(model, left, lmask, N)
  assert len(set(map(tuple, want_tok))) > 1  # the rows do differ
  for ids, mask in ((left, lmask), (right, rmask)):
    tok, lp, lengths = generate(model, ids, mask, max_new_tokens=N)
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(lengths, N)


def test_stop_tokens_end_rows_independently(model):
  left, lmask, _, _ = _prompts()
  free, _, _ = generate(model, left, lmask, max_new_tokens=N)
  stop = int(free[0, 2])
  first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in free]
  tok, lp, lengths = generate(model, left, lmask, max_new_tokens=N, stop_token_ids=[stop, 49],
                              pad_token_id=-7)
  for r, f in enumerate(first):
    n = N if f is None else f + 1
    assert lengths[r] == n
    np.testing.assert_array_equal(tok[r, :n], free[r, :n])
    assert (tok[r, n:] == -7).all() and (lp[r, n:] == 0).all()
    assert (lp[r, :n] < 0).all()


def test_sampling_is_deterministic_per_seed_and_logprobs_are_of_the_scaled_logits(model):
  left, lmask, _, _ = _prompts()
  kw = dict(max_new_tokens=N, temperature=1.5, top_p=0.9)
  a = generate(model, left, lmask, rng=3, **kw)
  b = generate(model, left, lmask, rng=jax.random.key(3), **kw)
  c = generate(model, left, lmask, rng=4, **kw)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  # Reported log-probs are of logits / temperature (no top-p renormalisation), as verl's
  # actor scores a rollout.
  ids = np.concatenate([left, a[0][:, :-1]], 1)
  mask = np.concatenate([lmask, np.ones_like(a[0][:, :-1])], 1)
  logp = _log_probs(model, ids, mask, temperature=1.5)[:, 6:]
  want = np.take_along_axis(logp, a[0][..., None], -1)[..., 0]
  np.testing.assert_allclose(a[1], want, rtol=1e-4, atol=1e-4)


def test_num_samples_shares_one_prefill(model):
  left, lmask, _, _ = _prompts()
  single, single_lp, _ = generate(model, left, lmask, max_new_tokens=N)
  tok, lp, lengths = generate(model, left, lmask, max_new_tokens=N, num_samples=2)
  np.testing.assert_array_equal(tok, np.repeat(single, 2, 0))
  np.testing.assert_allclose(lp, np.repeat(single_lp, 2, 0), rtol=1e-5, atol=1e-5)
  tok, lp, _ = generate(model, left, lmask, max_new_tokens=N, num_samples=4, temperature=1.0,
                        rng=1)
  assert tok.shape == (12, N)
  assert len({tuple(r) for r in tok[:4]}) > 1  # independent samples within a group
  ids = np.concatenate([np.repeat(left, 4, 0), tok[:, :-1]], 1)
  mask = np.concatenate([np.repeat(lmask, 4, 0), np.ones_like(tok[:, :-1])], 1)
  logp = _log_probs(model, ids, mask)[:, 6:]
  np.testing.assert_allclose(lp, np.take_along_axis(logp, tok[..., None], -1)[..., 0],
                             rtol=1e-4, atol=1e-4)


@nnx.jit
def _prefill(model, batch, cache, keep):
  return model(**batch, cache=cache, logits_to_keep=keep)


@nnx.jit
def _decode(model, tok, cache):
  return model(tok[:, None], jnp.ones(tok.shape + (1,), bool), cache=cache)


def _copied_cache_greedy(model, batch, g, n):
  """The sampler as it was before the shared prompt cache (greedy), written with the
  model's plain cache: prefill into [B, P + N] slots, copy the cache G times, decode."""
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  b, p = ids.shape
  last = (p - 1 - np.argmax(mask[:, ::-1], 1))[:, None].astype(np.int32)
  out = _prefill(model, batch, model.init_cache(b, p + n), jnp.asarray(last))
  rep = lambda x: x if x.ndim == 0 else jnp.repeat(x, g, axis=0)
  logits, cache = rep(out.logits[:, 0]), jax.tree.map(rep, out.cache)
  tokens, logps = [], []
  for i in range(n):
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    tok = logp.argmax(-1).astype(np.int32)
    tokens.append(tok)
    logps.append(logp[np.arange(len(tok)), tok])
    if i < n - 1:
      out = _decode(model, jnp.asarray(tok), cache)
      logits, cache = out.logits[:, 0], out.cache
  return np.stack(tokens, 1), np.stack(logps, 1)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_shared_prompt_cache_equals_copied_cache_and_full_forward(model, pad):
  """G = 3 rows per prompt decoding under one stored prompt cache give the tokens and
  log-probs of the former G-fold copy (to float rounding: the values' sum is split in two)
  and of the plain forward without a cache."""
  left, lmask, right, rmask = _prompts()
  ids, mask = (left, lmask) if pad == "left" else (right, rmask)
  g = 3
  want_tok, want_lp = _copied_cache_greedy(
      model, dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask).astype(bool)),
      g, N)
  tok, lp, lengths = generate(model, ids, mask, max_new_tokens=N, num_samples=g)
  np.testing.assert_array_equal(tok, want_tok)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-6, atol=1e-6)
  ref_tok, ref_lp = _reference_greedy(model, left, lmask, N)
  np.testing.assert_array_equal(tok, np.repeat(ref_tok, g, 0))
  np.testing.assert_allclose(lp, np.repeat(ref_lp, g, 0), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(lengths, N)


def test_shared_prompt_cache_with_video_prompts_equals_copied_cache(model):
  """Video prompts (the GRPO rollout's case: vision tower and 3-row rope positions in the
  prefill), right-padded to one length: the same greedy tokens and log-probs as the copied
  cache."""
  from tests.unit.test_grpo_learner import _prompt_batch
  b = _prompt_batch(3, 3, cfg=CFG)
  batch = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids",
                             "pixel_values_videos", "video_layout")}
  batch = jax.tree.map(jnp.asarray, batch)
  batch["attention_mask"] = batch["attention_mask"].astype(bool)
  g, n = 2, 5
  want_tok, want_lp = _copied_cache_greedy(model, batch, g, n)
  out = sample(model, batch["input_ids"], batch["attention_mask"], rng=jax.random.key(0),
               max_new_tokens=n, position_ids=batch["position_ids"],
               pixel_values_videos=batch["pixel_values_videos"],
               video_layout=batch["video_layout"], num_samples=g)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tok)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_lp, rtol=1e-6, atol=1e-6)
  assert len({tuple(r) for r in want_tok}) > 1


def test_top_p_filter_keeps_the_nucleus():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, jnp.float32(p))))[0]
  np.testing.assert_array_equal(kept(0.5), [False, True, False, False])
  np.testing.assert_array_equal(kept(0.7), [False, True, False, True])
  np.testing.assert_array_equal(kept(0.85), [False, True, True, True])
  np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
  np.testing.assert_array_equal(kept(1e-6), [False, True, False, False])


def test_top_p_sampling_frequencies():
  b = 4000
  logits = jnp.log(jnp.tile(jnp.asarray([[0.05, 0.5, 0.15, 0.3]], jnp.float32), (b, 1)))
  tok, lp = choose_tokens(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(0.7))
  freq = np.bincount(np.asarray(tok), minlength=4) / b
  assert freq[0] == freq[2] == 0
  np.testing.assert_allclose(freq[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
  np.testing.assert_allclose(np.asarray(lp), np.log(np.array([0.05, 0.5, 0.15, 0.3]))[np.asarray(tok)],
                             rtol=1e-5)


def test_top_p_one_is_plain_temperature_sampling():
  """top_p = 1 keeps every token: frequencies follow softmax(logits / T) (NumPy), including
  a token of 2% mass that any nucleus below 0.98 would drop; T = 0 is the argmax."""
  probs = np.array([0.02, 0.48, 0.2, 0.3])
  t = 0.7
  want = probs ** (1 / t) / (probs ** (1 / t)).sum()  # softmax(log p / T)
  b = 6000
  logits = jnp.log(jnp.tile(jnp.asarray(probs[None], jnp.float32), (b, 1)))
  tok, _ = choose_tokens(logits, jax.random.key(5), jnp.float32(t), jnp.float32(1.0))
  freq = np.bincount(np.asarray(tok), minlength=4) / b
  np.testing.assert_allclose(freq, want, atol=0.02)
  assert freq[0] > 0
  rows = np.random.default_rng(1).normal(size=(64, 50)).astype(np.float32) * 3
  greedy, _ = choose_tokens(jnp.asarray(rows), jax.random.key(5), jnp.float32(0.0),
                            jnp.float32(0.3))
  np.testing.assert_array_equal(np.asarray(greedy), rows.argmax(-1))


def test_argument_errors(model):
  ids = np.ones((1, 3), np.int32)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sample(model, ids, ids, rng=jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="num_samples"):
    sample(model, ids, ids, rng=jax.random.key(0), max_new_tokens=2, num_samples=0)
  with pytest.raises(ValueError, match="top_p"):
    sample(model, ids, ids, rng=jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="position_ids"):
    sample(model, ids, ids, rng=jax.random.key(0), max_new_tokens=2,
           pixel_values_videos=np.zeros((4, CFG.vision.patch_dim)), video_layout=object())
