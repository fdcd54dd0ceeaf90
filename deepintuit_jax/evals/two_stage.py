"""Two-stage inference (RECIPE "Inference"), as library functions: model paths in, rows out.

    rows = two_stage.two_stage("runs/grpo/hf", "runs/calibrate/hf", records, classes=classes,
                               options=options, cfg=two_stage.TwoStageConfig(), out_dir="out")

1. The policy (the GRPO model) writes one trace per item (temperature 0.01, seeded, up to
   `max_new_tokens`) into `<out_dir>/traces.jsonl` (`write_traces`: resumable, batched,
   the sampler loop shared with eval, `evals.generation.generate_responses`).
2. Each trace becomes a meta-review prompt (`data.calibration.build_examples`, written to
   `<out_dir>/calibration.json`) and the calibrator runs one forward step on it
   (`Calibrator.scores`): the label-token logits at the readout position, softmaxed over
   the label tokens only, are the confidences (they sum to 1); their argmax is the
   prediction (`algorithms.calibrator` has the readout; the hidden-state head gives its C logits
   the same way).
Rows (`<out_dir>/predictions.jsonl`, written whole at the end): id, response, scores
({label: p}), prediction, label (None when unknown), trace_answer (the policy's own parsed
answer). Resuming re-runs only what is missing: the traces file keeps every finished batch;
the calibrator pass, one forward step per item, is recomputed.

The same trace writer, with K samples at temperature 1.0, makes the calibration training
traces (stages/traces.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepintuit_jax.algorithms import calibrator
from deepintuit_jax.core import paths
from deepintuit_jax.core import sharding as sharding_lib
from deepintuit_jax.data import annotations, calibration, chat, pipeline, prompts, traces
from deepintuit_jax.evals import generation, metrics as metrics_lib

PROMPTS = ("full", "compact")


@dataclasses.dataclass(frozen=True)
class TwoStageConfig:
  """batch_size: items per sampler / calibrator batch; max_new_tokens, temperature, seed: the
  policy's trace sampling; prompt: the meta-review prompt (full, or compact for tiny
  models; must match what the calibrator was trained on); priority: the tie-break order
  (None = class order); dtype: compute dtype of both models; tokens: the added-token mode."""
  batch_size: int = 8
  max_new_tokens: int = 2048
  temperature: float = 0.01
  seed: int = 42
  prompt: str = "full"
  priority: tuple[str, ...] | None = None
  dtype: Any = jnp.bfloat16
  tokens: str = "added"  # data.special_tokens: how labels and tags are added tokens
  rope_convention: str | None = None  # model.rope_convention; None = as the models record

  def __post_init__(self):
    if self.prompt not in PROMPTS:
      raise ValueError(f"prompt={self.prompt!r}: must be one of {PROMPTS}")
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError(f"batch_size and max_new_tokens must be >= 1: {self}")

  def sampling(self) -> generation.EvalConfig:
    return generation.EvalConfig(batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, seed=self.seed)


def load_model(path: str, labels: Sequence[str], *, dtype=jnp.bfloat16, mesh=None,
               seed: int = 0, tokens: str = "added", rope_convention: str | None = None):
  """(model, tokenizer) of an HF directory, with the labels and tags as atomic tokens
  (`tokens`: data.special_tokens' mode; a no-op for our exports, which carry them; a stock
  checkpoint grows normal-initialised rows). `rope_convention`: the rope rule to run with
  (None = the one the directory records; another than it records is a ConfigError)."""
  from transformers import AutoTokenizer

  from deepintuit_jax.models import qwen2_5_vl
  if not paths.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path!r} is not an HF model directory (no config.json)")
  with paths.fetched(path) as local:  # a bucket's HF directory is read from a local copy
    tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    chat.add_tokens_for_mode(tokenizer, labels, tokens)
    model = qwen2_5_vl.from_pretrained(local, dtype=dtype, mesh=mesh,
                                       rope_convention=rope_convention)
  need = chat.required_vocab_size(tokenizer)
  if need > model.config.text.vocab_size:
    model = qwen2_5_vl.resize_token_embeddings(model, need, seed=seed)
  return model, tokenizer


def write_traces(model, tokenizer, records: Sequence[Any], path: str, *,
                 options: pipeline.PipelineOptions, cfg: generation.EvalConfig,
                 num_traces: int = 1, desc: str = "traces") -> dict[str, int]:
  """Appends `num_traces` traces per record to the trace file `path` (data.traces), batch by
  batch, fsynced; continues a file left by a killed run: batches already complete are
  skipped without decoding, a partly written one is sampled again (with its own key, so the
  same texts) and only its missing (item, trace) rows are written. A progress bar counts
  items/s. Returns {"items", "written", "already_done"}."""
  from tqdm import tqdm
  if jax.process_count() > 1:
    raise ValueError("trace generation runs on one process (it writes one file)")
  records = list(records)
  ids = [r.item_id for r in records]
  if len(set(ids)) != len(ids):
    raise ValueError(f"trace generation: duplicate item ids in the records ({path})")
  b = cfg.batch_size
  sampling = dict(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                  seed=cfg.seed, num_traces=num_traces, batch_size=b)
  written = 0
  with traces.TraceWriter(path) as w:
    todo = dict(w.pending(ids, num_traces))
    if w.repaired_bytes:
      print(f"{path}: dropped a torn last line ({w.repaired_bytes} bytes) left by a kill",
            flush=True)
    already = len(ids) - len(todo)
    skip = lambda i: not any(x in todo for x in ids[i * b:(i + 1) * b])
    bar = tqdm(total=len(ids), initial=already, desc=desc, unit="item", dynamic_ncols=True,
               mininterval=1.0)
    try:
      for i, items in generation.generate_responses(model, tokenizer, records, options=options,
                                                    cfg=cfg, num_samples=num_traces, skip=skip):
        rows = [traces.trace_row(item_id, k, texts[k], sampling=sampling, label=label or None)
                for item_id, label, texts in items for k in todo.get(item_id, ())]
        w.write(rows)
        written += len(rows)
        bar.update(sum(1 for x in ids[i * b:(i + 1) * b] if x in todo))
    finally:
      bar.close()
  return {"items": len(ids), "written": written, "already_done": already}


def meta_review_records(records: Sequence[Any], trace_rows: Sequence[Mapping[str, Any]],
                        classes: Mapping[str, str] | Sequence[str], path: str, *,
                        prompt: str = "full", priority: Sequence[str] | None = None
                        ) -> list[annotations.Record]:
  """The calibrator's inputs: one meta-review record per trace (`calibration.build_examples`),
  written to `path` and read back as Records. An item without a label gets a placeholder
  assistant turn (inference never encodes it) and keeps label None."""
  labels = list(classes)
  known = {r.item_id for r in records if r.label is not None}
  filled = [r if r.label is not None else dataclasses.replace(r, label=labels[0])
            for r in records]
  examples = calibration.build_examples(filled, trace_rows, classes, priority=priority,
                                        compact=prompt == "compact")
  for ex in examples:
    if ex["source_item_id"] not in known:
      ex["conversations"][1]["content"] = ""
      for k in ("policy_title", "reward_label", "anno_label", "trace_correct"):
        ex.pop(k, None)
  calibration.write_examples(path, examples)
  return annotations.load_records(path)


@functools.partial(jax.jit, static_argnames=("graphdef", "head"))
def _scores_jit(graphdef, state, batch, label_ids, *, head):
  model = nnx.merge(graphdef, state)
  pos = calibrator.last_positions(batch["attention_mask"])
  cls, _ = calibrator.class_logits(model, head, batch, pos, label_ids)
  return jax.nn.softmax(cls.astype(jnp.float32), axis=-1)


class Calibrator:
  """A trained calibrator: a label-token one (an HF directory, `calibrator.json` optional)
  or a hidden-state head (a directory with `head.safetensors` and `calibrator.json` naming
  its frozen backbone). `scores(records)` -> {example id: probabilities [C]} over `labels`."""

  def __init__(self, path: str, labels: Sequence[str], *, dtype=jnp.bfloat16, mesh=None,
               tokens: str = "added", rope_convention: str | None = None):
    self.meta = calibrator.read_meta(path)
    self.head, self.labels = self.meta["head"], list(labels)
    trained = self.meta.get("classes") or self.labels
    if sorted(trained) != sorted(self.labels):
      raise ValueError(f"calibrator {path!r} was trained on classes {trained}, not "
                       f"{self.labels}")
    # Score columns follow `labels`: the label-token readout picks their tokens in that
    # order; the head's outputs (in its training order) are permuted.
    self.columns = (np.arange(len(self.labels)) if self.head == "label_token"
                    else np.asarray([trained.index(c) for c in self.labels]))
    backbone = path if self.head == "label_token" else self.meta["backbone"]
    vlm, self.tokenizer = load_model(backbone, self.labels, dtype=dtype, mesh=mesh,
                                     tokens=tokens, rope_convention=rope_convention)
    self.model = vlm if self.head == "label_token" else calibrator.HeadCalibrator(
        vlm, calibrator.load_head(path))
    self.label_ids = np.asarray(chat.label_token_ids(self.tokenizer, self.labels), np.int32)
    self.config = vlm.config

  def scores(self, records: Sequence[Any], *, options: pipeline.PipelineOptions,
             batch_size: int) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(self.model)
    out = {}
    for batch in pipeline.make_eval_batches(records, tokenizer=self.tokenizer,
                                            model_config=self.config, options=options,
                                            batch_size=batch_size, for_generation=True):
      if not any(batch["item_id"]):
        continue
      dev = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids",
                                   "pixel_values_videos", "video_layout")
             if batch.get(k) is not None}
      with sharding_lib.mesh_context(state):  # a sharded model: splash runs per device
        probs = np.asarray(_scores_jit(graphdef, state, dev, self.label_ids, head=self.head))
      probs = probs[:, self.columns]
      for row, item in enumerate(batch["item_id"]):
        if item:
          out[item] = probs[row]
    return out


def calibrated_rows(records: Sequence[Any], trace_rows: Sequence[Mapping[str, Any]],
                    scores: Mapping[str, np.ndarray], labels: Sequence[str]) -> list[dict]:
  """One output row per record with a trace and scores (the first trace of each item)."""
  first = {}
  for t in trace_rows:
    if t["item_id"] not in first or t["trace_index"] < first[t["item_id"]]["trace_index"]:
      first[t["item_id"]] = t
  rows = []
  for r in records:
    t = first.get(r.item_id)
    p = None if t is None else scores.get(calibration.example_id(r.item_id, t["trace_index"]))
    if p is None:
      continue  # a bad sample skipped by the pipeline
    rows.append({"id": r.item_id, "response": t["response"],
                 "scores": {c: float(v) for c, v in zip(labels, p)},
                 "prediction": labels[int(np.argmax(p))], "label": r.label,
                 "trace_answer": t["answer"]})
  return rows


def write_rows(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """JSONL, replaced atomically."""
  paths.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return path


def rows_metrics(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
  """classification_metrics of calibrated rows (scores give ECE and the reliability data)."""
  return metrics_lib.classification_metrics(
      [r["prediction"] for r in rows], [r["label"] for r in rows], classes=labels,
      scores=[r["scores"] for r in rows])


def policy_metrics(records: Sequence[Any], trace_rows: Sequence[Mapping[str, Any]],
                   labels: Sequence[str]) -> dict[str, Any]:
  """The policy alone: its parsed `<answer>` of each item's first trace."""
  by_id = {}
  for t in sorted(trace_rows, key=lambda t: -t["trace_index"]):
    by_id[t["item_id"]] = t
  done = [(r, by_id[r.item_id]) for r in records if r.item_id in by_id]
  return metrics_lib.classification_metrics(
      [prompts.extract_answer(t["response"]) for _, t in done], [r.label for r, _ in done],
      classes=labels, well_formatted=[prompts.is_well_formatted(t["response"]) for _, t in done])


