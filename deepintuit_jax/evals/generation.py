"""Generative classification eval: sample a response per item, parse `<answer>`, score.

Greedy by default (temperature 0), stopping on `<|im_end|>` / `<|endoftext|>`; answers are
parsed with `data.prompts` (the same parser as the GRPO reward) from responses decoded with
special tokens kept (tags registered as special tokens must stay visible).

Several processes: every process evaluates the *whole* split, on the same batches in the
same order, so the sampler's inputs are truly replicated (the jitted sampler treats host
inputs as replicated over the global mesh; per-process shards fed that way would be mixed
up silently once the compiler splits rows over devices of several processes). The rows of a
batch are still split over all devices by the model's batch sharding; only the host work
(video decoding, collation, parsing) is repeated on every process. Every process thus holds
all predictions and the metrics count every item (`n` = the split's size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from deepintuit_jax.data import chat, pipeline, prompts
from deepintuit_jax.evals import metrics as metrics_lib
from deepintuit_jax.sampling import sampler


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batch_size: int = 8
  max_new_tokens: int = 512
  temperature: float = 0.0
  max_items: int = 0  # 0 = all
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1 or self.max_new_tokens < 1:
      raise ValueError(f"eval batch_size and max_new_tokens must be >= 1: {self}")


def to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-process) jax Array as NumPy: a replicated or local
  array directly, one sharded over several processes' devices gathered from all of them."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate_split(model, tokenizer, records: Sequence[Any], *, options: pipeline.PipelineOptions,
                   cfg: EvalConfig, classes: Sequence[str]) -> tuple[dict[str, float], list[dict]]:
  """(metrics, predictions) of `model` on `records` (see module doc). Predictions hold
  item_id, label, answer, well_formatted and response for each real item."""
  if cfg.max_items:
    records = list(records)[: cfg.max_items]
  stops = chat.stop_ids(tokenizer)
  pad = chat.pad_id(tokenizer)
  opts = dataclasses.replace(options, shuffle=False)
  rng = jax.random.key(cfg.seed)
  preds: list[dict] = []
  # process_count=1: every process reads all records (see the module doc).
  for i, batch in enumerate(pipeline.make_eval_batches(
      records, tokenizer=tokenizer, model_config=model.config, options=opts,
      batch_size=cfg.batch_size, for_generation=True, process_index=0, process_count=1)):
    if not any(batch["item_id"]):
      continue
    has_video = batch.get("pixel_values_videos") is not None
    out = sampler.sample(
        model, batch["input_ids"], batch["attention_mask"], rng=jax.random.fold_in(rng, i),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        stop_token_ids=stops, pad_token_id=pad, position_ids=batch["position_ids"],
        pixel_values_videos=batch["pixel_values_videos"] if has_video else None,
        video_layout=batch["video_layout"] if has_video else None)
    tokens = to_host(out.tokens)
    for row, (item_id, label) in enumerate(zip(batch["item_id"], batch["labels"])):
      if not item_id:
        continue  # dummy padding row
      text = chat.decode_response(tokenizer, tokens[row])
      preds.append(dict(item_id=item_id, label=label, answer=prompts.extract_answer(text),
                        well_formatted=prompts.is_well_formatted(text), response=text))
  m = metrics_lib.classification_metrics(
      [p["answer"] for p in preds], [p["label"] for p in preds], classes=classes,
      well_formatted=[p["well_formatted"] for p in preds])
  return m, preds
