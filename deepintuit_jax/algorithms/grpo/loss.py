"""GRPO policy losses, KL penalties and loss aggregation (pure jnp, jit-able), as verl's.

Shapes: logp, old_logp, rollout_logp, ref_logp, mask are [B, L] over the response tokens
(mask 1 on real response tokens, 0 on padding); advantages are [B] (one per response,
broadcast over its tokens) or [B, L]. Everything is computed in float32.

Micro-batching. Every loss exists in two forms:
* `*_parts(...) -> (sum, count, aux)`: the learner's form. `sum` and `count` are additive
  over micro-batches, so a mini-batch split into micro-batches gives exactly the one-batch
  value as `sum_total / count_total` (for every aggregation mode, see `aggregate_parts`).
  `aux` holds *sums over the masked tokens* of each metric plus `aux["tokens"]`, the
  masked-token count; add them over micro-batches too and call `finalize_metrics`.
* `policy_loss(...)`, `gspo_loss(...) -> (loss, metrics)`: the one-batch value, for
  notebooks and tests (`loss = sum / count`, metrics = token means).
An extra loss term with the same mask and mode (KL to a reference, an entropy bonus) adds
its `aggregate_parts(...)[0]`, times its coefficient, to `sum`: the count is the same.

Policy losses (registry `POLICY_LOSSES`, name -> `*_parts` function):
* `vanilla` (RECIPE Stage 1): ratio = exp(clip(logp - old, -20, 20));
  l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high)); where A < 0 the dual clip
  l = min(l, -dual_clip*A); with `rollout_logp`, truncated importance sampling
  l *= min(exp(clip(old - rollout, -20, 20)), tis_cap), a constant (no gradient).
* `gspo`: one ratio per sequence, s = exp(mean over its tokens of (logp - old)), carried
  per token as exp(sg[log s] + logp - sg[logp]) (clamped at log 10 above) so each token's
  gradient is s * grad logp; clipped to [1-clip_low, 1+clip_high] (defaults 3e-4 / 4e-4,
  the GSPO paper's and verl's recipe) with no dual clip; aggregated seq-mean-token-mean.

Metrics (token means over the mask, verl's definitions): `pg_clipfrac`, the fraction of
tokens where the clipped term is strictly larger (the clip is active); `pg_clipfrac_lower`,
where A < 0 and the dual clip bound is strictly smaller (active); `ppo_kl`, the mean of
old_logp - logp (clamped like the ratio's exponent in `vanilla`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from deepintuit_jax.algorithms.grpo.registry import Registry

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")
METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")

PolicyLossParts = Callable[..., tuple[jax.Array, jax.Array, dict]]
POLICY_LOSSES: Registry[PolicyLossParts] = Registry("policy loss")
register = POLICY_LOSSES.register
get = POLICY_LOSSES.get
names = POLICY_LOSSES.names


# ----------------------------------------------------------------------------- aggregation
def aggregate_parts(values, mask, mode: str, *, norm_length: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of `values` [B, L] under `mask` [B, L] so that aggregate = sum / count.

  * token-mean: sum of the masked values / number of masked tokens;
  * seq-mean-token-sum: sum over sequences of each token sum / number of sequences;
  * seq-mean-token-mean: sum over sequences of each token mean / number of sequences;
  * seq-mean-token-sum-norm (Dr. GRPO): sum over sequences of (token sum / norm_length) /
    number of sequences; norm_length defaults to the padded length L, so micro-batches
    must share L (or pass the maximum response length).
  "Sequences" are the rows with at least one masked token (an all-padding row, e.g. a
  micro-batch filler, counts for nothing), as in verl. Note: verl's own
  seq-mean-token-sum-norm divides the token sums by L but not by the number of sequences
  (then by the number of micro-batches), which is this value times the micro-batch size.
  Both parts are float32 scalars and add up over micro-batches.
  """
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask).astype(jnp.float32)
  if values.ndim != 2 or values.shape != mask.shape:
    raise ValueError(f"aggregate: values {values.shape} and mask {mask.shape} must both be [B, L]")
  tok = jnp.sum(values * mask, axis=-1)  # [B]
  n_tok = jnp.sum(mask, axis=-1)
  seqs = jnp.sum((n_tok > 0).astype(jnp.float32))
  if mode == "token-mean":
    return jnp.sum(tok), jnp.sum(n_tok)
  if mode == "seq-mean-token-sum":
    return jnp.sum(tok), seqs
  if mode == "seq-mean-token-mean":
    return jnp.sum(jnp.where(n_tok > 0, tok / jnp.maximum(n_tok, 1.0), 0.0)), seqs
  if mode == "seq-mean-token-sum-norm":
    length = values.shape[-1] if norm_length is None else norm_length
    if length <= 0:
      raise ValueError(f"aggregate: norm_length must be positive, got {length}")
    return jnp.sum(tok) / length, seqs
  raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(AGG_MODES)}")


