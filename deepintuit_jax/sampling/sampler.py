"""KV-cache sampler for Qwen2.5-VL: one prefill, then a `lax.while_loop` of one-token steps.

With `num_samples = G` the prompt's keys/values are stored once and shared by its G
responses (`KVCache.share_prefix`): the cache holds B*P + B*G*N slots, not B*G*(P + N).

Shared by GRPO rollouts, trace generation and evaluation. `sample` is jitted and compiles
once per (batch, prompt length, max_new_tokens) and vision-input shapes; temperature and
top_p are traced scalars, so changing them does not recompile.

Log-probabilities: `logprobs[b, i]` is the log-probability of the emitted token under the
temperature-scaled policy, log_softmax(logits / temperature) (greedy: the unscaled logits),
without top-p renormalisation. That is how verl's actor scores a rollout (logits divided by
the rollout temperature), so GRPO's learner log-probs and these agree on-policy; at top_p < 1
it is not the probability of the sampling distribution.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.models.qwen2_5_vl import rope, vision
from deepintuit_jax.models.qwen2_5_vl.model import check_vision_tokens
from deepintuit_jax.models.qwen2_5_vl.text import KVCache


@flax.struct.dataclass
class SampleOutput:
  """tokens [B, N] int32 (pad_token_id after a row stops); logprobs [B, N] float32 (0 after
  a row stops); lengths [B] int32: tokens emitted per row, a stop token included."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose mass reaches `top_p` (nucleus).

  logits [B, V] float32 -> [B, V] with dropped entries at -inf. The most likely token is
  always kept; tokens tied with the last kept logit are kept too.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Greedy when temperature == 0, else temperature + top-p sampling.

  logits [B, V] float32 -> (tokens [B] int32, log-probs [B] float32 of logits / temperature
  (greedy: of the logits), see module doc).
  key: one PRNG key, or a [B] array of typed keys (one per row).
  """
  logits = logits.astype(jnp.float32)

  def draw():
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = jax.lax.cond(top_p < 1.0, lambda: top_p_filter(scaled, top_p), lambda: scaled)
    if _per_row(key):  # one key per row: a row's draw does not depend on the batch around it
      return jax.vmap(jax.random.categorical)(key, scaled).astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

  tokens = jax.lax.cond(temperature > 0, draw,
                        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
  logp = jax.nn.log_softmax(logits / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _per_row(key) -> bool:
  """A [B] array of typed PRNG keys (one per row), not one key."""
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _step_key(rng, i):
  """fold_in(rng, i), row by row for per-row keys."""
  if _per_row(rng):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, i)
  return jax.random.fold_in(rng, i)


def _prefill(graphdef, state, batch: dict, cache_dtype):
  """The prompts' forward into a fresh KV cache of exactly their P slots: (last real logits
  [B, V], cache).

  A grouped batch (`input_ids [Gr, b, P]`, every other input with the group axis in front,
  each group with its own vision inputs, sharding.place_batch's layout) runs the prefill per
  group (`jax.vmap`: each device runs the vision tower on its own groups' videos), and the
  rows are then flattened group-major (B = Gr * b)."""
  def one(group, state):
    model = nnx.merge(graphdef, state)
    group = dict(group)
    ids, mask = group.pop("input_ids"), group.pop("attention_mask")
    b, p = ids.shape
    cache = model.init_cache(b, p, cache_dtype)
    out = model(ids, mask, cache=cache, logits_to_keep=_last_real_index(mask)[:, None], **group)
    return out.logits[:, 0], out.cache

  if batch["input_ids"].ndim == 2:
    return one(batch, state)
  if batch["input_ids"].shape[0] == 1:
    return one(jax.tree.map(lambda x: x[0], batch), state)
  logits, cache = sharding_lib.vmap_groups(one, (0, None), batch["input_ids"].shape[0])(
      batch, state)
  # The cache's one scalar (`index`, the same in every group) comes back as [Gr].
  flat = lambda x: x[0] if x.ndim == 1 else x.reshape((-1,) + x.shape[2:])  # noqa: E731
  return flat(logits), jax.tree.map(flat, cache)


def _last_real_index(mask: jax.Array) -> jax.Array:
  """[B, P] bool -> [B] index of each row's last real token (left or right padding)."""
  p = mask.shape[1]
  return (p - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_samples",
                                             "cache_dtype"))
def _sample_jit(graphdef, state, batch: dict, rng, temperature, top_p, stop_ids, pad_id, *,
                max_new_tokens: int, num_samples: int, cache_dtype):
  model = nnx.merge(graphdef, state)
  batch = dict(batch)
  row_ids = batch.pop("row_ids", None)
  n = max_new_tokens
  prompt_logits, prompt = _prefill(graphdef, state, batch, cache_dtype)
  b = prompt_logits.shape[0]
  if row_ids is not None:
    # Prompt b draws from fold_in(rng, row_ids[b]), its sample j from fold_in(that, j).
    rng = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids.reshape(-1))
    rng = jax.vmap(jax.random.fold_in)(jnp.repeat(rng, num_samples),
                                       jnp.tile(jnp.arange(num_samples), b))
  # One prefill (vision tower included) per prompt, then G independent continuations: rows
  # b*G .. b*G + G-1 share prompt b, whose keys/values stay stored once (the cache's
  # shared prefix); each row owns only its response slots.
  cache = KVCache.share_prefix(prompt, num_samples, n)
  logits = jnp.repeat(prompt_logits, num_samples, axis=0)
  b = b * num_samples
  tok, lp = choose_tokens(logits, _step_key(rng, 0), temperature, top_p)
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
  logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
  finished = jnp.isin(tok, stop_ids)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, _, _, finished, *_ = carry
    return (i < n) & ~jnp.all(finished)

  def body(carry):
    i, cache, prev, finished, tokens, logprobs, lengths = carry
    step = model(prev[:, None], jnp.ones((b, 1), bool), cache=cache)
    tok, lp = choose_tokens(step.logits[:, 0], _step_key(rng, i), temperature, top_p)
    tok = jnp.where(finished, pad_id, tok)
    lp = jnp.where(finished, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
    lengths = lengths + (~finished).astype(jnp.int32)
    finished = finished | jnp.isin(tok, stop_ids)
    return i + 1, step.cache, tok, finished, tokens, logprobs, lengths

  carry = (jnp.ones((), jnp.int32), cache, tok, finished, tokens, logprobs, lengths)
  _, _, _, _, tokens, logprobs, lengths = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=lengths)


