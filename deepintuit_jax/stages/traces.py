"""The trace-generation stage (RECIPE "Stage 2"): the policy (the GRPO model) writes K
traces per training video at temperature 1.0 (`evals.two_stage.write_traces`, the sampler
loop shared with eval), then every trace becomes a meta-review example
(`data.calibration.build_examples`; wrong and tagless traces kept).

Workdir: traces.jsonl (resumable), calibration_train.json (video paths absolute, so the
calibrate stage needs no video root), classes.json ({label: definition}, in order),
calibration_meta.json ({"prompt", "priority", "num_traces", ...}), metrics.jsonl (trace
accuracy and format rate against the labels).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from deepintuit_jax.core import paths, recipes
from deepintuit_jax.data import annotations, calibration, errors, prompts, traces
from deepintuit_jax.engine import checkpointing
from deepintuit_jax.engine import loop
from deepintuit_jax.evals import generation, two_stage
from deepintuit_jax.stages import specs
from deepintuit_jax.stages.specs import DataSpec, ModelSpec



@dataclasses.dataclass(frozen=True)
class TracesRun:
  seed: int
  policy: str              # HF directory of the policy
  model: ModelSpec
  data: DataSpec
  sampling: generation.EvalConfig
  num_traces: int
  prompt: str              # full | compact meta-review prompt
  priority: tuple[str, ...] | None
  max_items: int

  def __post_init__(self):
    if self.num_traces < 1:
      raise ValueError(f"traces.num_traces={self.num_traces} must be >= 1")
    if self.prompt not in two_stage.PROMPTS:
      raise ValueError(f"traces.prompt={self.prompt!r}: must be one of {two_stage.PROMPTS}")


def from_config(c) -> TracesRun:
  c = recipes.resolve(c)
  model = specs.model_spec(c)
  t = c.traces
  return TracesRun(
      seed=c.seed, policy=specs.resolve_policy(c.init_from, model), model=model,
      data=specs.data_spec(c),
      sampling=generation.EvalConfig(batch_size=t.batch_size, max_new_tokens=t.max_new_tokens,
                                     temperature=t.temperature, seed=c.seed),
      num_traces=t.num_traces, prompt=t.prompt,
      priority=specs.parse_priority(t.priority), max_items=t.max_items)


def _absolute_videos(records, video_root: str | None):
  """Records with their video paths resolved (the calibration file then stands alone)."""
  return [dataclasses.replace(r, video=annotations.resolve_video_path(
      r.video, video_root, item_id=r.item_id)) for r in records]


def trace_stats(rows, labels) -> dict[str, float]:
  """Share of traces whose answer is the label, and of well-formatted traces."""
  n = max(len(rows), 1)
  correct = sum(prompts.answer_matches(r["response"], r["label"]) for r in rows
                if r.get("label"))
  return {"traces": float(len(rows)), "trace_accuracy": correct / n,
          "trace_format_rate": sum(prompts.is_well_formatted(r["response"]) for r in rows) / n,
          "classes": float(len(labels))}


def run(cfg: TracesRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Writes the traces (resuming a killed run) and the calibration examples."""
  ledger = errors.SkipLedger()
  o = cfg.data.options
  records = annotations.load_records(cfg.data.train_file, on_bad_sample=o.on_bad_sample,
                                     ledger=ledger)
  if cfg.max_items:
    records = records[:cfg.max_items]
  defs = specs.class_definitions(cfg.data.class_file, records)
  labels = list(defs)
  options = dataclasses.replace(o, labels=tuple(labels), shuffle=False)
  path = os.path.join(workdir, "traces.jsonl")
  print(f"policy: {cfg.policy}\n{len(records)} training videos x {cfg.num_traces} traces "
        f"(temperature {cfg.sampling.temperature}, up to {cfg.sampling.max_new_tokens} "
        f"tokens) -> {path}", flush=True)
  model, tokenizer = two_stage.load_model(cfg.policy, labels, dtype=cfg.model.dtype, mesh=mesh,
                                          seed=cfg.seed, tokens=cfg.data.special_tokens,
                                          rope_convention=cfg.model.rope_convention)
  stats = two_stage.write_traces(model, tokenizer, records, path, options=options,
                                 cfg=cfg.sampling, num_traces=cfg.num_traces)
  del model
  rows = traces.read_traces(path)
  if jax.process_index() != 0:
    return {}
  examples = calibration.build_examples(_absolute_videos(records, o.video_root), rows, defs,
                                        priority=cfg.priority, compact=cfg.prompt == "compact")
  calibration.write_examples(os.path.join(workdir, "calibration_train.json"), examples)
  paths.write_json(os.path.join(workdir, "classes.json"), defs, indent=1,  # in class order
                   ensure_ascii=False)
  checkpointing.write_json(os.path.join(workdir, specs.META), {
      "prompt": cfg.prompt, "priority": list(cfg.priority) if cfg.priority else None,
      "num_traces": cfg.num_traces, "policy": cfg.policy, "sampling": dataclasses.asdict(
          cfg.sampling)})
  m = trace_stats(rows, labels)
  m.update({f"generation/{k}": float(v) for k, v in stats.items()})
  writer = loop.MetricsWriter(workdir, redo_all=True)
  writer.write(0, m, prefix="traces/")
  writer.close()
  if ledger.total:
    print(ledger.summary(), flush=True)
  print(f"{len(rows)} traces ({stats['written']} written now), trace accuracy "
        f"{m['trace_accuracy']:.3f}, format rate {m['trace_format_rate']:.3f}; "
        f"{len(examples)} calibration examples", flush=True)
  return m
