"""GRPO learner on the tiny model: learner batch layout, the policy loss on the generic step
(on-policy gradient = REINFORCE's, micro-batches = one batch), and one compile per shape
for the rollout, old-logp and update passes."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.algorithms.grpo import learner as learner_lib
from deepintuit_jax.algorithms.grpo import rollout as rollout_lib
from deepintuit_jax.data import batching
from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.engine import logprobs, optim
from deepintuit_jax.engine import state as train_state
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from deepintuit_jax.sampling import sampler

# The tiny model (its tokenizer decodes the rollouts) with one decoder layer and one vision
# block; the loss tests use the micro model (vocab 50): only shapes and math matter there.
CFG = tiny.tiny_config()
CFG = CFG.replace(text=dataclasses.replace(CFG.text, num_hidden_layers=1),
                  vision=dataclasses.replace(CFG.vision, depth=1, fullatt_block_indexes=(0,)))
MICRO = tiny.micro_config()
MICRO = MICRO.replace(text=dataclasses.replace(MICRO.text, num_hidden_layers=1))
OPTS = PipelineOptions(length_buckets=(96,), max_seq_len=96, patch_buckets=(64, 256),
                       max_frame_patches=16)
PAD = tiny.TOKEN_IDS["<|endoftext|>"]
PATCH_DIM = CFG.vision.patch_dim
assert MICRO.vision.patch_dim == PATCH_DIM


@pytest.fixture(scope="module")
def tokenizer():
  return tiny.build_tokenizer()


def _prompt(rng, i, cfg):
  """A generation prompt: text, one 2x4x4 video (8 merged tokens), text."""
  top = min(cfg.text.vocab_size - 10, 900)
  ids = np.concatenate([rng.integers(10, top, 3 + i % 3), [cfg.vision_start_token_id],
                        np.full(8, cfg.video_token_id), [cfg.vision_end_token_id],
                        rng.integers(10, top, 4)]).astype(np.int32)
  return dict(input_ids=ids, loss_mask=np.zeros(len(ids), np.int32),
              video_grid_thw=np.array([[2, 4, 4]], np.int32),
              second_per_grid_ts=np.array([1.0], np.float32),
              pixel_values_videos=rng.normal(size=(32, PATCH_DIM)).astype(np.float32),
              label=f"c{i % 2}", item_id=f"p{i}")


def _prompt_batch(seed, n=2, cfg=CFG):
  rng = np.random.default_rng(seed)
  return batching.collate([_prompt(rng, i, cfg) for i in range(n)], batch_size=n, options=OPTS,
                          model_config=cfg, pad_id=PAD)


def _rollout(seed=0, n=2, g=2, length=5, cfg=CFG):
  """A hand-made rollout: n prompts x g responses of 1..length tokens."""
  rng = np.random.default_rng(seed)
  prompts = rollout_lib.split_prompts(_prompt_batch(seed, n, cfg))
  lengths = rng.integers(1, length + 1, n * g).astype(np.int32)
  tokens = np.full((n * g, length), PAD, np.int32)
  logp = np.zeros((n * g, length), np.float32)
  for r, k in enumerate(lengths):
    tokens[r, :k] = rng.integers(10, min(cfg.text.vocab_size - 10, 900), k)
    logp[r, :k] = -rng.uniform(0.1, 3.0, k)
  return rollout_lib.Rollout(prompts=prompts, group_size=g, tokens=tokens, logprobs=logp,
                             lengths=lengths, texts=[""] * (n * g),
                             truncated=np.zeros(n * g, bool))


def test_split_prompts_and_micro_batch_layout():
  batch = _prompt_batch(0, 2)
  prompts = rollout_lib.split_prompts(batch)
  for i, p in enumerate(prompts):
    np.testing.assert_array_equal(p["input_ids"],
                                  batch["input_ids"][i][batch["attention_mask"][i] == 1])
    np.testing.assert_array_equal(p["pixel_values_videos"],
                                  batch["pixel_values_videos"][32 * i:32 * (i + 1)])
  ro = _rollout()
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  old = ro.logprobs - 0.25
  mb = ro.micro_batch([1], advantages=adv, options=OPTS, model_config=CFG, pad_id=PAD,
                      token_arrays={"old_logprobs": old})
  np.testing.assert_array_equal(mb["advantages"], [0.5, -0.5])  # prompt 1 = rows 2, 3
  for i, r in enumerate((2, 3)):
    p, n = ro.prompts[1]["input_ids"], int(ro.lengths[r])
    ids = mb["input_ids"][i]
    np.testing.assert_array_equal(ids[:len(p)], p)
    np.testing.assert_array_equal(ids[len(p):len(p) + n], ro.tokens[r, :n])
    assert (ids[len(p) + n:] == PAD).all() and mb["attention_mask"][i].sum() == len(p) + n
    # Logit-aligned: position t scores token t + 1, so the response starts at len(p) - 1.
    want = np.zeros(96, np.int32)
    want[len(p) - 1:len(p) - 1 + n] = 1
    np.testing.assert_array_equal(mb["loss_mask"][i], want)
    np.testing.assert_array_equal(mb["rollout_logprobs"][i][want == 1], ro.logprobs[r, :n])
    np.testing.assert_array_equal(mb["old_logprobs"][i][want == 1], old[r, :n])
    assert not mb["rollout_logprobs"][i][want == 0].any()
  # Each row carries its own copy of its prompt's video.
  np.testing.assert_array_equal(mb["pixel_values_videos"][:32], ro.prompts[1]["pixel_values_videos"])
  np.testing.assert_array_equal(mb["pixel_values_videos"][32:64], ro.prompts[1]["pixel_values_videos"])
  grouped = ro.micro_batch([0, 1], advantages=adv, options=OPTS, model_config=CFG, pad_id=PAD,
                           groups=2)
  assert grouped["input_ids"].shape == (2, 2, 96) and grouped["advantages"].shape == (2, 2)
  np.testing.assert_array_equal(grouped["advantages"], adv.reshape(2, 2))


def _setup(lr=1e-3, seed=0, cfg=CFG, tx=None):
  model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed))
  ocfg = optim.OptimConfig(learning_rate=lr, warmup_ratio=0.0, grad_clip=0.0)
  tx = tx or optim.make_optimizer(ocfg, 100)
  graphdef, state = train_state.init_state(model, tx, (), seed)
  return graphdef, state, tx, optim.schedule(ocfg, 100)


def _current_logprobs(graphdef, state, ro, adv, model_config):
  """Response-aligned log-probs of the rollout under the state's parameters."""
  cfg = learner_lib.GRPOConfig(group_size=ro.group_size, prompts_per_rollout=ro.num_prompts,
                               mini_batch_prompts=ro.num_prompts, logp_chunk=0)
  learner = learner_lib.GRPOLearner(graphdef, optax_sgd(), lambda s: 0.0, cfg=cfg,
                                    tokenizer=None, options=OPTS, model_config=model_config,
                                    pad_id=PAD)
  return learner._logprobs((state.params, state.frozen, state.rest), ro, adv)


