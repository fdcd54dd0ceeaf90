"""GRPO rollouts: G responses per prompt from the KV-cache sampler, and the learner's batches.

`generate` samples a prompt batch (one prefill, vision tower included, per prompt;
`num_samples=G`) and returns a host-side `Rollout`: per prompt its real prompt tokens and
video, per response row (rows p*G .. p*G+G-1 answer prompt p) its tokens, the sampler's
log-probs (for truncated importance sampling) and its text decoded with special tokens kept
(the tags must reach the reward). On several processes each process rolls out its own
prompts: the sampler's inputs are global arrays sharded by batch group, prompt q of the
global rollout batch samples from fold_in(key, q), and each process takes its own rows back.

`Rollout.micro_batch(prompts, ...)` builds one learner micro-batch of whole prompt groups
on demand (so the G-fold copies of a prompt's video exist for one micro-batch at a time):
each row is prompt ++ response, right-padded to a length bucket, with its own copy of the
prompt's video (`batching.collate`, optionally as data-parallel groups) and the per-row
arrays the loss needs, logit-aligned like `loss_mask` (position t scores token t + 1):
`rollout_logprobs [R, T]`, `advantages [R]`, and any given per-token arrays (old and
reference log-probs).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from deepintuit_jax.algorithms.grpo import collective
from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.data import batching, chat
from deepintuit_jax.sampling import sampler

# Per-row arrays of a learner batch besides the model inputs, with their row axis in a group.
GRPO_ROW_AXES = {"advantages": 0, "rollout_logprobs": 0, "old_logprobs": 0, "ref_logprobs": 0,
                 "response_ids": 0, "response_position_ids": 1}
DEVICE_KEYS = ("input_ids", "attention_mask", "loss_mask", "position_ids",
               "pixel_values_videos", "video_layout")
# The sampler's inputs of a prompt batch, and their row axes (row_ids: global prompt index).
SAMPLER_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values_videos",
                "video_layout")
SAMPLER_ROW_AXES = dict(sharding_lib.ROW_AXES, row_ids=0)


@dataclasses.dataclass
class Rollout:
  """N prompts x G responses on the host.

  prompts: per prompt a dict with input_ids [P_i] (real tokens), pixel_values_videos
    [Np_i, patch_dim], video_grid_thw [1, 3], second_per_grid_ts [1], label, item_id.
  tokens [N*G, L] int32 (pad after a row stops), logprobs [N*G, L] float32 (the sampler's
  raw log-probs), lengths [N*G] int32 (stop token included), texts: N*G decoded responses,
  truncated [N*G] bool (no stop token within L, or cut before a vision placeholder token)."""
  prompts: list[dict[str, Any]]
  group_size: int
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  texts: list[str]
  truncated: np.ndarray

  @property
  def num_prompts(self) -> int:
    return len(self.prompts)

  def rows(self, prompts: Sequence[int]) -> np.ndarray:
    """Row indices of these prompts' responses, prompt by prompt."""
    g = self.group_size
    return np.concatenate([np.arange(p * g, (p + 1) * g) for p in prompts])

  def select(self, prompts: Sequence[int]) -> "Rollout":
    """The rollout restricted to these prompts (in this order)."""
    r = self.rows(prompts)
    return Rollout(prompts=[self.prompts[p] for p in prompts], group_size=self.group_size,
                   tokens=self.tokens[r], logprobs=self.logprobs[r], lengths=self.lengths[r],
                   texts=[self.texts[i] for i in r], truncated=self.truncated[r])

  @staticmethod
  def concat(parts: Sequence["Rollout"]) -> "Rollout":
    if len({p.tokens.shape[1] for p in parts}) != 1:
      raise ValueError("rollouts of different response lengths cannot be joined")
    return Rollout(prompts=[q for p in parts for q in p.prompts], group_size=parts[0].group_size,
                   tokens=np.concatenate([p.tokens for p in parts]),
                   logprobs=np.concatenate([p.logprobs for p in parts]),
                   lengths=np.concatenate([p.lengths for p in parts]),
                   texts=[t for p in parts for t in p.texts],
                   truncated=np.concatenate([p.truncated for p in parts]))

  def reward_examples(self) -> list[dict[str, Any]]:
    """One example per response row (its prompt's label and item_id), for the rewards."""
    return [{"label": self.prompts[r // self.group_size]["label"],
             "item_id": self.prompts[r // self.group_size]["item_id"]}
            for r in range(len(self.texts))]

  def _examples(self, rows: np.ndarray) -> tuple[list[dict[str, Any]], list[int]]:
    """Per row: prompt ++ response as a training example (loss on the response), and the
    logit position of its first response token."""
    examples, starts = [], []
    for r in rows:
      p = self.prompts[r // self.group_size]
      n = int(self.lengths[r])
      ids = np.concatenate([p["input_ids"], self.tokens[r, :n]]).astype(np.int32)
      start = len(p["input_ids"]) - 1  # the logit predicting the first response token
      loss = np.zeros(len(ids), np.int32)
      loss[start:start + n] = 1
      examples.append(dict(input_ids=ids, loss_mask=loss,
                           pixel_values_videos=p["pixel_values_videos"],
                           video_grid_thw=p["video_grid_thw"],
                           second_per_grid_ts=p["second_per_grid_ts"], label=p["label"],
                           item_id=p["item_id"]))
      starts.append(start)
    return examples, starts

  def _prompt_examples(self, prompts: Sequence[int]) -> list[dict[str, Any]]:
    """Per prompt its tokens and video as an example without a loss (shared batches)."""
    return [dict(self.prompts[p], loss_mask=np.zeros(len(self.prompts[p]["input_ids"]),
                                                     np.int32)) for p in prompts]

  def shape_needs(self, prompts: Sequence[int], *, options, groups: int = 1,
                  length_steps: int = 1, share_prompt: bool = False) -> tuple[int, ...]:
    """(length bucket, patch bucket) the micro-batch of these prompts needs (the length on
    the finer grid of `length_steps`, see PipelineOptions.length_bucket); with
    share_prompt: (prompt length, patch bucket, response length)."""
    if share_prompt:
      examples = self._prompt_examples(prompts)
      length, patches = batching.shape_needs(examples, batch_size=len(examples),
                                             options=options, groups=groups,
                                             length_steps=length_steps)
      longest = max(int(self.lengths[r]) for r in self.rows(prompts))
      return length, patches, options.length_bucket(max(longest, 1), length_steps)
    examples, _ = self._examples(self.rows(prompts))
    return batching.shape_needs(examples, batch_size=len(examples), options=options,
                                groups=groups, length_steps=length_steps)

  def micro_batch(self, prompts: Sequence[int], *, advantages: np.ndarray, options,
                  model_config, pad_id: int, groups: int = 1,
                  token_arrays: dict[str, np.ndarray] | None = None,
                  length: int | None = None, patches: int | None = None,
                  response_length: int | None = None, share_prompt: bool = False
                  ) -> dict[str, Any]:
    """The learner batch of these prompts' G responses each (R = len(prompts) * G rows).
    share_prompt: the prompt-shared layout instead (see `shared_batch`).

    advantages: [N*G] over all rows of the rollout (rows of `prompts` are taken);
    token_arrays: name -> [N*G, L] response-aligned arrays (e.g. old_logprobs), placed at
    the logit positions of each row's response like `rollout_logprobs`; length / patches:
    pad to these (e.g. the largest needs over an iteration's micro-batches: one shape).
    Returns the host batch: DEVICE_KEYS (see data/batching.py; grouped when groups > 1),
    advantages [R] / [G, R/G], rollout_logprobs and each token array [R, T] / [G, R/G, T]."""
    if share_prompt:
      return self.shared_batch(prompts, advantages=advantages, options=options,
                               model_config=model_config, pad_id=pad_id, groups=groups,
                               token_arrays=token_arrays, length=length, patches=patches,
                               response_length=response_length)
    rows = self.rows(prompts)
    examples, starts = self._examples(rows)
    b = batching.collate(examples, batch_size=len(rows), options=options,
                         model_config=model_config, pad_id=pad_id,
                         groups=groups if groups > 1 else None, length=length, patches=patches)
    out = {k: b[k] for k in DEVICE_KEYS if b.get(k) is not None}
    out.update(_grouped(self._row_arrays(rows, starts, b["attention_mask"].shape[-1],
                                         advantages, token_arrays), groups))
    return out

  def _row_arrays(self, rows: np.ndarray, starts: Sequence[int], width: int,
                  advantages: np.ndarray, token_arrays: dict[str, np.ndarray] | None
                  ) -> dict[str, np.ndarray]:
    """Per row of `rows`: advantages [R], and the sampler's log-probs and each token array
    [R, width] with the response's values from column `starts[i]` on (zeros elsewhere)."""
    out = {}
    for name, full in dict(rollout_logprobs=self.logprobs, **(token_arrays or {})).items():
      placed = np.zeros((len(rows), width), np.float32)
      for i, (r, s) in enumerate(zip(rows, starts)):
        n = int(self.lengths[r])
        placed[i, s:s + n] = full[r, :n]
      out[name] = placed
    out["advantages"] = np.asarray(advantages, np.float32)[rows]
    return out

  def shared_batch(self, prompts: Sequence[int], *, advantages: np.ndarray, options,
                   model_config, pad_id: int, groups: int = 1,
                   token_arrays: dict[str, np.ndarray] | None = None,
                   length: int | None = None, patches: int | None = None,
                   response_length: int | None = None) -> dict[str, Any]:
    """The prompt-shared learner batch of these prompts (Bp) and their G responses each
    (R = Bp * G rows), for `Qwen2_5_VL.prompt_and_responses`: every prompt and its video
    once, the responses on their own rows.

    Returns: the prompts as `batching.collate` gives them (input_ids, attention_mask,
    position_ids, pixel_values_videos, video_layout; right-padded to `length`);
    response_ids [R, L] (pad_id after each response; L = `response_length`),
    loss_mask [R, L] (the response's tokens), response_position_ids [3, R, L] (rotary
    positions continuing the prompt's); advantages [R]; rollout_logprobs and each token
    array [R, L], response-aligned as the rollout holds them. With groups > 1 every array
    gets its leading group axis (prompts and their responses in the same group)."""
    rows = self.rows(prompts)
    g, r_n = self.group_size, len(rows)
    b = batching.collate(self._prompt_examples(prompts), batch_size=len(prompts),
                         options=options, model_config=model_config, pad_id=pad_id,
                         groups=groups if groups > 1 else None, length=length,
                         patches=patches)
    out = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids",
                             "pixel_values_videos", "video_layout")}
    longest = max(int(self.lengths[r]) for r in rows)
    lr = response_length or options.length_bucket(max(longest, 1))
    if lr < longest:
      raise ValueError(f"shared_batch: response_length={lr} is smaller than the {longest} "
                       "these responses need")
    # The prompt's next rotary position: its length plus its rope delta (their definition).
    nxt = (np.asarray(b["rope_deltas"]).reshape(-1)
           + np.asarray(b["attention_mask"]).reshape(len(prompts), -1).sum(-1))
    ids = np.full((r_n, lr), pad_id, np.int32)
    mask = np.zeros((r_n, lr), np.int32)
    pos = np.zeros((r_n, lr), np.int32)
    for i, r in enumerate(rows):
      n = int(self.lengths[r])
      ids[i, :n], mask[i, :n] = self.tokens[r, :n], 1
      pos[i, :n] = nxt[i // g] + np.arange(n)
    resp = dict(response_ids=ids, loss_mask=mask,
                **self._row_arrays(rows, [0] * r_n, lr, advantages, token_arrays))
    out.update(_grouped(resp, groups))
    # Rope rows first, as collate lays out position_ids: [3, R, L], grouped [G, 3, R/G, L].
    pos3 = np.broadcast_to(pos[None], (3, r_n, lr))
    out["response_position_ids"] = (
        pos3.reshape(3, groups, r_n // groups, lr).transpose(1, 0, 2, 3).copy() if groups > 1
        else pos3.copy())
    return out


def _grouped(arrays: dict[str, np.ndarray], groups: int) -> dict[str, np.ndarray]:
  """Row-major arrays [R, ...] -> [groups, R / groups, ...] (unchanged for one group)."""
  if groups <= 1:
    return arrays
  return {k: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]) for k, x in arrays.items()}


def split_prompts(batch: dict[str, Any]) -> list[dict[str, Any]]:
  """A loader batch of generation prompts (right-padded, one video per real row; grouped
  or not, see batching.collate) -> per prompt its real tokens and video (dummy rows
  dropped)."""
  grids = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)
  n_real = int(batch.get("num_real", len(batch["item_id"])))
  if len(grids) != n_real:
    raise ValueError(f"GRPO prompts need one video per prompt: {len(grids)} videos for "
                     f"{n_real} prompts")
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
  pixels = np.asarray(batch["pixel_values_videos"])
  grouped = ids.ndim == 3
  per = ids.shape[1] if grouped else ids.shape[0]  # rows per group
  ids, mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
  pixels = pixels if grouped else pixels[None]
  offsets = np.concatenate([[0], np.cumsum(grids.prod(-1))])
  seconds = np.asarray(batch["second_per_grid_ts"]).reshape(-1)
  out = []
  for i in range(n_real):
    g = i // per  # a group's pixels hold its own rows' videos, in row order
    start, stop = offsets[i] - offsets[g * per], offsets[i + 1] - offsets[g * per]
    out.append(dict(input_ids=ids[i][mask[i]], pixel_values_videos=pixels[g][start:stop],
                    video_grid_thw=grids[i:i + 1], second_per_grid_ts=seconds[i:i + 1],
                    label=batch["labels"][i], item_id=batch["item_id"][i]))
  return out


def sampler_inputs(batch: dict[str, Any], mesh=None) -> dict[str, Any]:
  """The sampler's inputs of a loader batch, grouped (sharding.as_groups), with `row_ids`
  [Gr, b]: each prompt's global index in the rollout batch (collective.global_prompt_ids).
  With a mesh: global arrays, each process's groups on its own devices (place_batch)."""
  inputs = sharding_lib.as_groups({k: batch[k] for k in SAMPLER_KEYS})
  inputs["input_ids"] = np.asarray(inputs["input_ids"], np.int32)
  inputs["attention_mask"] = np.asarray(inputs["attention_mask"]).astype(bool)
  gr, b = inputs["input_ids"].shape[:2]
  inputs["row_ids"] = collective.global_prompt_ids(
      gr * b, jax.process_index(), jax.process_count()).reshape(gr, b)
  if mesh is None:
    return inputs
  return sharding_lib.place_batch(inputs, mesh, SAMPLER_ROW_AXES)


def generate(model, batch: dict[str, Any], *, key: jax.Array, group_size: int,
             max_new_tokens: int, temperature: float, top_p: float, tokenizer,
             mesh=None) -> Rollout:
  """Samples `group_size` responses to every real prompt of a loader batch of generation
  prompts (`pipeline.make_train_loader(..., for_generation=True)`, grouped or not), stopping
  on `<|im_end|>` / `<|endoftext|>` (chat.stop_ids). Prompt q of the global rollout batch
  draws from fold_in(key, q) whatever process and batch group it is in, so several processes
  (each rolling out its own prompts on its own devices of `mesh`) sample what one does.
  Returns this process's prompts and responses."""
  stops = chat.stop_ids(tokenizer)
  inputs = sampler_inputs(batch, mesh)
  out = sampler.sample(
      model, inputs["input_ids"], inputs["attention_mask"], rng=key,
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
      stop_token_ids=stops, pad_token_id=chat.pad_id(tokenizer),
      position_ids=inputs["position_ids"], pixel_values_videos=inputs["pixel_values_videos"],
      video_layout=inputs["video_layout"], num_samples=group_size, row_ids=inputs["row_ids"])
  tokens, logprobs, lengths = (sharding_lib.local_rows(x, mesh) for x in
                               (out.tokens, out.logprobs, out.lengths))
  prompts = split_prompts(batch)
  keep = len(prompts) * group_size  # rows of dummy prompts come last: dropped
  tokens, logprobs, lengths = tokens[:keep].copy(), logprobs[:keep].copy(), lengths[:keep].copy()
  # A vision placeholder token in a response (an untrained policy can emit one) would claim
  # video features that do not exist in the learner's forward: the response ends before it.
  c = model.config
  vision_ids = [c.image_token_id, c.video_token_id, c.vision_start_token_id,
                c.vision_end_token_id]
  pos = np.arange(tokens.shape[1])
  bad = np.isin(tokens, vision_ids) & (pos < lengths[:, None])
  for r in np.flatnonzero(bad.any(1)):
    cut = int(np.argmax(bad[r]))
    tokens[r, cut:], logprobs[r, cut:], lengths[r] = chat.pad_id(tokenizer), 0.0, cut
  last = tokens[np.arange(keep), np.maximum(lengths - 1, 0)]
  truncated = ((lengths >= max_new_tokens) & ~np.isin(last, stops)) | bad.any(1)
  texts = [chat.decode_response(tokenizer, tokens[r, :lengths[r]]) for r in range(keep)]
  return Rollout(prompts=prompts, group_size=group_size, tokens=tokens, logprobs=logprobs,
                 lengths=lengths, texts=texts, truncated=truncated)