def two_stage(policy: str, calibrator: str, records: Sequence[Any] | str, *,
              classes: Mapping[str, str] | Sequence[str], options: pipeline.PipelineOptions,
              cfg: TwoStageConfig, out_dir: str, mesh=None) -> list[dict]:
  """Two-stage inference of `records` (Records, or a release-format file): the policy's
  trace (HF directory `policy`), then the calibrator's scores (`calibrator`, see
  `Calibrator`). Writes traces.jsonl, calibration.json and predictions.jsonl to `out_dir`;
  rerunning with the same arguments continues (module doc). Returns the rows."""
  labels = list(classes)
  if isinstance(records, str):
    records = annotations.load_records(records, on_bad_sample=options.on_bad_sample)
  options = dataclasses.replace(options, labels=None, shuffle=False)
  paths.makedirs(out_dir)
  trace_path = os.path.join(out_dir, "traces.jsonl")
  model, tokenizer = load_model(policy, labels, dtype=cfg.dtype, mesh=mesh, tokens=cfg.tokens,
                                rope_convention=cfg.rope_convention)
  write_traces(model, tokenizer, records, trace_path, options=options, cfg=cfg.sampling())
  del model
  rows_t = traces.read_traces(trace_path)
  meta = meta_review_records(records, rows_t, classes, os.path.join(out_dir, "calibration.json"),
                             prompt=cfg.prompt, priority=cfg.priority)
  cal = Calibrator(calibrator, labels, dtype=cfg.dtype, mesh=mesh, tokens=cfg.tokens)
  rows = calibrated_rows(records, rows_t, cal.scores(meta, options=options,
                                                     batch_size=cfg.batch_size), labels)
  write_rows(os.path.join(out_dir, "predictions.jsonl"), rows)
  return rows