def optax_sgd():
  import optax
  return optax.sgd(1.0)


def test_on_policy_gradient_is_reinforce_and_micro_batches_equal_one_batch():
  """With SGD at lr 1 the step's parameter change is minus its gradient: on-policy (old =
  rollout = current log-probs) it equals the REINFORCE gradient of the group advantages,
  and two micro-batches (one prompt group each) give the one-batch step."""
  graphdef, state, tx, _ = _setup(cfg=MICRO, tx=optax_sgd())
  ro = _rollout(seed=1, n=2, g=2, cfg=MICRO)
  adv = np.array([1.0, -1.0, 0.7, -0.7], np.float32)
  cur = _current_logprobs(graphdef, state, ro, adv, MICRO)
  ro = dataclasses.replace(ro, logprobs=cur)  # the rollout's own log-probs: on-policy too
  cfg = learner_lib.GRPOConfig(group_size=2, prompts_per_rollout=2, mini_batch_prompts=2,
                               logp_chunk=7)
  kw = dict(advantages=adv, options=OPTS, model_config=MICRO, pad_id=PAD,
            token_arrays={"old_logprobs": cur})
  whole = ro.micro_batch([0, 1], **kw)

  def reinforce(p, mb):
    """-(1 / tokens) sum_t A * log p(token t): REINFORCE with the group advantage."""
    lp, _ = logprobs.group_logprobs(graphdef, p, state.frozen, state.rest, mb)
    mask = mb["loss_mask"].astype(jnp.float32)
    return -jnp.sum(mb["advantages"][:, None] * lp * mask) / jnp.sum(mask)
  want = jax.jit(jax.grad(reinforce))(state.params, whole)

  step = learner_lib.TrainStep(learner_lib.make_loss_fn(graphdef, cfg), tx,
                               lambda s: 1.0, count_name="loss_weight",
                               finalize_aux=learner_lib.finalize_aux)
  parts = tuple(ro.micro_batch([i], length=96, patches=64, **kw) for i in (0, 1))
  s1, m1 = step(jax.tree.map(jnp.copy, state), (whole,))
  s2, m2 = step(jax.tree.map(jnp.copy, state), parts)
  for p0, p1, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s1.params),
                       jax.tree.leaves(want)):
    p0, p1, b = np.asarray(p0), np.asarray(p1), np.asarray(b)
    # p0 - p1 is exact only to the rounding of p1 (float32 ulps of the parameters).
    tol = 1e-4 * np.abs(b).max() + 2 * np.finfo(np.float32).eps * np.abs(p0).max()
    assert np.abs((p0 - p1) - b).max() <= tol
  assert float(m1["loss_weight"]) == float(m2["loss_weight"]) == float(ro.lengths.sum())
  for k in ("loss", "grad_norm", "pg_loss", "ppo_kl", "entropy"):
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-4, atol=1e-7)
  assert float(m1["pg_clipfrac"]) == 0.0 and abs(float(m1["ppo_kl"])) < 1e-5  # on-policy
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_old_logprobs_loss_and_entropy_use_the_sampling_temperature():
  """verl's actor divides the logits by the rollout temperature before every log-prob (old,
  current, reference) and the entropy. Here at T = 0.5: the learner's old log-probs are
  log_softmax(logits / T) of a plain forward (NumPy), the on-policy step sees ratio 1
  (ppo_kl 0), and its entropy metric is the NumPy entropy of softmax(logits / T)."""
  t = 0.5
  graphdef, state, tx, _ = _setup(cfg=MICRO, tx=optax_sgd())
  ro = _rollout(seed=2, n=2, g=2, cfg=MICRO)
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  cfg = learner_lib.GRPOConfig(group_size=2, prompts_per_rollout=2, mini_batch_prompts=2,
                               logp_chunk=0, temperature=t)
  learner = learner_lib.GRPOLearner(graphdef, optax_sgd(), lambda s: 0.0, cfg=cfg,
                                    tokenizer=None, options=OPTS, model_config=MICRO,
                                    pad_id=PAD)
  old = learner._logprobs((state.params, state.frozen, state.rest), ro, adv)
  mb = ro.micro_batch([0, 1], advantages=adv, options=OPTS, model_config=MICRO, pad_id=PAD,
                      token_arrays={"old_logprobs": old})
  model = nnx.merge(graphdef, state.params, state.frozen, state.rest)
  logits = np.asarray(jax.jit(lambda b: model(**logprobs.model_inputs(b)).logits)(mb))
  ls = _np_log_softmax(logits / t)[:, :-1]                       # position i scores i + 1
  ids = np.asarray(mb["input_ids"])[:, 1:]
  want = np.take_along_axis(ls, ids[..., None], -1)[..., 0]
  mask = np.asarray(mb["loss_mask"])[:, :-1].astype(bool)
  np.testing.assert_allclose(np.asarray(mb["old_logprobs"])[:, :-1][mask], want[mask],
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(want[mask], np.take_along_axis(
      _np_log_softmax(logits)[:, :-1], ids[..., None], -1)[..., 0][mask], atol=1e-2)
  step = learner_lib.TrainStep(learner_lib.make_loss_fn(graphdef, cfg), tx,
                               lambda s: 1.0, count_name="loss_weight",
                               finalize_aux=learner_lib.finalize_aux)
  _, m = step(jax.tree.map(jnp.copy, state), (mb,))
  assert abs(float(m["ppo_kl"])) < 1e-5 and float(m["pg_clipfrac"]) == 0.0
  ent = -(np.exp(ls) * ls).sum(-1)
  np.testing.assert_allclose(float(m["entropy"]), ent[mask].mean(), rtol=1e-4)


def test_rollout_old_logp_and_update_compile_once_per_shape(tokenizer):
  graphdef, state, tx, lr = _setup()
  cfg = learner_lib.GRPOConfig(group_size=2, prompts_per_rollout=2, mini_batch_prompts=1,
                               max_response_tokens=6, logp_chunk=64)
  learner = learner_lib.GRPOLearner(graphdef, tx, lr, cfg=cfg, tokenizer=tokenizer,
                                    options=OPTS, model_config=CFG, pad_id=PAD)
  # Counted from an empty cache, not as a difference: the difference failed once in a long
  # xdist worker on jax 0.12 (the test passes alone there), most likely an older sampler
  # entry evicted from the jit caches' shared LRU while this one was added.
  sampler._sample_jit.clear_cache()
  batches, lengths = learner._micro_batches, []

  def sized(*a, **k):  # the learner's padded lengths (cfg.length_steps grid)
    out = batches(*a, **k)
    lengths.extend(int(mb["input_ids"].shape[-1]) for mb in out)
    return out
  learner._micro_batches = sized
  for seed in range(3):  # different prompts, the same (prompt, response) buckets
    state, m = learner.iteration(state, _prompt_batch(seed))
    assert m["ok"] and m["optimizer_steps"] == 2
    assert np.isfinite(m["loss"]) and 1 <= m["response_length_mean"] <= 6
  assert int(state.step) == 6
  assert sampler._sample_jit._cache_size() == 1
  # Rows of 19 to 27 tokens: on the 16-token grid of (0, 96] (8 steps), not the bucket 96.
  assert set(lengths) <= {32} and lengths
  assert learner.logp.num_traces() == len(set(lengths)) == learner.update.num_traces()
  for k in ("reward_mean", "reward/format", "reward/accuracy", "pg_clipfrac", "ppo_kl",
            "entropy", "rollout_time", "old_logp_time", "update_time",
            "rollout_tokens_per_second", "update_tokens_per_second", "advantage_std"):
    assert k in m and np.isfinite(m[k]), k


def test_length_steps_pad_less_with_the_same_logprobs_and_loss():
  """Learner micro-batches on the finer length grid (length_steps > 1) give the log-probs
  and the update of the bucket-padded ones (length_steps 1), up to float rounding."""
  graphdef, state, tx, lr = _setup(cfg=MICRO)
  ro = _rollout(seed=3, n=2, g=2, cfg=MICRO)
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  out, shapes = [], []
  for steps in (1, 8):
    cfg = learner_lib.GRPOConfig(group_size=2, prompts_per_rollout=2, mini_batch_prompts=2,
                                 logp_chunk=0, length_steps=steps)
    learner = learner_lib.GRPOLearner(graphdef, tx, lr, cfg=cfg, tokenizer=None, options=OPTS,
                                      model_config=MICRO, pad_id=PAD)
    old = learner._logprobs((state.params, state.frozen, state.rest), ro, adv)
    micro = learner._micro_batches(ro, adv, {"old_logprobs": old})
    shapes.append(micro[0]["input_ids"].shape[-1])
    new_state, m = learner.update(jax.tree.map(jnp.copy, state), tuple(micro))
    out.append((old, m, new_state.params))
  assert shapes[0] == 96 and shapes[1] < 96 and shapes[1] % 16 == 0
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
  for k in ("loss", "entropy", "grad_norm"):
    np.testing.assert_allclose(float(out[0][1][k]), float(out[1][1][k]), rtol=1e-4, atol=1e-6)
  # AdamW's first step moves every parameter by ~lr (1e-3) whatever its gradient's size:
  # rounding in a tiny gradient shows up to ~lr times its relative error.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-4, atol=1e-5),
               out[0][2], out[1][2])


