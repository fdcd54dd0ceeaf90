"""Two-stage inference pieces on the tiny model and a few generated clips: trace generation
resumes after a stop mid-way with nothing lost or duplicated (and the same texts); the
calibrator's scores are the softmax over the label tokens of the model's own logits, sum to
1, and their argmax is the prediction; items without a label are kept."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from deepintuit_jax.data import annotations, pipeline, synthetic, traces
from deepintuit_jax.evals import generation, two_stage
from deepintuit_jax.models import tiny

OPTS = pipeline.PipelineOptions(max_frames=4, max_pixels=12544, shuffle=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("two_stage")
  paths = synthetic.generate(root / "data", seed=3, num_train=5, num_test=1, min_frames=4,
                             max_frames=4)
  ckpt = tiny.write_tiny_checkpoint(str(root / "tiny"), seed=0)
  defs = annotations.load_class_file(paths["classes"])
  records = annotations.load_records(paths["train"])
  model, tok = two_stage.load_model(ckpt, list(defs), dtype=jnp.float32)
  opts = dataclasses.replace(OPTS, video_root=str(root / "data"))
  return dict(root=root, ckpt=ckpt, defs=defs, records=records, model=model, tok=tok,
              opts=opts)


CFG = generation.EvalConfig(batch_size=2, max_new_tokens=4, temperature=1.0, seed=7)


class _Stop(Exception):
  pass


def test_trace_generation_resumes_without_duplicates(world, tmp_path, monkeypatch):
  w = world
  full = str(tmp_path / "full.jsonl")
  s = two_stage.write_traces(w["model"], w["tok"], w["records"], full, options=w["opts"],
                             cfg=CFG, num_traces=2)
  assert s == {"items": 5, "written": 10, "already_done": 0}
  reference = traces.read_traces(full)

  # A run that dies while sampling its second batch (the first batch is on disk) ...
  part = str(tmp_path / "part.jsonl")
  real, calls = generation.sampler.sample, []

  def dying(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise _Stop
    return real(*a, **k)
  monkeypatch.setattr(generation.sampler, "sample", dying)
  with pytest.raises(_Stop):
    two_stage.write_traces(w["model"], w["tok"], w["records"], part, options=w["opts"],
                           cfg=CFG, num_traces=2)
  monkeypatch.setattr(generation.sampler, "sample", real)
  assert len(traces.read_traces(part)) == 4
  # ... and a torn half row, as a kill during the write leaves.
  with open(part, "ab") as f:
    f.write(b'{"item_id": "train_0000')
  calls.clear()
  s = two_stage.write_traces(w["model"], w["tok"], w["records"], part, options=w["opts"],
                             cfg=CFG, num_traces=2)
  assert s == {"items": 5, "written": 6, "already_done": 2}
  resumed = traces.read_traces(part)  # raises on a duplicate key
  key = lambda r: (r["item_id"], r["trace_index"])
  assert sorted(map(key, resumed)) == sorted(map(key, reference))
  # Per-batch keys: the resumed run wrote the very texts of the uninterrupted one.
  assert {key(r): r["response"] for r in resumed} == {key(r): r["response"] for r in reference}
  # Nothing left to do: no batch is decoded or sampled again.
  monkeypatch.setattr(generation.sampler, "sample", dying)
  calls.extend([1, 1])
  assert two_stage.write_traces(w["model"], w["tok"], w["records"], part, options=w["opts"],
                                cfg=CFG, num_traces=2)["written"] == 0


def test_scores_are_label_softmax_sum_to_one_argmax_is_prediction(world, tmp_path):
  w = world
  labels = list(w["defs"])
  recs = list(w["records"][:3])
  recs[2] = dataclasses.replace(recs[2], label=None)  # an item without a label
  rows_t = [traces.trace_row(r.item_id, 0, f"<think>looks {k}</think><answer>{labels[k]}</answer>",
                             sampling={}, label=r.label) for k, r in enumerate(recs)]
  meta = two_stage.meta_review_records(recs, rows_t, w["defs"], str(tmp_path / "cal.json"),
                                       prompt="compact")
  assert [m.label for m in meta] == [recs[0].label, recs[1].label, None]
  cal = two_stage.Calibrator(w["ckpt"], labels, dtype=jnp.float32)
  scores = cal.scores(meta, options=w["opts"], batch_size=2)
  assert len(scores) == 3
  # Independently: the model's full logits at the last prompt position, softmaxed in NumPy
  # over the label tokens only.
  ids = [w["tok"].encode(c, add_special_tokens=False)[0] for c in labels]
  for batch in pipeline.make_eval_batches(meta, tokenizer=w["tok"], model_config=cal.config,
                                          options=w["opts"], batch_size=1):
    n_patches = int(np.prod(batch["video_grid_thw"], axis=-1).sum())  # unpadded
    out = cal.model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                    pixel_values_videos=batch["pixel_values_videos"][:n_patches],
                    video_grid_thw=batch["video_grid_thw"],
                    second_per_grid_ts=batch["second_per_grid_ts"])
    z = np.asarray(out.logits, np.float64)[0, -1, ids]
    ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = scores[batch["item_id"][0]]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert abs(float(got.sum()) - 1.0) < 1e-5
  rows = two_stage.calibrated_rows(recs, rows_t, scores, labels)
  assert [r["id"] for r in rows] == [r.item_id for r in recs]
  for r in rows:
    p = np.array([r["scores"][c] for c in labels])
    assert r["prediction"] == labels[int(p.argmax())] and abs(p.sum() - 1) < 1e-5
  assert rows[2]["label"] is None and rows[0]["trace_answer"] == labels[0]
  m = two_stage.rows_metrics(rows, labels)
  assert m["n"] == 2 and m["unlabelled"] == 1 and 0 <= m["ece"] <= 1
  two_stage.write_rows(str(tmp_path / "p.jsonl"), rows)
  assert os.path.getsize(tmp_path / "p.jsonl") > 0


def test_generate_responses_skip_keeps_other_batches(world):
  w = world
  all_ = dict(generation.generate_responses(w["model"], w["tok"], w["records"],
                                            options=w["opts"], cfg=CFG, num_samples=2))
  some = dict(generation.generate_responses(w["model"], w["tok"], w["records"],
                                            options=w["opts"], cfg=CFG, num_samples=2,
                                            skip=lambda i: i == 1))
  assert sorted(all_) == [0, 1, 2] and sorted(some) == [0, 2]
  assert some[0] == all_[0] and some[2] == all_[2]
  assert all(len(texts) == 2 for _, _, texts in all_[0])