def sample(model: nnx.Module, input_ids, attention_mask, *, rng: jax.Array, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
           pad_token_id: int = 0, position_ids=None, pixel_values=None, image_layout=None,
           pixel_values_videos=None, video_layout=None, num_samples: int = 1,
           cache_dtype: Any = None, row_ids=None) -> SampleOutput:
  """Samples up to `max_new_tokens` per row with a KV cache (device arrays in, out).

  Args:
    model: a `Qwen2_5_VL`.
    input_ids, attention_mask: [B, P] prompts; left padding is the usual layout, right
      padding works too (each row continues after its own last real token).
    rng: a jax PRNG key; step i uses fold_in(rng, i), so results are reproducible.
    temperature: 0 = greedy (argmax); else logits / temperature are sampled.
    top_p: nucleus mass; 1.0 disables the filter.
    stop_token_ids: a row stops after emitting any of these (e.g. <|im_end|>, <|endoftext|>).
    position_ids: [3, B, P] rope positions; required with vision inputs (use `generate`
      for NumPy inputs, which computes them); None = text positions from the mask.
    pixel_values / pixel_values_videos with their `vision_layout`s: vision inputs.
    num_samples: G continuations per prompt from a single prefill (GRPO groups); output
      rows b*G .. b*G + G-1 belong to prompt b.
    cache_dtype: KV cache dtype, default the model's compute dtype.
    row_ids: [B] int, or None: prompt b's responses then draw from fold_in(rng, row_ids[b])
      (sample j from fold_in(that, j), step i from fold_in(that, i)), whatever batch it is
      in (e.g. its global index: several processes sample what one does).
  Grouped inputs (input_ids [Gr, b, P], each other input with the group axis in front,
  row_ids [Gr, b]; sharding.place_batch's layout, e.g. global arrays sharded by group) run
  the prefill per group; output rows are group-major (B = Gr * b).
  Returns:
    SampleOutput(tokens [B*G, N], logprobs [B*G, N], lengths [B*G]).
  """
  args, kwargs = _jit_args(
      model, input_ids, attention_mask, rng=rng, max_new_tokens=max_new_tokens,
      temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids,
      pad_token_id=pad_token_id, position_ids=position_ids, pixel_values=pixel_values,
      image_layout=image_layout, pixel_values_videos=pixel_values_videos,
      video_layout=video_layout, num_samples=num_samples, cache_dtype=cache_dtype,
      row_ids=row_ids)
  # Inputs or parameters on a mesh (rollouts): traced with that mesh in context, so the
  # prefill's group vmap names its data-parallel axes and kernels that must run per device
  # (TPU splash attention) know the mesh.
  with sharding_lib.mesh_context(args[2], args[1]):
    return _sample_jit(*args, **kwargs)