def _with_empty_row(ro, row):
  """The rollout with response `row` cut to no tokens (a policy that stopped at once)."""
  tokens, logp, lengths = ro.tokens.copy(), ro.logprobs.copy(), ro.lengths.copy()
  tokens[row], logp[row], lengths[row] = PAD, 0.0, 0
  return dataclasses.replace(ro, tokens=tokens, logprobs=logp, lengths=lengths)


def test_prompt_shared_batch_holds_each_prompt_once_and_the_responses_aligned():
  """share_prompt: each prompt and its video once; each response on its own row with its
  tokens, the sampler's and the old log-probs response-aligned, and the rotary positions
  that rope.get_rope_index gives its tokens in the full prompt ++ response row."""
  ro = _with_empty_row(_rollout(seed=4, n=2, g=3, length=6), 4)
  adv = np.linspace(-1.0, 1.0, 6).astype(np.float32)
  old = ro.logprobs - 0.25
  kw = dict(advantages=adv, options=OPTS, model_config=CFG, pad_id=PAD,
            token_arrays={"old_logprobs": old})
  rows = ro.micro_batch([0, 1], **kw)
  sh = ro.micro_batch([0, 1], share_prompt=True, **kw)
  assert sh["input_ids"].shape[0] == 2 and sh["response_ids"].shape[0] == 6
  assert sh["response_ids"].shape[1] >= int(ro.lengths.max())
  for p in (0, 1):
    ids = ro.prompts[p]["input_ids"]
    np.testing.assert_array_equal(sh["input_ids"][p][:len(ids)], ids)
    assert sh["attention_mask"][p].sum() == len(ids)
    np.testing.assert_array_equal(sh["pixel_values_videos"][32 * p:32 * (p + 1)],
                                  ro.prompts[p]["pixel_values_videos"])
  assert not sh["pixel_values_videos"][64:].any()  # two videos, not six
  for i in range(6):
    n, plen = int(ro.lengths[i]), len(ro.prompts[i // 3]["input_ids"])
    np.testing.assert_array_equal(sh["response_ids"][i][:n], ro.tokens[i, :n])
    assert (sh["response_ids"][i][n:] == PAD).all() and sh["loss_mask"][i].sum() == n
    np.testing.assert_array_equal(sh["response_position_ids"][:, i, :n],
                                  rows["position_ids"][:, i, plen:plen + n])
    np.testing.assert_array_equal(sh["rollout_logprobs"][i][:n], ro.logprobs[i, :n])
    np.testing.assert_array_equal(sh["old_logprobs"][i][:n], old[i, :n])
    assert not sh["old_logprobs"][i][n:].any()
  np.testing.assert_array_equal(sh["advantages"], adv)
  grouped = ro.micro_batch([0, 1], share_prompt=True, groups=2, **kw)
  assert grouped["input_ids"].shape[:2] == (2, 1)
  assert grouped["response_ids"].shape[:2] == (2, 3)
  assert grouped["response_position_ids"].shape[:3] == (2, 3, 3)
  np.testing.assert_array_equal(grouped["response_position_ids"][1],
                                sh["response_position_ids"][:, 3:])
  np.testing.assert_array_equal(grouped["pixel_values_videos"][1][:32],
                                ro.prompts[1]["pixel_values_videos"])


def _learner(graphdef, tx, cfg_kw, share, **kw):
  cfg = learner_lib.GRPOConfig(**cfg_kw, share_prompt=share)
  return learner_lib.GRPOLearner(graphdef, tx, lambda s: 1.0, cfg=cfg, tokenizer=None,
                                 options=OPTS, model_config=CFG, pad_id=PAD, **kw)


def _both_layouts(graphdef, state, ro, adv, tx, cfg_kw, **kw):
  """(old log-probs, step metrics, updated params) with one row per response and with
  the prompt shared (micro-batches checked to have the layout asked for)."""
  out = []
  for share in (False, True):
    learner = _learner(graphdef, tx, cfg_kw, share, **kw)
    assert learner.layout().startswith("each prompt" if share else "one prompt ++ response")
    old = learner._logprobs((state.params, state.frozen, state.rest), ro, adv)
    micro = learner._micro_batches(ro, adv, {"old_logprobs": old - 0.05})
    assert all(("response_ids" in mb) == share for mb in micro)
    new, m = learner.update(jax.tree.map(jnp.copy, state), tuple(micro))
    out.append((old, jax.device_get(m), jax.device_get(new.params)))
  return out


def _assert_same_step(state, rows, shared, scale=1.0):
  np.testing.assert_allclose(shared[0], rows[0], rtol=1e-5, atol=2e-5)
  assert float(rows[1]["loss_weight"]) == float(shared[1]["loss_weight"])
  for k in ("loss", "entropy", "grad_norm", "ppo_kl", "pg_clipfrac"):
    np.testing.assert_allclose(float(shared[1][k]), float(rows[1][k]), rtol=1e-4, atol=1e-6)
  # SGD at lr 1: the parameter change is the gradient (to the parameters' float32 ulps).
  for p0, a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(rows[2]),
                      jax.tree.leaves(shared[2])):
    p0, a, b = (np.asarray(x) for x in (p0, a, b))
    ga, gb = p0 - a, p0 - b
    tol = 1e-4 * np.abs(ga).max() + 4 * np.finfo(np.float32).eps * np.abs(p0).max()
    assert np.abs(ga - gb).max() <= tol * scale


def test_prompt_shared_learner_gives_the_rows_logprobs_and_gradient():
  """The learner's old log-probs, loss metrics and gradient (an SGD step at lr 1) are those
  of one prompt ++ response row per response, to float rounding: prompts of different
  lengths (padding between prompt and response), a response with no tokens, chunked
  log-probs, two micro-batches accumulated, the sampling temperature applied."""
  graphdef, state, tx, _ = _setup(cfg=CFG, tx=optax_sgd())
  ro = _with_empty_row(_rollout(seed=5, n=4, g=3, length=7), 7)
  adv = np.linspace(-1.0, 1.0, 12).astype(np.float32)
  cfg_kw = dict(group_size=3, prompts_per_rollout=4, mini_batch_prompts=4,
                micro_batch_prompts=2, logp_chunk=5, temperature=0.7)
  rows, shared = _both_layouts(graphdef, state, ro, adv, tx, cfg_kw)
  assert float(rows[1]["ppo_kl"]) < -0.04  # old = current - 0.05: the ratio term is live
  _assert_same_step(state, rows, shared)


def test_prompt_shared_learner_on_a_mesh_with_data_parallel_groups():
  """On 4 CPU devices (mesh 2 x 2: data x fsdp, two batch groups of whole prompts, each
  device running the vision tower on its group's videos): the prompt-shared learner equals
  the one-row-per-response learner."""
  from deepintuit_jax.core import sharding as sharding_lib
  mesh = sharding_lib.make_mesh((2, 2, 1), devices=jax.devices()[:4])
  graphdef, state, tx, _ = _setup(cfg=CFG, tx=optax_sgd())
  shardings = train_state.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  ro = _rollout(seed=6, n=4, g=2, length=6)
  adv = np.linspace(-1.0, 1.0, 8).astype(np.float32)
  cfg_kw = dict(group_size=2, prompts_per_rollout=4, mini_batch_prompts=4, logp_chunk=0)
  rows, shared = _both_layouts(graphdef, state, ro, adv, tx, cfg_kw, mesh=mesh,
                               state_sharding=shardings, groups=2)
  _assert_same_step(state, rows, shared)
  # One prompt per micro-batch cannot split over 2 groups: rows, and the summary says why.
  one = _learner(graphdef, tx, dict(cfg_kw, micro_batch_prompts=1), True, mesh=mesh,
                 state_sharding=shardings, groups=2)
  assert not one._shares_prompt()
  assert "1 prompts per micro-batch do not divide over 2 batch groups" in one.layout()
  assert all("response_ids" not in mb for mb in one._micro_batches(ro, adv))
