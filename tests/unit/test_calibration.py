"""Trace rows -> meta-review records, from the release's generation-input files as they are."""
from __future__ import annotations

import os

import pytest

from deepintuit_jax.data import annotations, calibration, chat, prompts, traces

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "deepintuit_official")
S = {"temperature": 1.0, "max_new_tokens": 2048, "seed": 0}


def _inputs():
  records = annotations.load_records(os.path.join(DATA, "generation_input_sample.json"))
  classes = annotations.load_class_file(os.path.join(DATA, "policy_info_sample.json"))
  return records, classes


def _traces(records):
  a, b = records[0], records[1]
  wrong = "abnormal" if a.label == "normal" else "normal"
  return [  # deliberately out of order
      traces.trace_row(b.item_id, 0, "<think>It rolls away.</think><answer>abnormal</answer>",
                       sampling=S),
      traces.trace_row(a.item_id, 1, f"<think>Looks risky.</think><answer>{wrong}</answer>",
                       sampling=S, label=a.label),
      traces.trace_row(a.item_id, 0, "the model rambled without any tags", sampling=S),
  ]


def test_build_examples_from_release_files(tmp_path):
  records, classes = _inputs()
  rows = _traces(records)
  ex = calibration.build_examples(records, rows, classes, priority=["abnormal", "normal"])
  a, b = records[0], records[1]
  assert [e["item_id"] for e in ex] == [f"{a.item_id}#trace0", f"{a.item_id}#trace1",
                                        f"{b.item_id}#trace0"]
  # A trace without the tags: empty conclusion, whole text as rationale.
  text0 = ex[0]["conversations"][0]["content"][1]["text"]
  assert "Conclusion: None" in text0 and "Rationale: the model rambled without any tags" in text0
  assert ex[0]["trace_conclusion"] == "" and ex[0]["trace_correct"] is False
  # A wrong trace is kept, with its conclusion, and the target is still the true label.
  assert ex[1]["trace_conclusion"] != a.label and ex[1]["trace_correct"] is False
  assert ex[1]["conversations"][1] == {"role": "assistant", "content": a.label}
  assert ex[2]["trace_correct"] is (b.label == "abnormal")
  # The prompt holds the item's materials and the class definitions.
  text1 = ex[1]["conversations"][0]["content"][1]["text"]
  assert text1 == prompts.meta_review_prompt(
      classes, conclusion=ex[1]["trace_conclusion"], rationale="Looks risky.",
      title=a.extra["title"], transcript=a.extra["asr_text"], sticker=a.extra["sticker"],
      priority=["abnormal", "normal"])
  assert a.extra["asr_text"] in text1 and classes["abnormal"] in text1
  assert ex[0]["image"] == a.extra["image"] and ex[0]["source_item_id"] == a.item_id

  # Round trip: the release-format file loads with the usual reader ...
  path = calibration.write_examples(tmp_path / "calib.json", ex)
  loaded = annotations.load_records(path, labels=list(classes))
  assert [r.item_id for r in loaded] == [e["item_id"] for e in ex]
  for r, e, src in zip(loaded, ex, [a, a, b]):
    assert r.video == src.video and r.label == src.label and r.response == src.label
    assert r.label_index == src.label_index
    assert r.prompt == e["conversations"][0]["content"][1]["text"]
  # ... and tokenises with the label as the only target (the calibrator's readout).
  from deepintuit_jax.models import tiny
  tok = tiny.build_tokenizer()
  chat.add_special_tokens(tok, list(classes))
  enc = chat.encode_example(tok, loaded[1].prompt, loaded[1].response, num_video_tokens=[4],
                            train_end_of_turn=False)
  targets = chat.shift_targets(enc["input_ids"], chat.pad_id(tok))[enc["loss_mask"] == 1]
  assert targets.tolist() == chat.label_token_ids(tok, [a.label])


def test_build_examples_errors():
  records, classes = _inputs()
  ok = traces.trace_row(records[0].item_id, 0, "x", sampling=S)
  with pytest.raises(ValueError, match="names an item not in the records"):
    calibration.build_examples(records, [traces.trace_row("nope", 0, "x", sampling=S)], classes)
  with pytest.raises(ValueError, match="listed twice"):
    calibration.build_examples(records, [ok, ok], classes)
  with pytest.raises(ValueError, match="is not one of the classes"):
    calibration.build_examples(records, [ok], ["cat", "dog"])
  other = "abnormal" if records[0].label == "normal" else "normal"
  with pytest.raises(ValueError, match="carries label"):
    calibration.build_examples(
        records, [traces.trace_row(records[0].item_id, 0, "x", sampling=S, label=other)], classes)
  unlabelled = [annotations.Record(item_id="u", video="v.mp4", prompt="p", response="",
                                   label=None, label_index=None, extra={}, source="mem")]
  with pytest.raises(ValueError, match="has no label"):
    calibration.build_examples(unlabelled, [traces.trace_row("u", 0, "x", sampling=S)], classes)


def test_records_without_material_fields():
  # Stage-1 files carry no flat title / asr_text / sticker: the materials read as None.
  records = annotations.load_records(os.path.join(DATA, "stage1_train_sample.json"))
  r = records[0]
  (ex,) = calibration.build_examples(
      records, [traces.trace_row(r.item_id, 0, "<think>t</think><answer>x</answer>",
                                 sampling=S)], [r.label, "other"], compact=True)
  text = ex["conversations"][0]["content"][1]["text"]
  assert "Title: None" in text and "First reviewer's conclusion: x" in text
  assert "title" not in ex
