"""One GRPO iteration on the generic train step (RECIPE.md "Stage 1"):

  rollout (G responses per prompt, sampler) -> rewards -> group advantages
  [-> dynamic sampling: drop groups whose rewards are all equal, refill from more prompts]
  -> old log-probs (and reference log-probs when kl_coef > 0), one jitted pass per
     micro-batch -> `ppo_epochs` x (prompts / mini-batch) optimizer steps of the policy
     loss (`step.TrainStep`; micro-batches of whole prompt groups, true means over each
     mini-batch).

`GRPOLearner.iteration(state, prompt_batch) -> (state, metrics)` is the loop's step: it
advances `state.step` by the number of optimizer steps taken. Rollout keys come from
`state.step_key` (fold_in(rng, step, attempt)), so a resumed run samples the same responses.

Several processes: each rolls out, scores and normalises its own prompts (a group never
straddles processes), builds its own rows of every learner micro-batch (shapes agreed by
`pipeline.process_max`) and places them as global batches; process 0 logs the metrics of
all processes (`collective`). P processes log what one process with all devices logs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.algorithms.grpo import advantages as advantages_lib
from deepintuit_jax.algorithms.grpo import collective
from deepintuit_jax.algorithms.grpo import loss as loss_lib
from deepintuit_jax.algorithms.grpo import rewards as rewards_lib
from deepintuit_jax.algorithms.grpo import rollout as rollout_lib
from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.data import pipeline
from deepintuit_jax.engine import logprobs
from deepintuit_jax.engine.state import TrainState, step_key, trainable_model
from deepintuit_jax.engine.step import TrainStep


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Prompt counts are global (over all processes). clip_low / clip_high None = the policy
  loss's own default (vanilla: 0.2 / 0.28; gspo: 3e-4 / 4e-4); tis_cap 0 = no truncated
  importance sampling; rewards: (name, weight) pairs of registered rewards."""
  group_size: int = 8
  prompts_per_rollout: int = 64
  mini_batch_prompts: int = 32
  micro_batch_prompts: int = 0  # 0 = the mini-batch in one pass
  ppo_epochs: int = 1
  max_response_tokens: int = 2048
  temperature: float = 1.0
  top_p: float = 1.0
  advantage: str = "grpo"
  policy_loss: str = "vanilla"
  loss_agg: str = "token-mean"
  clip_low: float | None = None
  clip_high: float | None = None
  dual_clip: float = 3.0
  tis_cap: float = 2.0
  kl_coef: float = 0.0
  kl_kind: str = "low_var_kl"
  entropy_coef: float = 0.0
  dynamic_sampling: bool = False
  max_refills: int = 2
  rewards: tuple[tuple[str, float], ...] = (("format", 1.0), ("accuracy", 1.0))
  logp_chunk: int = 1024
  # Learner rows are padded to the pipeline's length bucket interval cut into this many
  # steps (PipelineOptions.length_bucket): less padding, at most length_steps compiled
  # shapes per bucket for the update and log-prob passes; 1 = the buckets themselves.
  length_steps: int = 8
  # The learner runs each prompt (and its video) once under its G responses
  # (Qwen2_5_VL.prompt_and_responses) instead of once per response row; False = one row
  # per response, prompt ++ response. The same log-probs and gradients to float rounding.
  share_prompt: bool = True
  control: bool = False  # roll out and score only, never update (the frozen-policy control)

  def __post_init__(self):
    micro = self.micro_batch_prompts or self.mini_batch_prompts
    if self.group_size < 1 or self.ppo_epochs < 1 or self.max_response_tokens < 1:
      raise ValueError(f"grpo.group_size, ppo_epochs and max_response_tokens must be >= 1: "
                       f"{self.group_size}, {self.ppo_epochs}, {self.max_response_tokens}")
    if (self.mini_batch_prompts < 1 or self.prompts_per_rollout % self.mini_batch_prompts
        or self.mini_batch_prompts % micro):
      raise ValueError(f"grpo.prompts_per_rollout {self.prompts_per_rollout} must be a multiple "
                       f"of grpo.mini_batch_prompts {self.mini_batch_prompts}, itself a multiple "
                       f"of grpo.micro_batch_prompts {micro}")
    if self.length_steps < 1:
      raise ValueError(f"grpo.length_steps must be >= 1: {self.length_steps}")
    if self.kl_coef < 0 or self.entropy_coef < 0 or self.tis_cap < 0 or self.logp_chunk < 0:
      raise ValueError("grpo.kl_coef, entropy_coef, tis_cap and logp_chunk must be >= 0")
    if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
      raise ValueError(f"grpo.temperature must be > 0 and top_p in (0, 1]: "
                       f"{self.temperature}, {self.top_p}")
    advantages_lib.get(self.advantage)  # unknown names raise with the known ones
    loss_lib.get(self.policy_loss)
    for name, _ in self.rewards:
      rewards_lib.get(name)
    if self.loss_agg not in loss_lib.AGG_MODES:
      raise ValueError(f"grpo.loss_agg {self.loss_agg!r} not one of {loss_lib.AGG_MODES}")
    if self.kl_kind not in loss_lib.KL_KINDS:
      raise ValueError(f"grpo.kl_kind {self.kl_kind!r} not one of {loss_lib.KL_KINDS}")

  @property
  def micro_prompts(self) -> int:
    return self.micro_batch_prompts or self.mini_batch_prompts

  @property
  def steps_per_rollout(self) -> int:
    """Optimizer steps per rollout batch."""
    return self.prompts_per_rollout // self.mini_batch_prompts * self.ppo_epochs