def _jit_args(model, input_ids, attention_mask, *, rng, max_new_tokens, temperature, top_p,
              stop_token_ids, pad_token_id, position_ids, pixel_values, image_layout,
              pixel_values_videos, video_layout, num_samples, cache_dtype, row_ids=None):
  """`sample`'s checks, then the (args, kwargs) of `_sample_jit` (also for `.lower(...)`:
  benchmarks read the compiled program's memory)."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  has_vision = pixel_values is not None or pixel_values_videos is not None
  if has_vision and position_ids is None:
    raise ValueError("vision inputs need position_ids (rope.get_rope_index); use generate() "
                     "to compute them from NumPy inputs")
  if (pixel_values is None) != (image_layout is None) or (
      (pixel_values_videos is None) != (video_layout is None)):
    raise ValueError("pass each of pixel_values / pixel_values_videos with its layout")
  batch = dict(input_ids=jnp.asarray(input_ids, jnp.int32),
               attention_mask=jnp.asarray(attention_mask).astype(bool))
  for k, v in dict(position_ids=position_ids, pixel_values=pixel_values,
                   image_layout=image_layout, pixel_values_videos=pixel_values_videos,
                   video_layout=video_layout, row_ids=row_ids).items():
    if v is not None:
      batch[k] = v
  stop = np.asarray(list(stop_token_ids) or [-1], np.int32)  # -1 never matches a token
  graphdef, state = nnx.split(model)
  return ((graphdef, state, batch, rng, jnp.float32(temperature), jnp.float32(top_p),
           jnp.asarray(stop), jnp.int32(pad_token_id)),
          dict(max_new_tokens=max_new_tokens, num_samples=num_samples, cache_dtype=cache_dtype))


def generate(model: nnx.Module, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
             *, max_new_tokens: int, rng: jax.Array | int = 0, temperature: float = 0.0,
             top_p: float = 1.0, stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None, second_per_grid_ts=None, image_layout=None, video_layout=None,
             position_ids=None, num_samples: int = 1, cache_dtype: Any = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`sample` for NumPy inputs as transformers' processor returns them.

  Computes rope positions (`rope.get_rope_index`) and vision layouts (`vision.vision_layout`)
  on the host when not given. `rng` may be an int seed.
  Returns NumPy (tokens [B*G, N] int32, logprobs [B*G, N] float32, lengths [B*G] int32),
  G = num_samples.
  """
  cfg = model.config
  input_ids = np.asarray(input_ids)
  mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  # Inside the jitted sampler the count check cannot run; do it here on the host.
  for kind, pix, grid in (("image", pixel_values, image_grid_thw),
                          ("video", pixel_values_videos, video_grid_thw)):
    if pix is not None and grid is not None:
      check_vision_tokens(cfg, input_ids, kind, np.asarray(grid))
  if pixel_values is not None and image_layout is None:
    image_layout = vision.vision_layout(np.asarray(image_grid_thw), cfg.vision)
  if pixel_values_videos is not None and video_layout is None:
    video_layout = vision.vision_layout(np.asarray(video_grid_thw), cfg.vision)
  if position_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
    position_ids, _ = rope.get_rope_index(
        cfg, input_ids, mask, None if image_grid_thw is None else np.asarray(image_grid_thw),
        None if video_grid_thw is None else np.asarray(video_grid_thw),
        None if second_per_grid_ts is None else np.asarray(second_per_grid_ts))
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  out = sample(model, input_ids, mask, rng=rng, max_new_tokens=max_new_tokens,
               temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids,
               pad_token_id=pad_token_id, position_ids=position_ids,
               pixel_values=pixel_values, image_layout=image_layout,
               pixel_values_videos=pixel_values_videos, video_layout=video_layout,
               num_samples=num_samples, cache_dtype=cache_dtype)
  return np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)
