"""Per-token log-probabilities of a batch under the model: the one primitive behind SFT's
cross-entropy and GRPO's old / reference log-prob passes and policy loss.

`token_logprobs` never materialises `[B, T, V]` logits when asked not to: the B * T
positions are cut into equal chunks, each chunk's logits are computed from the final
hidden state under `jax.checkpoint` (the backward recomputes them instead of keeping them),
so at most one `[chunk, V]` fp32 block is alive.

`group_logprobs` runs the model on one group of a grouped batch (see sharding.batch_shardings)
and `map_groups` maps a per-group function over the group axis (`jax.vmap`, or a plain
call when G = 1), so each device runs the vision tower on its own group's videos only.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from deepintuit_jax.core import sharding as sharding_lib

# Batch keys the model consumes inside jit (everything else in a batch is the loss's).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values_videos",
              "video_layout", "pixel_values", "image_layout")
# A prompt-shared batch (`Qwen2_5_VL.prompt_and_responses`) also holds its responses (their
# tokens' mask is the batch's `loss_mask`).
RESPONSE_KEYS = ("response_ids", "response_position_ids")


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_KEYS if k in batch and batch[k] is not None}


def next_tokens(input_ids: jax.Array) -> jax.Array:
  """targets[:, t] = input_ids[:, t + 1]; the last position gets 0 (never a target)."""
  return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def logits_logprobs(logits: jax.Array, targets: jax.Array, *, entropy: bool = False
                    ) -> tuple[jax.Array, jax.Array | None]:
  """log softmax(logits)[target] and, optionally, the entropy of softmax(logits).

  logits [..., V] (any float; computed in float32), targets [...] int.
  Returns (logp [...] float32, entropy [...] float32 or None)."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz
  if not entropy:
    return logp, None
  probs = jnp.exp(logits - logz[..., None])
  return logp, logz - jnp.sum(probs * logits, axis=-1)


def token_logprobs(hidden: jax.Array, targets: jax.Array,
                   logits_fn: Callable[[jax.Array], jax.Array], chunk: int = 0, *,
                   entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Per-token log-probs of `targets` from final-normed hidden states, chunk by chunk.

  hidden [b, T, D]; targets [b, T] int (usually `next_tokens(input_ids)`: position t scores
  token t + 1); logits_fn: [C, D] -> [C, V] (e.g. `model.compute_logits`); chunk: at most C
  positions per chunk (0 = one chunk of all b * T positions). The positions are split into
  ceil(b*T / C) equal chunks (the last padded), each under `jax.checkpoint` when there are
  several. Returns (logp [b, T] float32, entropy [b, T] float32 or None).
  """
  if chunk < 0:
    raise ValueError(f"log-prob chunk {chunk} must be >= 0 (0 = unchunked)")
  b, t, d = hidden.shape
  n = b * t
  n_chunks = -(-n // chunk) if chunk else 1
  size = -(-n // n_chunks)  # balanced: at most n_chunks - 1 padding positions in all
  pad = n_chunks * size - n

  def split(x):
    x = x.reshape((n,) + x.shape[2:])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_chunks, size) + x.shape[1:])

  def one(h, tgt):
    lp, ent = logits_logprobs(logits_fn(h), tgt, entropy=entropy)
    return (lp, ent) if entropy else (lp,)

  if n_chunks == 1:
    outs = one(hidden.reshape(n, d), targets.reshape(n))
  else:
    body = jax.checkpoint(one)
    _, outs = jax.lax.scan(lambda c, xs: (c, body(*xs)), None, (split(hidden), split(targets)))
    outs = tuple(o.reshape(-1)[:n] for o in outs)
  outs = tuple(o.reshape(b, t) for o in outs)
  return outs[0], (outs[1] if entropy else None)


def group_logprobs(graphdef: nnx.GraphDef, params, frozen, rest, group: dict, *,
                   chunk: int = 0, entropy: bool = False, temperature: float = 1.0
                   ) -> tuple[jax.Array, jax.Array | None]:
  """The model's per-token log-probs of `group`'s next tokens (one group: `input_ids
  [b, T]`, its own vision inputs). Returns (logp [b, T], entropy [b, T] or None); position t
  scores input_ids[t + 1], the last position is meaningless (mask it). A prompt-shared
  group (with RESPONSE_KEYS: prompts once, `response_ids [b, L]` answering them) gives the
  response tokens' own log-probs instead, response-aligned ([b, L]). `temperature`: the
  logits are divided by it first (GRPO scores its rollouts at their sampling temperature,
  as verl's actor does)."""
  model = nnx.merge(graphdef, params, frozen, rest)
  logits_fn = model.compute_logits
  if temperature != 1.0:
    logits_fn = lambda h: model.compute_logits(h) / temperature  # noqa: E731
  if "response_ids" in group:
    hidden, targets = _response_hidden(model, group)
  else:
    hidden = model(**model_inputs(group), return_hidden=True).hidden
    targets = next_tokens(group["input_ids"])
  return token_logprobs(hidden, targets, logits_fn, chunk, entropy=entropy)


def _response_hidden(model, group: dict) -> tuple[jax.Array, jax.Array]:
  """A prompt-shared group (prompts `input_ids [bp, P]`, responses `response_ids
  [bp * n, L]`): the hidden states that score each response token, and the tokens
  ([bp * n, L] each, response-aligned: position t scores response token t, the first from
  the prompt's last real token)."""
  hp, hr = model.prompt_and_responses(
      **model_inputs(group), **{k: group[k] for k in RESPONSE_KEYS},
      response_mask=group["loss_mask"])
  mask = jnp.asarray(group["attention_mask"]).astype(bool)
  last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)  # [bp]
  first = jnp.take_along_axis(hp, last[:, None, None], axis=1)  # [bp, 1, D]
  first = jnp.repeat(first, hr.shape[0] // hp.shape[0], axis=0)
  return (jnp.concatenate([first, hr[:, :-1]], axis=1),
          jnp.asarray(group["response_ids"], jnp.int32))


def map_groups(fn: Callable[..., Any], batch: dict, *shared: Any) -> Any:
  """`fn(group, *shared)` over the leading group axis of a grouped batch (`input_ids
  [G, b, T]`), outputs stacked on a new leading axis [G, ...]. G = 1 calls `fn` directly
  (no vmap). Pass parameters as `shared` arguments, not in a closure: a model merged from
  closed-over tracers inside vmap breaks nnx transforms (remat) in the model. Under a mesh
  whose data-parallel axes split G, the vmap names them (`sharding.vmap_groups`)."""
  g = jax.tree.leaves(batch)[0].shape[0]
  if g == 1:
    out = fn(jax.tree.map(lambda x: x[0], batch), *shared)
    return jax.tree.map(lambda x: x[None], out)
  return sharding_lib.vmap_groups(fn, (0,) + (None,) * len(shared), g)(batch, *shared)
