"""The inference-and-report stage: every evaluated model on every split, one report.

Rows of the report, in order: each baseline alone (`infer.baselines`, generative eval,
greedy, e.g. the SFT model), the policy alone (its parsed `<answer>` of the very trace the
calibrators read), and for each calibrator the two-stage prediction
(`evals.two_stage`: scores softmaxed over the label tokens, ECE and reliability diagram).
The policy's traces are written once per split and shared by every calibrator; a rerun after
a kill continues them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from deepintuit_jax.algorithms import calibrator
from deepintuit_jax.core import paths, recipes
from deepintuit_jax.data import annotations, traces
from deepintuit_jax.engine import loop
from deepintuit_jax.evals import generation, report, results as results_lib, two_stage
from deepintuit_jax.stages import specs
from deepintuit_jax.stages.specs import DataSpec, ModelSpec


@dataclasses.dataclass(frozen=True)
class InferRun:
  seed: int
  model: ModelSpec
  data: DataSpec
  policy: str
  policy_name: str
  calibrators: tuple[tuple[str, str], ...]   # (name, calibrator directory)
  baselines: tuple[tuple[str, str], ...]     # (name, HF directory)
  two_stage: two_stage.TwoStageConfig
  eval: generation.EvalConfig                # the baselines' generation settings
  max_items: int


def resolve_calibrator(path: str, what: str = "infer.calibrators") -> str:
  """A calibrator directory: itself (calibrator.json or config.json), or a calibrate
  workdir's hf/ (label_token) or head/ (hidden_state)."""
  path = paths.join(path)
  for cand in (path, os.path.join(path, "hf"), os.path.join(path, "head")):
    if any(paths.isfile(os.path.join(cand, f)) for f in (calibrator.HEAD_META, "config.json")):
      return cand
  raise FileNotFoundError(f"{what}: {path!r} holds no calibrator (calibrator.json or an HF "
                          "directory, or a calibrate workdir's hf/ or head/); run "
                          "configs/calibrate.py first")


def from_config(c) -> InferRun:
  c = recipes.resolve(c)  # a copy: its train_file may be set below
  model = specs.model_spec(c)
  if c.data.eval_files not in ("", "none") and not c.data.train_file:
    with c.unlocked():  # no training file here: keep data_spec off the generated benchmark
      c.data.train_file = paths.parse_named(c.data.eval_files, "data.eval_files")[0][1]
  data = specs.data_spec(c)
  if not data.eval_files:
    raise ValueError("data.eval_files is empty: name the splits to evaluate (name=path,...)")
  i = c.infer
  return InferRun(
      seed=c.seed, model=model, data=data,
      policy=specs.resolve_policy(i.policy, model, what="infer.policy"),
      policy_name=i.policy_name,
      calibrators=tuple((n, resolve_calibrator(p))
                        for n, p in paths.parse_named(i.calibrators, "infer.calibrators")),
      baselines=tuple((n, specs.resolve_policy(p, model, what="infer.baselines",
                                                      produced_by="that stage"))
                      for n, p in paths.parse_named(i.baselines, "infer.baselines")),
      two_stage=two_stage.TwoStageConfig(
          batch_size=i.batch_size, max_new_tokens=i.max_new_tokens,
          temperature=i.temperature, seed=c.seed, prompt=i.prompt,
          priority=specs.parse_priority(i.priority), dtype=model.dtype,
          tokens=data.special_tokens, rope_convention=model.rope_convention),
      eval=specs.eval_spec(c), max_items=i.max_items)


def calibrated_name(policy_name: str, calibrator: str) -> str:
  return f"{policy_name} + calibration ({calibrator})"


def run(cfg: InferRun, *, workdir: str, mesh) -> dict[str, Any]:
  """Evaluates every model on every split; writes predictions and the report."""
  o = cfg.data.options
  splits = {}
  for name, path in cfg.data.eval_files:
    recs = annotations.load_records(path, on_bad_sample=o.on_bad_sample)
    splits[name] = recs[:cfg.max_items] if cfg.max_items else recs
  first = next(iter(splits.values()))
  defs = specs.class_definitions(cfg.data.class_file, first)
  labels = list(defs)
  options = dataclasses.replace(o, labels=None, shuffle=False)
  ts, main = cfg.two_stage, jax.process_index() == 0
  results: dict[str, dict[str, dict]] = {}
  writer = loop.MetricsWriter(workdir, redo_all=True)

  def record(model_name, split, m, rows):
    results.setdefault(model_name, {})[split] = m
    writer.write(0, {k: v for k, v in m.items() if isinstance(v, (int, float))},
                 prefix=f"eval/{model_name}/{split}/")
    if main:
      safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)
      two_stage.write_rows(os.path.join(workdir, f"predictions_{safe}_{split}.jsonl"), rows)
    print(f"[{model_name}] {split}: accuracy {m.get('accuracy', float('nan')):.3f} "
          f"macro_f1 {m.get('macro_f1', float('nan')):.3f} ece {m.get('ece', float('nan')):.3f} "
          f"(n={int(m['n'])})", flush=True)

  for name, path in cfg.baselines:
    model, tok = two_stage.load_model(path, labels, dtype=ts.dtype, mesh=mesh, tokens=ts.tokens,
                                      rope_convention=ts.rope_convention)
    for split, recs in splits.items():
      m, preds = generation.evaluate_split(model, tok, recs, options=options, cfg=cfg.eval,
                                           classes=labels)
      record(name, split, m, preds)
    del model
  model, tok = two_stage.load_model(cfg.policy, labels, dtype=ts.dtype, mesh=mesh,
                                    tokens=ts.tokens, rope_convention=ts.rope_convention)
  trace_rows = {}
  for split, recs in splits.items():
    path = os.path.join(workdir, split, "traces.jsonl")
    two_stage.write_traces(model, tok, recs, path, options=options, cfg=ts.sampling(),
                           desc=f"traces {split}")
    trace_rows[split] = traces.read_traces(path)
    m = two_stage.policy_metrics(recs, trace_rows[split], labels)
    record(cfg.policy_name, split, m, trace_rows[split])
  del model
  for name, path in cfg.calibrators:
    cal = two_stage.Calibrator(path, labels, dtype=ts.dtype, mesh=mesh, tokens=ts.tokens,
                               rope_convention=ts.rope_convention)
    prompt = cal.meta.get("prompt") or ts.prompt
    priority = cal.meta.get("priority") or ts.priority
    for split, recs in splits.items():
      meta = two_stage.meta_review_records(
          recs, trace_rows[split], defs, os.path.join(workdir, split, f"calibration_{prompt}.json"),
          prompt=prompt, priority=priority)
      rows = two_stage.calibrated_rows(
          recs, trace_rows[split], cal.scores(meta, options=options, batch_size=ts.batch_size),
          labels)
      record(calibrated_name(cfg.policy_name, name), split, two_stage.rows_metrics(rows, labels),
             rows)
    del cal
  if main:
    from tensorboardX import SummaryWriter
    with paths.staged(os.path.join(workdir, "tb")) as tb_dir:
      tb = SummaryWriter(tb_dir)
      out = report.write_report(workdir, results, final=True, title="Two-stage evaluation",
                                tensorboard=tb)
      tb.close()
    paths.write_json(os.path.join(workdir, results_lib.ORDER_FILE), list(results))
    for line in out["warnings"]:
      print(line, flush=True)
    print(f"report: {out['markdown']}", flush=True)
  writer.close()
  return results