def safe_divide(total, count) -> jax.Array:
  """total / count, 0 where count == 0 (an all-padding batch contributes no loss)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)


def aggregate(values, mask, mode: str, *, norm_length: int | None = None) -> jax.Array:
  """Scalar aggregate of `values` [B, L] under `mask` (see `aggregate_parts`)."""
  return safe_divide(*aggregate_parts(values, mask, mode, norm_length=norm_length))


def finalize_metrics(aux: dict) -> dict:
  """Token means from summed `aux` (the third output of a `*_parts` loss, added over
  micro-batches): every key but "tokens" divided by aux["tokens"]."""
  return {k: safe_divide(v, aux["tokens"]) for k, v in aux.items() if k != "tokens"}


# ----------------------------------------------------------------------------- policy losses
def _inputs(logp, old_logp, advantages, mask, rollout_logp):
  logp = jnp.asarray(logp, jnp.float32)
  if logp.ndim != 2:
    raise ValueError(f"policy loss: logp must be [B, L], got shape {logp.shape}")
  arrays = {"old_logp": old_logp, "mask": mask}
  if rollout_logp is not None:
    arrays["rollout_logp"] = rollout_logp
  out = {}
  for key, x in arrays.items():
    x = jnp.asarray(x)
    if x.shape != logp.shape:
      raise ValueError(f"policy loss: {key} shape {x.shape} != logp shape {logp.shape}")
    out[key] = x.astype(jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.shape == logp.shape[:1]:
    adv = adv[:, None]
  elif adv.shape != logp.shape:
    raise ValueError(f"policy loss: advantages shape {adv.shape} must be [B]={logp.shape[:1]} "
                     f"or [B, L]={logp.shape}")
  return logp, out["old_logp"], adv, out["mask"], out.get("rollout_logp")


def tis_weight(old_logp, rollout_logp, cap: float) -> jax.Array:
  """Truncated importance weight min(exp(old - rollout), cap) [B, L], without gradient."""
  w = jnp.minimum(jnp.exp(jnp.clip(old_logp - rollout_logp, -20.0, 20.0)), cap)
  return jax.lax.stop_gradient(w)


def _check_clips(clip_low, clip_high, tis_cap):
  if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
    raise ValueError(f"policy loss: need 0 <= clip_low < 1 and clip_high >= 0, got "
                     f"{clip_low}, {clip_high}")
  if tis_cap <= 0:
    raise ValueError(f"policy loss: tis_cap must be positive, got {tis_cap}")


@register("vanilla")
def policy_loss_parts(logp, old_logp, advantages, mask, *, rollout_logp=None,
                      clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float = 3.0,
                      tis_cap: float = 2.0, agg: str = "token-mean",
                      norm_length: int | None = None):
  """RECIPE's clipped, dual-clipped, TIS-weighted loss as (sum, count, aux); see module doc."""
  _check_clips(clip_low, clip_high, tis_cap)
  if dual_clip <= 1.0:
    raise ValueError(f"policy loss: dual_clip must be > 1, got {dual_clip}")
  logp, old, adv, mask, rollout = _inputs(logp, old_logp, advantages, mask, rollout_logp)
  log_ratio = jnp.clip(logp - old, -20.0, 20.0)
  ratio = jnp.exp(log_ratio)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clipped = jnp.maximum(pg1, pg2)
  pg3 = -adv * dual_clip
  per_token = jnp.where(adv < 0, jnp.minimum(clipped, pg3), clipped)
  if rollout is not None:
    per_token = per_token * tis_weight(old, rollout, tis_cap)
  total, count = aggregate_parts(per_token, mask, agg, norm_length=norm_length)
  sg = jax.lax.stop_gradient
  aux = {"pg_clipfrac": jnp.sum(sg(pg2 > pg1) * mask),
         "pg_clipfrac_lower": jnp.sum(sg((clipped > pg3) & (adv < 0)) * mask),
         "ppo_kl": jnp.sum(sg(-log_ratio) * mask),
         "tokens": jnp.sum(mask)}
  return total, count, aux


