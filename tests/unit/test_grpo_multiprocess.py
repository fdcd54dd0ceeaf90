"""GRPO across processes, checked on one: the global prompt index of a process's rows, the
gathered rollout arrays and counters (a stand-in allgather plays two processes), and the
sampler's per-prompt streams (a prompt samples the same responses whatever batch, group or
process it is in), grouped prompts (per-group prefill) included."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from deepintuit_jax.algorithms.grpo import collective
from deepintuit_jax.algorithms.grpo import rollout as rollout_lib
from deepintuit_jax.core import sharding
from deepintuit_jax.data import batching
from deepintuit_jax.data.examples import PipelineOptions
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from deepintuit_jax.sampling import sampler

CFG = tiny.tiny_config()
CFG = CFG.replace(text=dataclasses.replace(CFG.text, num_hidden_layers=1),
                  vision=dataclasses.replace(CFG.vision, depth=1, fullatt_block_indexes=(0,)))
OPTS = PipelineOptions(length_buckets=(32,), max_seq_len=32, patch_buckets=(64, 128),
                       max_frame_patches=16)
PAD = tiny.TOKEN_IDS["<|endoftext|>"]


def two_processes(per_process: list[np.ndarray]):
  """An allgather as two processes would see it: process p contributed per_process[p]."""
  def allgather(x):
    assert np.shape(x) == np.shape(per_process[0])
    return np.stack(per_process)
  return allgather


def test_global_prompt_ids_follow_the_loaders_interleave():
  # Process p takes global elements p, p + P, ...: local prompt r is global r * P + p.
  np.testing.assert_array_equal(collective.global_prompt_ids(3, 0, 1), [0, 1, 2])
  np.testing.assert_array_equal(collective.global_prompt_ids(3, 0, 2), [0, 2, 4])
  np.testing.assert_array_equal(collective.global_prompt_ids(3, 1, 2), [1, 3, 5])
  np.testing.assert_array_equal(collective.global_prompt_ids(2, 2, 4), [2, 6])


def test_gather_rows_puts_each_group_at_its_global_prompt():
  # G = 2; process 0 holds global prompts 0, 2 (rows a0 a1 | c0 c1), process 1 prompts 1, 3.
  p0 = np.array([10, 11, 30, 31])
  p1 = np.array([20, 21, 40, 41])
  got = collective.gather_rows({"x": p0}, 2, allgather=two_processes([p0, p1]))["x"]
  np.testing.assert_array_equal(got, [10, 11, 20, 21, 30, 31, 40, 41])
  with pytest.raises(ValueError, match="whole groups"):
    collective.gather_rows({"x": p0[:3]}, 2, allgather=two_processes([p0[:3], p1[:3]]))


def test_reduce_scalars_sums_and_maxes_over_processes():
  # values sorted by name: a, b, c
  fake = two_processes([np.array([1.0, 5.0, 2.0]), np.array([3.0, 4.0, 7.0])])
  got = collective.reduce_scalars(dict(a=1.0, b=5.0, c=2.0), dict(a="sum", b="max", c="min"),
                                  allgather=fake)
  assert got == dict(a=4.0, b=5.0, c=2.0)
  with pytest.raises(ValueError, match="unknown reduction"):
    collective.reduce_scalars(dict(a=1.0), dict(a="mean"))


def test_rollout_stats_by_hand():
  rows = dict(total=np.array([2.0, 0.0, 1.0, 1.0]), lengths=np.array([3, 5, 8, 4]),
              truncated=np.array([False, False, True, False]),
              advantages=np.array([1.0, -1.0, 0.0, 0.0]),
              **{"reward/format": np.array([1.0, 0.0, 1.0, 1.0]),
                 "reward/accuracy": np.array([1.0, 0.0, 0.0, 0.0])})
  got = collective.rollout_stats(rows, 2)
  assert got["groups_all_equal"] == 0.5  # group 0 (2, 0) varies, group 1 (1, 1) does not
  # mean 1, population variance (1 + 1 + 0 + 0) / 4 = 0.5
  assert got["reward_mean"] == 1.0 and got["reward_std"] == pytest.approx(0.5 ** 0.5)
  assert got["response_length_mean"] == 5.0 and got["response_length_max"] == 8.0
  assert got["response_truncated"] == 0.25 and got["rollout_tokens"] == 20.0
  assert got["advantage_std"] == pytest.approx(0.5 ** 0.5) and got["advantage_min"] == -1.0
  assert got["format_rate"] == got["reward/format"] == 0.75
  assert got["accuracy"] == got["reward/accuracy"] == 0.25


def test_local_rows_of_a_placed_batch_on_one_process():
  mesh = sharding.make_mesh()
  x = np.arange(8 * 3).reshape(8, 3)
  placed = sharding.place_batch({"input_ids": x[:, None]}, mesh)["input_ids"]
  assert sharding.row_sharding(mesh, placed.shape).spec[0] is not None
  np.testing.assert_array_equal(sharding.local_rows(placed, mesh)[:, 0], x)


# ------------------------------------------------------------------------ sampler streams
def _prompt(rng, i):
  ids = np.concatenate([rng.integers(10, 900, 3 + i), [CFG.vision_start_token_id],
                        np.full(8, CFG.video_token_id), [CFG.vision_end_token_id],
                        rng.integers(10, 900, 2)]).astype(np.int32)
  return dict(input_ids=ids, loss_mask=np.zeros(len(ids), np.int32),
              video_grid_thw=np.array([[2, 4, 4]], np.int32),
              second_per_grid_ts=np.array([1.0], np.float32),
              pixel_values_videos=rng.normal(size=(32, CFG.vision.patch_dim)).astype(np.float32),
              label="c0", item_id=f"p{i}")


@pytest.fixture(scope="module")
def model():
  return Qwen2_5_VL(CFG, rngs=nnx.Rngs(0))


def _sample(model, batch, row_ids, g=3):
  inputs = sharding.as_groups({k: batch[k] for k in rollout_lib.SAMPLER_KEYS})
  out = sampler.sample(model, inputs["input_ids"], inputs["attention_mask"],
                       rng=jax.random.key(7), max_new_tokens=6, temperature=1.0,
                       stop_token_ids=(), pad_token_id=PAD, position_ids=inputs["position_ids"],
                       pixel_values_videos=inputs["pixel_values_videos"],
                       video_layout=inputs["video_layout"], num_samples=g,
                       row_ids=np.asarray(row_ids, np.int32).reshape(
                           inputs["input_ids"].shape[:2]))
  return np.asarray(out.tokens), np.asarray(out.logprobs)


def test_a_prompt_samples_the_same_in_any_batch_group_or_position(model):
  rng = np.random.default_rng(0)
  prompts = [_prompt(rng, i) for i in range(3)]
  kw = dict(options=OPTS, model_config=CFG, pad_id=PAD, length=32, patches=64)
  flat = batching.collate(prompts[:2], batch_size=2, **kw)
  grouped = batching.collate(prompts[:2], batch_size=2, groups=2, **kw)
  swapped = batching.collate(prompts[1::-1], batch_size=2, **kw)
  # Prompt 1 next to another prompt (the same shapes: no new compile).
  other = batching.collate([prompts[1], prompts[2]], batch_size=2, **kw)
  tok, lp = _sample(model, flat, [0, 1])
  assert len({tuple(t) for t in tok}) > 1  # temperature 1: the 6 rows differ
  # As two batch groups (a per-group prefill, as each process's devices run it).
  tok_g, lp_g = _sample(model, grouped, [0, 1])
  np.testing.assert_array_equal(tok_g, tok)
  np.testing.assert_allclose(lp_g, lp, atol=1e-5)
  # Rows in another order (as another process count lays them out) keep their streams.
  tok_s, _ = _sample(model, swapped, [1, 0])
  np.testing.assert_array_equal(tok_s[3:], tok[:3])
  np.testing.assert_array_equal(tok_s[:3], tok[3:])
  # In another batch, under its global index, a prompt draws the responses it drew before.
  tok_o, lp_o = _sample(model, other, [1, 9])
  np.testing.assert_array_equal(tok_o[:3], tok[3:])
  np.testing.assert_allclose(lp_o[:3], lp[3:], atol=1e-5)
  # Another index: another stream.
  assert not np.array_equal(_sample(model, other, [5, 9])[0][:3], tok[3:])


def test_split_prompts_of_a_grouped_batch_equals_the_flat_one():
  rng = np.random.default_rng(1)
  prompts = [_prompt(rng, i) for i in range(4)]
  kw = dict(options=OPTS, model_config=CFG, pad_id=PAD)
  flat = rollout_lib.split_prompts(batching.collate(prompts, batch_size=4, **kw))
  grouped = rollout_lib.split_prompts(batching.collate(prompts, batch_size=4, groups=2, **kw))
  assert len(flat) == len(grouped) == 4
  for a, b, p in zip(flat, grouped, prompts):
    np.testing.assert_array_equal(b["input_ids"], p["input_ids"])
    np.testing.assert_array_equal(b["pixel_values_videos"], p["pixel_values_videos"])
    np.testing.assert_array_equal(a["pixel_values_videos"], p["pixel_values_videos"])
    assert b["item_id"] == p["item_id"]


def test_logprob_mismatch_by_hand():
  # Row 0 has 2 tokens, row 1 one; the rest is padding and must be ignored.
  rollout = np.log(np.array([[0.5, 0.25, 0.9], [0.8, 0.01, 0.01]]))
  learner = np.log(np.array([[0.5, 0.5, 0.1], [0.6, 0.9, 0.9]]))
  got = collective.logprob_mismatch(rollout, learner, np.array([2, 1]))
  # |dp| = 0, 0.25, 0.2 -> mean 0.15, max 0.25
  assert got["rollout_probs_diff_mean"] == pytest.approx(0.15)
  assert got["rollout_probs_diff_max"] == pytest.approx(0.25)
  # Pearson's r of the three valid tokens' probabilities, from its definition
  p, q = np.array([0.5, 0.25, 0.8]), np.array([0.5, 0.5, 0.6])
  pc, qc = p - p.mean(), q - q.mean()
  assert got["rollout_actor_probs_pearson_corr"] == pytest.approx(
      (pc @ qc) / np.sqrt((pc @ pc) * (qc @ qc)))
  same = collective.logprob_mismatch(rollout, rollout, np.array([2, 1]))
  assert same["rollout_probs_diff_max"] == 0.0
  assert same["rollout_actor_probs_pearson_corr"] == pytest.approx(1.0)


def test_logprob_mismatch_sums_over_processes():
  a = np.log(np.array([[0.5, 0.5]]))
  b = np.log(np.array([[0.4, 0.5]]))

  def fake(x):  # process 1 holds the same sums as process 0, and a max twice as large
    return np.stack([x, x * (2.0 if x.size == 1 else 1.0)])
  got = collective.logprob_mismatch(a, b, np.array([2]), allgather=fake)
  assert got["rollout_probs_diff_mean"] == pytest.approx(0.05)  # (0.1 + 0) / 2, both halves
  assert got["rollout_probs_diff_max"] == pytest.approx(0.2)
