"""Generative classification eval: sample a response per item, parse `<answer>`, score.

`generate_responses` is the sampler loop itself (K samples per item, any temperature), shared
with trace generation and two-stage inference (evals/two_stage.py).

Greedy by default (temperature 0), stopping on `<|im_end|>` / `<|endoftext|>`; answers are
parsed with `data.prompts` (the same parser as the GRPO reward) from responses decoded with
special tokens kept (tags registered as special tokens must stay visible).

Several processes: every process generates for the *whole* record list, on the same batches
in the same order, so the sampler's inputs are truly replicated (the jitted sampler treats
host inputs as replicated over the global mesh; per-process shards fed that way would be
mixed up silently once the compiler splits rows over devices of several processes). The rows
of a batch are still split over all devices by the model's batch sharding; only the host work
(video decoding, collation, parsing) is repeated on every process. Every process thus holds
all responses and the metrics count every item (`n` = the split's size).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

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


def generate_responses(model, tokenizer, records: Sequence[Any], *,
                       options: pipeline.PipelineOptions, cfg: EvalConfig, num_samples: int = 1,
                       skip: Callable[[int], bool] | None = None
                       ) -> Iterator[tuple[int, list[tuple[str, str, list[str]]]]]:
  """The one sampler loop of eval, trace generation and two-stage inference.

  Records are taken in order, `cfg.batch_size` a batch (`cfg.max_items` is the caller's).
  Batch i (records [i * B, (i + 1) * B)) samples with fold_in(key(cfg.seed), i), so its
  responses depend only on its records and its index: batches for which `skip(i)` is True are
  neither decoded nor sampled, and the others come out as they would in a full pass (a
  resumed trace generation writes what an uninterrupted one would have).
  Yields (i, [(item_id, label or "", [num_samples responses])]) per batch run, for its real
  items (a record skipped as a bad sample is left out). Responses are decoded with special
  tokens kept (`chat.decode_response`).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  records = list(records)
  b = cfg.batch_size
  index = list(range(-(-len(records) // b)))
  if skip is not None:
    if jax.process_count() > 1:
      raise ValueError("generate_responses(skip=...) runs on one process")
    index = [i for i in index if not skip(i)]
    # The kept batches, back to back: each but the last overall one is full, so the
    # batches of `make_eval_batches` below line up with them.
    records = [r for i in index for r in records[i * b:(i + 1) * b]]
  stops = chat.stop_ids(tokenizer)
  pad = chat.pad_id(tokenizer)
  opts = dataclasses.replace(options, shuffle=False)
  rng = jax.random.key(cfg.seed)
  for i, batch in zip(index, pipeline.make_eval_batches(
      records, tokenizer=tokenizer, model_config=model.config, options=opts,
      batch_size=b, for_generation=True, process_index=0, process_count=1)):
    # process_count=1: every process reads all records (see the module doc).
    if not any(batch["item_id"]):
      continue
    has_video = batch.get("pixel_values_videos") is not None
    out = sampler.sample(
        model, batch["input_ids"], batch["attention_mask"], rng=jax.random.fold_in(rng, i),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        stop_token_ids=stops, pad_token_id=pad, position_ids=batch["position_ids"],
        pixel_values_videos=batch["pixel_values_videos"] if has_video else None,
        video_layout=batch["video_layout"] if has_video else None, num_samples=num_samples)
    tokens = to_host(out.tokens)
    items = []
    for row, (item_id, label) in enumerate(zip(batch["item_id"], batch["labels"])):
      if not item_id:
        continue  # dummy padding row
      texts = [chat.decode_response(tokenizer, tokens[row * num_samples + k])
               for k in range(num_samples)]  # rows b*G .. b*G + G-1 share prompt b
      items.append((item_id, label, texts))
    yield i, items


def evaluate_split(model, tokenizer, records: Sequence[Any], *, options: pipeline.PipelineOptions,
                   cfg: EvalConfig, classes: Sequence[str]) -> tuple[dict[str, float], list[dict]]:
  """(metrics, predictions) of `model` on `records` (see module doc). Predictions hold
  item_id, label, answer, well_formatted and response for each real item."""
  if cfg.max_items:
    records = list(records)[: cfg.max_items]
  preds: list[dict] = []
  for _, items in generate_responses(model, tokenizer, records, options=options, cfg=cfg):
    for item_id, label, (text,) in items:
      preds.append(dict(item_id=item_id, label=label, answer=prompts.extract_answer(text),
                        well_formatted=prompts.is_well_formatted(text), response=text))
  m = metrics_lib.classification_metrics(
      [p["answer"] for p in preds], [p["label"] for p in preds], classes=classes,
      well_formatted=[p["well_formatted"] for p in preds])
  return m, preds
