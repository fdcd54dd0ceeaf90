"""Qwen2.5-VL: vision tower + token embeddings with scattered vision features + Qwen2 decoder.

`Qwen2_5_VL.__call__` takes what transformers' processor returns (NumPy or jax arrays).
Host-side conveniences (vision layouts, 3D rope positions, the pad-token/feature count
check) run only when the inputs they need are concrete; inside `jax.jit` pass
`position_ids` and the layouts explicitly (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.models.qwen2_5_vl import rope as rope_lib
from deepintuit_jax.models.qwen2_5_vl import vision as vision_lib
from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, RuntimeOptions
from deepintuit_jax.models.qwen2_5_vl.layers import Linear
from deepintuit_jax.models.qwen2_5_vl.text import KVCache, TextModel, default_position_ids


@flax.struct.dataclass
class Output:
  """logits [B, T, V] (or [B, K, V] with logits_to_keep) float32, None with return_hidden;
  hidden_states: L + 1 arrays [B, T, D] or None; cache: the updated KVCache or None;
  rope_deltas [B] int32 (next rotary position minus the number of real tokens, HF's
  definition); hidden: the final-normed last hidden state [B, T, D] (opts.dtype) when
  return_hidden, else None (feed it to `compute_logits`, e.g. chunk by chunk)."""
  logits: jax.Array | None
  hidden_states: tuple[jax.Array, ...] | None = None
  cache: KVCache | None = None
  rope_deltas: jax.Array | None = None
  hidden: jax.Array | None = None


def _host(x) -> np.ndarray | None:
  """x as a NumPy array when it is concrete (NumPy, list, or a non-traced jax array)."""
  if x is None:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def scatter_features(embeds: jax.Array, token_mask: jax.Array, features: jax.Array) -> jax.Array:
  """Replaces the embeddings at `token_mask` by `features`, in row-major order (HF's masked_scatter).

  embeds [B, T, D]; token_mask [B, T] bool; features [N, D] (rows past the number of
  marked tokens, e.g. bucket padding, are ignored). A gather + where, so it jits.
  """
  b, t, d = embeds.shape
  flat = token_mask.reshape(-1)
  idx = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, features.shape[0] - 1)
  gathered = jnp.take(features, idx, axis=0).reshape(b, t, d).astype(embeds.dtype)
  return jnp.where(token_mask[..., None], gathered, embeds)


def check_vision_tokens(config: Qwen2_5_VLConfig, input_ids: np.ndarray, kind: str,
                        grid_thw: np.ndarray | None, n_features: int | None = None) -> None:
  """Raises ValueError unless input_ids hold one `kind` ("image"/"video") pad token per
  merged patch of `grid_thw` [n, 3] (or per row of `n_features` when no grid is known)."""
  token_id = config.image_token_id if kind == "image" else config.video_token_id
  n_tokens = int((np.asarray(input_ids) == token_id).sum())
  if grid_thw is not None:
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    n_features = int(grid_thw.prod(-1).sum()) // config.vision.spatial_merge_size ** 2
  if n_tokens != n_features:
    grid = "" if grid_thw is None else f", grid_thw {grid_thw.tolist()}"
    raise ValueError(
        f"{kind} features and {kind} tokens do not match: input_ids hold {n_tokens} {kind} "
        f"pad token(s) (id {token_id}) but the {kind} inputs give {n_features} feature(s)"
        f"{grid}; the prompt needs one pad token per merged patch (t*h*w / merge**2)")


class Qwen2_5_VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX. Submodules: `visual`, `model`,
  `lm_head` (None when `config.text.tie_word_embeddings`: logits use the embedding matrix)."""

  def __init__(self, config: Qwen2_5_VLConfig, opts: RuntimeOptions = RuntimeOptions(), *,
               rngs: nnx.Rngs):
    self.config, self.opts = config, opts
    self.visual = vision_lib.VisionTower(config.vision, opts, rngs=rngs)
    self.model = TextModel(config.text, opts, rngs=rngs)
    t = config.text
    self.lm_head = None if t.tie_word_embeddings else Linear(
        t.hidden_size, t.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=opts.dtype,
        param_dtype=opts.param_dtype, rngs=rngs)

  # ------------------------------------------------------------------------------- helpers
  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty KVCache for `batch` rows and `max_len` slots (dtype defaults to opts.dtype)."""
    return KVCache.create(self.config.text, batch, max_len, dtype or self.opts.dtype)

  def num_params(self) -> int:
    """Number of parameters (transformers' count, tied embeddings counted once)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

  def compute_logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [..., D] -> logits [..., V] float32 (fp32 accumulation)."""
    if self.lm_head is None:
      return self.model.embed_tokens.attend(hidden)
    dt = self.opts.dtype
    w = sharding_lib.gathered(self.lm_head.kernel[...], ("embed", "vocab"), dt)
    return jnp.einsum("...d,dv->...v", hidden.astype(dt), w, preferred_element_type=jnp.float32)

  def _vision_features(self, kind: str, pixels, grid, layout, ids_host, token_id: int):
    """Runs the tower on one modality and checks the token count when it can."""
    grid_host = _host(grid)
    if layout is None:
      if grid_host is None:
        raise ValueError(f"{kind}: pass the {kind} layout (vision_layout) when the grid is "
                         "not a concrete array (e.g. inside jax.jit)")
      layout = vision_lib.vision_layout(grid_host.astype(np.int64), self.config.vision)
    feats = self.visual(jnp.asarray(pixels), layout)
    if ids_host is not None:
      # Without a grid, the layout knows the real count (bucket padding rows excluded).
      valid = _host(layout.merged_valid)
      n_feats = int(valid.sum()) if valid is not None else None
      if grid_host is not None or n_feats is not None:
        check_vision_tokens(self.config, ids_host, kind, grid_host, n_feats)
    return feats

  # ------------------------------------------------------------------------------- forward
  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
               position_ids=None, image_layout=None, video_layout=None,
               cache: KVCache | None = None, output_hidden_states: bool = False,
               logits_to_keep: int | jax.Array | None = None,
               return_hidden: bool = False, segment_ids=None) -> Output:
    """Forward pass.

    Args:
      input_ids: [B, T] int. attention_mask: [B, T] (1 = real token), None = all real.
      pixel_values / pixel_values_videos: [N, patch_dim] patches of all images / videos,
        concatenated (the processor's layout); image_grid_thw / video_grid_thw [n, 3].
      second_per_grid_ts: [n_videos] seconds per temporal grid step (rope positions only).
      position_ids: [3, B, T] (or [B, T]); None = computed: with vision inputs by
        `rope.get_rope_index` on the host (needs concrete ids, mask and grids, and an empty
        cache), else text positions from the mask (continuing the cache when given).
      image_layout / video_layout: `vision.vision_layout` results; computed from the grids
        when None.
      cache: a KVCache (see `init_cache`); new keys/values are appended at `cache.index`.
      output_hidden_states: return HF's hidden-state tuple.
      logits_to_keep: None = logits everywhere; int k = the last k positions; an int array
        [B, K] = those positions of each row (e.g. the last real token of right-padded rows).
      return_hidden: skip the lm head: `Output.hidden` is the final-normed hidden state
        (after logits_to_keep) and `Output.logits` None, so that a loss can compute logits
        chunk by chunk (`compute_logits`) without ever holding [B, T, V].
      segment_ids: [B, T] int >= 1, packed rows (several sequences per row; no cache): a
        token attends earlier tokens of its own id only; pass `position_ids` too.
    Returns:
      Output(logits float32 | None, hidden_states, cache, rope_deltas [B], hidden).
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = (jnp.ones(ids.shape, bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    ids_host = _host(input_ids)
    embeds = self._embed(ids, ids_host, pixel_values, image_grid_thw, image_layout,
                         pixel_values_videos, video_grid_thw, video_layout)

    host_deltas = None
    has_grids = image_grid_thw is not None or video_grid_thw is not None
    if position_ids is None and has_grids:
      position_ids, host_deltas = self._host_rope_index(
          ids_host, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts, cache)
    elif position_ids is None and cache is None:
      position_ids = default_position_ids(mask)

    hidden, hidden_states, cache = self.model(
        embeds, mask, position_ids, cache=cache, output_hidden_states=output_hidden_states,
        segment_ids=segment_ids)
    if logits_to_keep is not None:
      if isinstance(logits_to_keep, int):
        hidden = hidden[:, hidden.shape[1] - logits_to_keep:]
      else:
        keep = jnp.asarray(logits_to_keep, jnp.int32)
        hidden = jnp.take_along_axis(hidden, keep[..., None], axis=1)
    logits = None if return_hidden else self.compute_logits(hidden)

    if cache is not None:
      rope_deltas = cache.rope_deltas
    elif host_deltas is not None:
      rope_deltas = jnp.asarray(host_deltas, jnp.int32)
    else:
      pos = jnp.asarray(position_ids, jnp.int32)
      pos = pos if pos.ndim == 3 else pos[None]
      top = jnp.max(jnp.where(mask[None], pos, -1), axis=(0, 2)) + 1
      rope_deltas = (top - mask.sum(-1)).astype(jnp.int32)
    return Output(logits=logits, hidden_states=hidden_states, cache=cache,
                  rope_deltas=rope_deltas, hidden=hidden if return_hidden else None)

  def _embed(self, ids, ids_host, pixel_values, image_grid_thw, image_layout,
             pixel_values_videos, video_grid_thw, video_layout) -> jax.Array:
    """Token embeddings [B, T, D] with the vision features scattered at their pad tokens."""
    cfg = self.config
    embeds = self.model.embed_tokens(ids)
    if pixel_values is not None:
      feats = self._vision_features("image", pixel_values, image_grid_thw, image_layout,
                                    ids_host, cfg.image_token_id)
      embeds = scatter_features(embeds, ids == cfg.image_token_id, feats)
    if pixel_values_videos is not None:
      feats = self._vision_features("video", pixel_values_videos, video_grid_thw, video_layout,
                                    ids_host, cfg.video_token_id)
      embeds = scatter_features(embeds, ids == cfg.video_token_id, feats)
    return embeds

  def prompt_and_responses(self, input_ids, attention_mask, position_ids, response_ids,
                           response_mask, response_position_ids, *, pixel_values=None,
                           image_layout=None, pixel_values_videos=None, video_layout=None
                           ) -> tuple[jax.Array, jax.Array]:
    """Final-normed hidden states of prompts and of n responses to each, the prompt (and
    its vision tower) run once, not n times (`TextModel.prompt_and_responses`).

    input_ids / attention_mask [Bp, P] (the prompts, any padding), position_ids
    [3, Bp, P] (rope.get_rope_index), vision inputs as `__call__` (layouts required: this
    runs inside jit); response_ids / response_mask [Bp * n, L] (rows r*n .. r*n+n-1 answer
    prompt r), response_position_ids [3, Bp * n, L] (or [Bp * n, L]: text positions
    continuing the prompt's). Returns (prompt hidden [Bp, P, D], response hidden
    [Bp * n, L, D]), row for row what `__call__(..., return_hidden=True)` gives on
    prompt ++ response (to float rounding)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    rids = jnp.asarray(response_ids, jnp.int32)
    embeds = self._embed(ids, None, pixel_values, None, image_layout, pixel_values_videos,
                         None, video_layout)
    rpos = jnp.asarray(response_position_ids, jnp.int32)
    if rpos.ndim == 2:
      rpos = jnp.broadcast_to(rpos[None], (3,) + rpos.shape)
    return self.model.prompt_and_responses(
        embeds, jnp.asarray(attention_mask).astype(bool), position_ids,
        self.model.embed_tokens(rids), jnp.asarray(response_mask).astype(bool), rpos)

  def _host_rope_index(self, ids_host, attention_mask, image_grid_thw, video_grid_thw,
                       second_per_grid_ts, cache):
    grids = [(_host(g), g) for g in (image_grid_thw, video_grid_thw)]
    mask_host = None if attention_mask is None else _host(attention_mask)
    if (ids_host is None or any(h is None and g is not None for h, g in grids)
        or (attention_mask is not None and mask_host is None)):
      raise ValueError("position_ids are needed: input_ids, attention_mask and the grids are "
                       "not concrete (inside jax.jit); compute them with rope.get_rope_index "
                       "on the host and pass position_ids=")
    if cache is not None:
      start = _host(cache.index)
      if start is None or int(start) != 0:
        raise ValueError("vision inputs with a non-empty (or traced) cache: pass position_ids "
                         "for the new tokens explicitly")
    spg = None if second_per_grid_ts is None else _host(second_per_grid_ts)
    pos, deltas = rope_lib.get_rope_index(
        self.config, ids_host, mask_host, grids[0][0], grids[1][0], spg)
    return jnp.asarray(pos, jnp.int32), np.asarray(deltas).reshape(-1)