@register("gspo")
def gspo_loss_parts(logp, old_logp, advantages, mask, *, rollout_logp=None,
                    clip_low: float = 3e-4, clip_high: float = 4e-4, dual_clip: float | None = None,
                    tis_cap: float = 2.0, agg: str = "seq-mean-token-mean",
                    norm_length: int | None = None):
  """GSPO's sequence-ratio loss as (sum, count, aux); see module doc. `dual_clip` is
  accepted for a common signature and ignored (GSPO has none)."""
  del dual_clip
  _check_clips(clip_low, clip_high, tis_cap)
  logp, old, adv, mask, rollout = _inputs(logp, old_logp, advantages, mask, rollout_logp)
  sg = jax.lax.stop_gradient
  diff = logp - old
  seq_log_ratio = jnp.sum(diff * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  log_ratio = jnp.minimum(logp - sg(logp) + sg(seq_log_ratio)[:, None], 10.0)
  ratio = jnp.exp(log_ratio)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  per_token = jnp.maximum(pg1, pg2)
  if rollout is not None:
    per_token = per_token * tis_weight(old, rollout, tis_cap)
  total, count = aggregate_parts(per_token, mask, agg, norm_length=norm_length)
  aux = {"pg_clipfrac": jnp.sum(sg(pg2 > pg1) * mask),
         "pg_clipfrac_lower": jnp.zeros((), jnp.float32),
         "ppo_kl": jnp.sum(sg(-diff) * mask),
         "tokens": jnp.sum(mask)}
  return total, count, aux


def _finalize(parts) -> tuple[jax.Array, dict]:
  total, count, aux = parts
  return safe_divide(total, count), finalize_metrics(aux)


def policy_loss(logp, old_logp, advantages, mask, *, rollout_logp=None, clip_low: float = 0.2,
                clip_high: float = 0.28, dual_clip: float = 3.0, tis_cap: float = 2.0,
                agg: str = "token-mean", norm_length: int | None = None
                ) -> tuple[jax.Array, dict]:
  """The `vanilla` loss of one batch: (scalar loss, {pg_clipfrac, pg_clipfrac_lower, ppo_kl})."""
  return _finalize(policy_loss_parts(
      logp, old_logp, advantages, mask, rollout_logp=rollout_logp, clip_low=clip_low,
      clip_high=clip_high, dual_clip=dual_clip, tis_cap=tis_cap, agg=agg,
      norm_length=norm_length))


def gspo_loss(logp, old_logp, advantages, mask, *, rollout_logp=None, clip_low: float = 3e-4,
              clip_high: float = 4e-4, tis_cap: float = 2.0, agg: str = "seq-mean-token-mean",
              norm_length: int | None = None) -> tuple[jax.Array, dict]:
  """The `gspo` loss of one batch: (scalar loss, metrics)."""
  return _finalize(gspo_loss_parts(
      logp, old_logp, advantages, mask, rollout_logp=rollout_logp, clip_low=clip_low,
      clip_high=clip_high, tis_cap=tis_cap, agg=agg, norm_length=norm_length))


# ----------------------------------------------------------------------------- KL, entropy
def kl_penalty(logp, ref_logp, kind: str) -> jax.Array:
  """Per-token KL estimate [B, L] of the policy from the reference (Schulman's k1/k2/k3).

  k1 / kl: logp - ref; abs: |logp - ref|; k2 / mse: 0.5 * (logp - ref)^2;
  k3 / low_var_kl: exp(ref - logp) - (ref - logp) - 1 with ref - logp clipped to [-20, 20]
  and the result to [-10, 10] (verl's clamps). Use as a loss term through
  `aggregate_parts(kl, mask, mode)`.
  """
  logp = jnp.asarray(logp, jnp.float32)
  ref = jnp.asarray(ref_logp, jnp.float32)
  if logp.shape != ref.shape:
    raise ValueError(f"kl_penalty: logp {logp.shape} and ref_logp {ref.shape} differ")
  if kind in ("k1", "kl"):
    return logp - ref
  if kind == "abs":
    return jnp.abs(logp - ref)
  if kind in ("k2", "mse"):
    return 0.5 * jnp.square(logp - ref)
  if kind in ("k3", "low_var_kl"):
    d = jnp.clip(ref - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
  raise ValueError(f"unknown KL kind {kind!r}; known: {', '.join(KL_KINDS)}")


def entropy_from_logits(logits) -> jax.Array:
  """Entropy of softmax(logits) over the last axis: [..., V] -> [...] float32."""
  logits = jnp.asarray(logits, jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  return logz - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
