"""The calibration dataset: reasoning traces -> meta-review examples (RECIPE "Stage 2").

    records = annotations.load_records("generation_input.json")   # the release's files as is
    rows = traces.read_traces("traces.jsonl")
    examples = calibration.build_examples(records, rows, annotations.load_class_file(...))
    calibration.write_examples("calibration_train.json", examples)
    annotations.load_records("calibration_train.json")             # -> the usual pipeline

Each trace becomes one release-format record: the user turn is the item's video plus
`prompts.meta_review_prompt` (label definitions, the tie rule, the item's text materials
`title` / `asr_text` / `sticker`, and the trace's conclusion and rationale); the assistant
turn is the ground-truth label alone, so the calibrator learns one label token. Wrong traces
are kept (they teach when to overrule the reasoning); a trace without the tags has an empty
conclusion and its whole text as rationale (`prompts.split_trace`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from deepintuit_jax.core import paths
from deepintuit_jax.data import prompts

# The release's generation-input fields carrying the text materials.
MATERIAL_FIELDS = {"title": "title", "transcript": "asr_text", "sticker": "sticker"}
# Flat fields copied from the source record when present (the release's generation inputs).
COPIED_FIELDS = ("title", "asr_text", "sticker", "image")


def example_id(item_id: str, trace_index: int) -> str:
  """The calibration record's id (unique per trace; `source_item_id` keeps the item's)."""
  return f"{item_id}#trace{trace_index}"


def _materials(rec) -> dict[str, str]:
  out = {}
  for arg, field in MATERIAL_FIELDS.items():
    v = rec.extra.get(field)
    if v is None:
      v = ""
    if not isinstance(v, str):
      raise ValueError(f"item {rec.item_id!r} ({rec.source}): field {field!r} must be a "
                       f"string, got {type(v).__name__}")
    out[arg] = v
  return out


def build_examples(records: Sequence[Any], traces: Sequence[Mapping[str, Any]],
                   classes: Mapping[str, str] | Sequence[str], *,
                   priority: Sequence[str] | None = None, compact: bool = False
                   ) -> list[dict[str, Any]]:
  """One release-format calibration record per trace.

  Args:
    records: `annotations.Record`s of the items (video, label and the flat text fields).
    traces: trace rows (`traces.read_traces`): item_id, trace_index, response, ...
    classes: label -> definition in order (`annotations.load_class_file`), or labels only.
    priority: tie-break order of the labels (default: the class order).
    compact: the short meta-review prompt (tiny models).
  Returns: records in item order then trace order, each {"item_id": "<id>#trace<k>",
    "conversations": [user: video + meta-review prompt, assistant: label],
    "policy_title", "reward_label", "anno_label", the item's title / asr_text / sticker /
    image when present, "source_item_id", "trace_index", "trace_conclusion",
    "trace_correct" (the conclusion equals the label, case-insensitive)}.
  Raises ValueError naming the trace or item: a trace of an unknown item, a trace listed
  twice, an item without a label or with one outside `classes`, a trace whose own label
  disagrees with its item's.
  """
  defs = dict(classes) if isinstance(classes, Mapping) else {c: "" for c in classes}
  order = prompts.check_priority(defs, priority)
  by_id = {}
  for rec in records:
    if rec.item_id in by_id:
      raise ValueError(f"item {rec.item_id!r} appears twice in the records ({rec.source})")
    by_id[rec.item_id] = rec
  position = {item_id: i for i, item_id in enumerate(by_id)}
  keyed = {}
  for t in traces:
    item_id, k = t.get("item_id"), t.get("trace_index")
    if item_id not in by_id:
      raise ValueError(f"trace ({item_id!r}, {k!r}) names an item not in the records")
    if (item_id, k) in keyed:
      raise ValueError(f"trace ({item_id!r}, {k!r}) is listed twice")
    if not isinstance(t.get("response"), str):
      raise ValueError(f"trace ({item_id!r}, {k!r}) has no response string")
    keyed[(item_id, k)] = t
  out = []
  for (item_id, k) in sorted(keyed, key=lambda key: (position[key[0]], key[1])):
    t, rec = keyed[(item_id, k)], by_id[item_id]
    label = rec.label
    if label is None:
      raise ValueError(f"item {item_id!r} ({rec.source}) has no label (policy_title / "
                       "reward_label): a calibration target is needed")
    if label not in defs:
      raise ValueError(f"item {item_id!r} ({rec.source}): label {label!r} is not one of the "
                       f"classes {list(defs)}")
    if t.get("label") not in (None, label):
      raise ValueError(f"trace ({item_id!r}, {k}) carries label {t['label']!r} but its item "
                       f"has {label!r} ({rec.source})")
    conclusion, rationale = prompts.split_trace(t["response"])
    text = prompts.meta_review_prompt(defs, conclusion=conclusion, rationale=rationale,
                                      priority=order, compact=compact, **_materials(rec))
    ex = {"item_id": example_id(item_id, k),
          "conversations": [
              {"role": "user", "content": [{"type": "video", "video": rec.video},
                                           {"type": "text", "text": text}]},
              {"role": "assistant", "content": label}],
          "policy_title": label, "reward_label": label,
          "anno_label": rec.label_index if rec.label_index is not None
          else list(defs).index(label)}
    ex.update({f: rec.extra[f] for f in COPIED_FIELDS if f in rec.extra})
    ex.update(source_item_id=item_id, trace_index=k, trace_conclusion=conclusion,
              trace_correct=conclusion.strip().lower() == label.strip().lower())
    out.append(ex)
  return out


def write_examples(path: str | os.PathLike, examples: Sequence[Mapping[str, Any]]) -> str:
  """Writes examples as a release-format JSON list (atomic replace); returns the path."""
  path = os.fspath(path)
  paths.write_text(path, json.dumps(list(examples), ensure_ascii=False, indent=1))
  return path