def make_loss_fn(graphdef: nnx.GraphDef, cfg: GRPOConfig):
  """`loss_fn(params, frozen, rest, batch) -> (sum, count, aux)` (the TrainStep contract) of
  the policy loss on a grouped learner batch (rollout.Rollout.micro_batch): per group, the
  current log-probs and entropies of logits / cfg.temperature (`logprobs.group_logprobs`;
  verl's actor scores a rollout at its sampling temperature), the registered policy loss's
  additive parts, minus entropy_coef x entropy, plus kl_coef x KL to the reference (both
  aggregated like the loss). aux: token sums of pg_clipfrac, pg_clipfrac_lower, ppo_kl,
  entropy (and kl), the masked-token count, and pg_loss (the policy term's sum)."""
  policy = loss_lib.get(cfg.policy_loss)
  kw: dict[str, Any] = dict(dual_clip=cfg.dual_clip, agg=cfg.loss_agg,
                            norm_length=cfg.max_response_tokens)
  kw.update({k: v for k, v in (("clip_low", cfg.clip_low), ("clip_high", cfg.clip_high))
             if v is not None})
  if cfg.tis_cap:
    kw["tis_cap"] = cfg.tis_cap

  def group(g, params, frozen, rest):
    logp, ent = logprobs.group_logprobs(graphdef, params, frozen, rest, g,
                                        chunk=cfg.logp_chunk, entropy=True,
                                        temperature=cfg.temperature)
    mask = g["loss_mask"].astype(jnp.float32)
    total, count, aux = policy(logp, g["old_logprobs"], g["advantages"], mask,
                               rollout_logp=g["rollout_logprobs"] if cfg.tis_cap else None,
                               **kw)
    aux = dict(aux, pg_loss=total, entropy=jnp.sum(jax.lax.stop_gradient(ent) * mask))
    if cfg.entropy_coef:
      ent_sum, _ = loss_lib.aggregate_parts(ent, mask, cfg.loss_agg,
                                            norm_length=cfg.max_response_tokens)
      total = total - cfg.entropy_coef * ent_sum
    if cfg.kl_coef:
      kl = loss_lib.kl_penalty(logp, g["ref_logprobs"], cfg.kl_kind)
      kl_sum, _ = loss_lib.aggregate_parts(kl, mask, cfg.loss_agg,
                                           norm_length=cfg.max_response_tokens)
      total = total + cfg.kl_coef * kl_sum
      aux["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
    return total, count, aux

  def loss_fn(params, frozen, rest, mb):
    total, count, aux = logprobs.map_groups(group, mb, params, frozen, rest)
    return jnp.sum(total), jnp.sum(count), jax.tree.map(jnp.sum, aux)
  return loss_fn


def finalize_aux(aux: dict, count: jax.Array) -> dict:
  """Token means of the loss metrics; pg_loss as the loss (/ count); update_tokens."""
  out = loss_lib.finalize_metrics({k: v for k, v in aux.items() if k != "pg_loss"})
  out["pg_loss"] = aux["pg_loss"] / count
  out["update_tokens"] = aux["tokens"]
  return out


class LogprobPass:
  """`pass(params, frozen, rest, device_batch) -> [G, b, T]` per-token log-probs of a
  learner batch (old log-probs with the current parameters, reference log-probs with the
  frozen start) at the rollouts' sampling `temperature`, one jitted forward; compiles once
  per batch shape (`num_traces()`)."""

  def __init__(self, graphdef: nnx.GraphDef, chunk: int, temperature: float = 1.0):
    self._traces = 0

    def group(g, params, frozen, rest):
      return logprobs.group_logprobs(graphdef, params, frozen, rest, g, chunk=chunk,
                                     temperature=temperature)[0]

    def run(params, frozen, rest, mb):
      self._traces += 1  # at trace time only
      return logprobs.map_groups(group, mb, params, frozen, rest)
    self.jitted = jax.jit(run)

  def num_traces(self) -> int:
    return self._traces

  def __call__(self, params, frozen, rest, mb) -> jax.Array:
    with sharding_lib.mesh_context(mb, params):  # as the update step is traced
      return self.jitted(params, frozen, rest, mb)


def _ungroup(x: np.ndarray) -> np.ndarray:
  """[G, b, T] (or [B, T]) -> [G*b, T]."""
  x = np.asarray(x)
  return x.reshape(-1, x.shape[-1])


class GRPOLearner:
  """The GRPO iteration (see the module docstring).

  Args:
    graphdef / tx / lr_fn / mesh / state_sharding: as `step.TrainStep`.
    cfg: GRPOConfig; tokenizer: decodes responses (special tokens kept); options /
      model_config / pad_id: collate learner batches; groups: data-parallel groups per
      learner micro-batch on this process (stage.batch_groups).
    more_prompts: draws the next loader batch of prompts (dynamic sampling refills).
    ref_params: (params, frozen, rest) of the frozen reference model (kl_coef > 0).
  """

  def __init__(self, graphdef, tx, lr_fn, *, cfg: GRPOConfig, tokenizer, options, model_config,
               pad_id: int, mesh=None, state_sharding=None, groups: int = 1,
               more_prompts: Callable[[], dict] | None = None, ref_params=None):
    if cfg.kl_coef and ref_params is None:
      raise ValueError("grpo.kl_coef > 0 needs the reference parameters")
    self.graphdef, self.cfg, self.tokenizer = graphdef, cfg, tokenizer
    self.options, self.model_config, self.pad_id, self.groups = (
        options, model_config, pad_id, groups)
    self.more_prompts, self.ref_params, self.mesh = more_prompts, ref_params, mesh
    self.procs = jax.process_count()
    for what, n in (("prompts_per_rollout", cfg.prompts_per_rollout),
                    ("mini_batch_prompts", cfg.mini_batch_prompts),
                    ("micro_batch_prompts", cfg.micro_prompts)):
      if n % self.procs:
        raise ValueError(f"grpo.{what} {n} must divide over {self.procs} processes")
    self.row_axes = dict(sharding_lib.ROW_AXES, **rollout_lib.GRPO_ROW_AXES)
    self.update = TrainStep(make_loss_fn(graphdef, cfg), tx, lr_fn, mesh=mesh,
                            state_sharding=state_sharding, row_axes=self.row_axes,
                            count_name="loss_weight", finalize_aux=finalize_aux)
    self.logp = LogprobPass(graphdef, cfg.logp_chunk, cfg.temperature)
    self.reward_weights = dict(cfg.rewards)

  # ------------------------------------------------------------------------ pieces
  def _rollout(self, state: TrainState, batch: dict, attempt: int) -> rollout_lib.Rollout:
    model = trainable_model(self.graphdef, state)
    return rollout_lib.generate(model, batch, key=step_key(state, attempt),
                                group_size=self.cfg.group_size,
                                max_new_tokens=self.cfg.max_response_tokens,
                                temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                tokenizer=self.tokenizer, mesh=self.mesh)

  def _score(self, ro: rollout_lib.Rollout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return rewards_lib.combine(self.reward_weights, ro.texts, ro.reward_examples())

  def _sample(self, state: TrainState, batch: dict):
    """Rollout + rewards, with dynamic sampling when on. Returns (rollout, total rewards,
    components, groups kept, groups sampled, prompt batches drawn, every sampled row's
    (total, components)); counts are this process's. With several processes each fills its
    own share of the batch from its own prompts (the same count on every process), refilling
    while any process is short. The control never refills (it trains on nothing)."""
    ro = self._rollout(state, batch, 0)
    total, parts = self._score(ro)
    if not self.cfg.dynamic_sampling or self.cfg.control:
      return ro, total, parts, ro.num_prompts, ro.num_prompts, 1, (total, parts)
    g = self.cfg.group_size
    want = ro.num_prompts
    kept_ro, dropped_ro, kept, dropped, seen = [], [], [], [], []

    def sort(ro, total, parts):
      seen.append((total, parts))
      r = total.reshape(-1, g)
      varied = r.max(1) > r.min(1)
      for mask, ros, acc in ((varied, kept_ro, kept), (~varied, dropped_ro, dropped)):
        idx = np.flatnonzero(mask)
        if len(idx):
          ros.append(ro.select(idx))
          rows = ro.rows(idx)
          acc.append((total[rows], {k: v[rows] for k, v in parts.items()}))
    sort(ro, total, parts)
    sampled, drawn = ro.num_prompts, 1
    for attempt in range(1, self.cfg.max_refills + 1):
      short = sum(r.num_prompts for r in kept_ro) < want
      # Every process must take the same number of (collective) sampler calls.
      if not pipeline.process_max((int(short),))[0] or self.more_prompts is None:
        break
      ro = self._rollout(state, self.more_prompts(), attempt)
      t, p = self._score(ro)
      sort(ro, t, p)
      sampled, drawn = sampled + ro.num_prompts, drawn + 1
    n_kept = min(sum(r.num_prompts for r in kept_ro), want)
    # Too few varied groups after the refills: fill with all-equal groups (advantage 0).
    ros, accs = kept_ro + dropped_ro, kept + dropped
    ro = rollout_lib.Rollout.concat(ros).select(range(want))
    rows = slice(0, want * g)
    total = np.concatenate([a[0] for a in accs])[rows]
    parts = {k: np.concatenate([a[1][k] for a in accs])[rows] for k in parts}
    seen_total = np.concatenate([t for t, _ in seen])
    seen_parts = {k: np.concatenate([p[k] for _, p in seen]) for k in parts}
    return ro, total, parts, n_kept, sampled, drawn, (seen_total, seen_parts)

  def _prompt_ranges(self, ro) -> list[range]:
    m = self.cfg.micro_prompts // self.procs
    return [range(i, i + m) for i in range(0, ro.num_prompts, m)]

  def _shares_prompt(self) -> bool:
    return shares_prompt(self.cfg.share_prompt, self.cfg.micro_prompts // self.procs,
                         self.groups)

  def layout(self) -> str:
    """The learner batches' layout, in words (for the stage's summary)."""
    if self._shares_prompt():
      return (f"each prompt and its video once under its {self.cfg.group_size} responses "
              "(grpo.share_prompt)")
    why = (f"{self.cfg.micro_prompts // self.procs} prompts per micro-batch do not divide "
           f"over {self.groups} batch groups" if self.cfg.share_prompt
           else "grpo.share_prompt=False")
    return f"one prompt ++ response row per response ({why})"

  def _micro_batches(self, ro, adv, token_arrays=None) -> list[dict]:
    """Host learner micro-batches of whole prompt groups, in prompt order, all padded to
    the largest (length, patch) buckets among them (agreed by every process), so that an
    iteration's micro-batches share one shape: one compile per bucket pair, scan over
    accumulated micro-batches. The length is on the grid of cfg.length_steps steps per
    length bucket (at most that many shapes per bucket)."""
    ranges = self._prompt_ranges(ro)
    shared = self._shares_prompt()
    needs = [ro.shape_needs(r, options=self.options, groups=self.groups,
                            length_steps=self.cfg.length_steps, share_prompt=shared)
             for r in ranges]
    shape = pipeline.process_max(tuple(max(n[i] for n in needs)
                                       for i in range(len(needs[0]))))
    return [ro.micro_batch(r, advantages=adv, options=self.options,
                           model_config=self.model_config, pad_id=self.pad_id,
                           groups=self.groups, token_arrays=token_arrays, length=shape[0],
                           patches=shape[1], response_length=shape[2] if shared else None,
                           share_prompt=shared) for r in ranges]

  def _logprobs(self, params, ro, adv) -> np.ndarray:
    """[N*G, L] response-aligned log-probs of the rollout under `params` (a triple)."""
    out = np.zeros(ro.tokens.shape, np.float32)
    for prompts, mb in zip(self._prompt_ranges(ro), self._micro_batches(ro, adv)):
      lp = _ungroup(sharding_lib.local_rows(self.logp(*params, self.update.place(mb)),
                                            self.mesh))
      mask = _ungroup(mb["loss_mask"]).astype(bool)
      for i, r in enumerate(ro.rows(prompts)):
        out[r, :int(ro.lengths[r])] = lp[i][mask[i]]
    return out

  # ------------------------------------------------------------------------ iteration
  def iteration(self, state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
    cfg, g = self.cfg, self.cfg.group_size
    t0 = time.perf_counter()
    ro, total, parts, n_kept, sampled, drawn, seen = self._sample(state, batch)
    t_rollout = time.perf_counter() - t0
    adv = np.asarray(advantages_lib.compute(cfg.advantage, total, g))
    if cfg.control:
      return self._control(state, ro, total, parts, adv, t_rollout)
    sampled_stats = self._sampled_rewards(seen) if cfg.dynamic_sampling else {}

    t0 = time.perf_counter()
    token_arrays = {"old_logprobs": self._logprobs(
        (state.params, state.frozen, state.rest), ro, adv)}
    mismatch = collective.logprob_mismatch(ro.logprobs, token_arrays["old_logprobs"],
                                           ro.lengths)
    if cfg.kl_coef:
      token_arrays["ref_logprobs"] = self._logprobs(self.ref_params, ro, adv)
    t_logp = time.perf_counter() - t0

    t0 = time.perf_counter()
    micro = self._micro_batches(ro, adv, token_arrays)
    per_step = cfg.mini_batch_prompts // cfg.micro_prompts
    steps: list[dict] = []
    update_tokens = 0
    for _ in range(cfg.ppo_epochs):
      for i in range(0, len(micro), per_step):
        state, m = self.update(state, tuple(micro[i:i + per_step]))
        m = jax.device_get(m)
        steps.append(m)
        if not bool(m["ok"]):
          break
        update_tokens += sum(_forward_tokens(mb) for mb in micro[i:i + per_step])
      if steps and not bool(steps[-1]["ok"]):
        break
    t_update = time.perf_counter() - t0

    # Every process holds its own prompts' rows: the logged values are the global ones
    # (rows gathered in global prompt order, counts summed, times of the slowest process).
    stats = self._rollout_stats(ro, total, parts, adv)
    counts = collective.reduce_scalars(
        dict(update_tokens=update_tokens, rollout_time=t_rollout, old_logp_time=t_logp,
             update_time=t_update, groups_kept=n_kept, groups_sampled=sampled,
             prompt_batches=drawn),
        dict(update_tokens="sum", rollout_time="max", old_logp_time="max", update_time="max",
             groups_kept="sum", groups_sampled="sum", prompt_batches="max"))
    gen_tokens, update_tokens = stats.pop("rollout_tokens"), counts["update_tokens"]
    t_rollout, t_logp, t_update = (counts[k] for k in ("rollout_time", "old_logp_time",
                                                       "update_time"))
    metrics: dict[str, Any] = {k: float(np.mean([float(s[k]) for s in steps]))
                               for k in steps[0] if k != "ok"}
    metrics["lr"] = float(steps[-1]["lr"])
    metrics["ok"] = all(bool(s["ok"]) for s in steps)
    metrics.update(
        stats, **mismatch, rollout_time=t_rollout, old_logp_time=t_logp, update_time=t_update,
        rollout_tokens_per_second=gen_tokens / max(t_rollout, 1e-9),
        update_tokens_per_second=update_tokens / max(t_update, 1e-9),
        tokens_per_second=(gen_tokens + update_tokens) / max(t_rollout + t_logp + t_update,
                                                             1e-9),
        optimizer_steps=len(steps))
    if cfg.dynamic_sampling:
      metrics.update({k: int(counts[k]) for k in ("groups_kept", "groups_sampled",
                                                   "prompt_batches")})
      # The trained batch is biased towards varied groups: its reward means (and share of
      # all-equal groups) are logged as batch_*, and the headline ones are those of every
      # response sampled this iteration (the policy's).
      for k in [k for k in metrics if k.startswith("reward") or k in (
          "accuracy", "format_rate", "groups_all_equal")]:
        metrics[f"batch_{k}"] = metrics.pop(k)
      metrics.update(sampled_stats)
    return state, metrics

  def _rollout_stats(self, ro, total, parts, adv) -> dict[str, float]:
    """`collective.rollout_stats` of this iteration's rows gathered from every process."""
    return collective.rollout_stats(collective.gather_rows(
        dict(_reward_rows(total, parts), lengths=ro.lengths, truncated=ro.truncated,
             advantages=adv), self.cfg.group_size), self.cfg.group_size)

  def _sampled_rewards(self, seen) -> dict[str, float]:
    """Reward metrics over every response sampled this iteration (all processes)."""
    rows = collective.gather_rows(_reward_rows(*seen), self.cfg.group_size)
    return collective.reward_stats(rows, self.cfg.group_size)

  def _control(self, state, ro, total, parts, adv, t_rollout):
    """The frozen-policy control's iteration: the rollout and its rewards are logged like a
    training iteration's, the parameters stay, and the step advances as if trained, so
    each rollout draws the same prompts and keys as the run it shadows."""
    stats = self._rollout_stats(ro, total, parts, adv)
    t_rollout = collective.reduce_scalars(dict(t=t_rollout), dict(t="max"))["t"]
    gen_tokens = stats.pop("rollout_tokens")
    state = state.replace(step=state.step + self.cfg.steps_per_rollout)
    return state, dict(stats, ok=True, optimizer_steps=0, rollout_time=t_rollout,
                       rollout_tokens_per_second=gen_tokens / max(t_rollout, 1e-9))


def shares_prompt(share_prompt: bool, prompts: int, groups: int) -> bool:
  """Whether the learner's batches share each prompt (grpo.share_prompt): when asked, and
  each of the `groups` batch groups holds whole prompts (a process's `prompts` per
  micro-batch divide over them); else one prompt ++ response row per response."""
  return share_prompt and prompts % groups == 0


def _forward_tokens(mb: dict) -> int:
  """Real tokens a learner micro-batch's forward runs: every row's, and with a shared
  prompt each prompt once plus its responses."""
  n = int(np.asarray(mb["attention_mask"]).sum())
  return n + (int(np.asarray(mb["loss_mask"]).sum()) if "response_ids" in mb else 0)


def _reward_rows(total: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-response rewards as `collective` arrays: `total` and `reward/<name>`."""
  return dict(total=total, **{f"reward/{k}": v for k, v in parts.items()})


def prompt_batches(loader) -> Iterator[tuple[dict, int, dict]]:
  """Loader batches as loop items: (batch, prompt tokens, loader state after it)."""
  while True:
    b = next(loader)
    yield b, int(np.asarray(b["attention_mask"]).sum()), loader.get_state()
