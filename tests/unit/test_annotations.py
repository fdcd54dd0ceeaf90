"""Annotation readers: the release's files as is, JSONL, bad records, class files, video paths."""
from __future__ import annotations

import copy
import json
import os
import pathlib

import pytest

from deepintuit_jax.data import annotations as A
from deepintuit_jax.data import errors
from deepintuit_jax.data.errors import BadSample, SkipLedger

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "deepintuit_official"

GOOD = {
    "item_id": "v1",
    "conversations": [
        {"role": "user", "content": [{"type": "video", "video": "clips/v1.mp4"},
                                     {"type": "text", "text": "Classify."}]},
        {"role": "assistant", "content": "<think>t</think><answer>normal</answer>"}],
    "policy_title": "normal", "anno_label": 0,
}


def _rec(**changes):
  r = copy.deepcopy(GOOD)
  for k, v in changes.items():
    if v is _DROP:
      r.pop(k)
    else:
      r[k] = v
  return r


_DROP = object()


def _write(tmp_path, records, name="a.json"):
  p = tmp_path / name
  if name.endswith(".jsonl"):
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
  else:
    p.write_text(json.dumps(records))
  return str(p)


# ----------------------------------------------------------------------------- release files
def test_stage1_file():
  recs = A.load_records(DATA / "stage1_train_sample.json")
  assert [r.item_id for r in recs] == ["smartbench_0001", "smartbench_0002", "smartbench_0007"]
  assert [r.label for r in recs] == ["normal", "abnormal", "abnormal"]
  assert [r.label_index for r in recs] == [0, 1, 1]
  assert [r.response for r in recs] == ["normal", "abnormal", "abnormal"]
  assert recs[1].video == "/mnt/cluster/SmartHome-Bench/frame_zips/smartbench_0002.zip"
  assert recs[0].prompt.startswith("\n**TASK:** Classify the video")
  assert recs[0].prompt.endswith("Sticker Text: None\n")
  assert recs[0].extra == {"policy_title": "normal", "reward_label": "normal"}
  assert recs[2].source.endswith("stage1_train_sample.json:#2")


def test_coldstart_file():
  recs = A.load_records(DATA / "coldstart_train_sample.json")
  assert len(recs) == 3
  assert recs[0].response.startswith("<think>\nStep 1: Content Summary\n")
  assert recs[0].response.endswith("</think>\n<answer>normal</answer>")
  assert recs[1].label == "abnormal" and "reward_label" not in recs[1].extra


def test_generation_file_flat_fields():
  recs = A.load_records(DATA / "generation_input_sample.json")
  r = recs[2]
  assert r.response == ""
  assert r.extra["title"] == "smartbench_0007"
  assert r.extra["asr_text"].startswith("At night a bear")
  assert r.extra["sticker"] == "None"
  assert r.extra["image"] == r.video
  assert r.extra["true_title"] == ""


def test_labels_and_class_file_of_release():
  classes = A.load_class_file(DATA / "policy_info_sample.json")
  assert list(classes) == ["normal", "abnormal"]
  assert classes["abnormal"].startswith("Threats, intrusions")
  recs = A.load_records(DATA / "stage1_train_sample.json", labels=list(classes))
  assert A.labels_from_records(recs) == ["normal", "abnormal"]


def test_jsonl_equals_json(tmp_path):
  raw = json.loads((DATA / "generation_input_sample.json").read_text())
  a = A.load_records(_write(tmp_path, raw, "x.jsonl"))
  b = A.load_records(DATA / "generation_input_sample.json")
  assert [dataclass_vals(r) for r in a] == [dataclass_vals(r) for r in b]
  # Concatenated JSON values without the .jsonl suffix are read as JSONL too.
  p = tmp_path / "y.json"
  p.write_text("\n".join(json.dumps(r) for r in raw))
  assert [r.item_id for r in A.load_records(p)] == [r.item_id for r in b]


def dataclass_vals(r):
  return (r.item_id, r.video, r.prompt, r.response, r.label, r.label_index, dict(r.extra))


def test_assistant_as_text_items_and_int_id(tmp_path):
  rec = _rec(item_id=7, conversations=[
      {"role": "system", "content": "sys"},
      {"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "video", "video": "v.mp4"},
                                   {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "x"},
                                        {"type": "text", "text": "y"}]}])
  (r,) = A.load_records(_write(tmp_path, [rec]))
  assert (r.item_id, r.video, r.prompt, r.response) == ("7", "v.mp4", "a\nb", "x\ny")


# ----------------------------------------------------------------------------- bad records
def _user(content):
  return [{"role": "user", "content": content}, {"role": "assistant", "content": "normal"}]


BAD_CASES = {
    "no_conversations": (_rec(conversations=_DROP), "missing 'conversations'", errors.BAD_RECORD),
    "no_video": (_rec(conversations=_user([{"type": "text", "text": "t"}])), "no video item",
                 errors.BAD_RECORD),
    "no_text": (_rec(conversations=_user([{"type": "video", "video": "v.mp4"}])),
                "no text item", errors.BAD_RECORD),
    "no_item_id": (_rec(item_id=_DROP), "missing 'item_id'", errors.BAD_RECORD),
    "label_type": (_rec(policy_title=3), "'policy_title' must be a string", errors.BAD_RECORD),
    "index_type": (_rec(anno_label="0"), "'anno_label' must be", errors.BAD_RECORD),
    "content_type": (_rec(conversations=_user("just text")), "content must be a list",
                     errors.BAD_RECORD),
    "not_object": (["a list"], "must be a JSON object", errors.BAD_RECORD),
    "labels_disagree": (_rec(reward_label="abnormal"), "disagree", errors.BAD_RECORD),
    "unknown_label": (_rec(policy_title="weird"), "not in the class list", errors.UNKNOWN_LABEL),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_error_mode(tmp_path, case):
  bad, reason, kind = copy.deepcopy(BAD_CASES[case])
  if isinstance(bad, dict) and "item_id" in bad:
    bad["item_id"] = "bad1"
  good2 = _rec(item_id="v2")
  path = _write(tmp_path, [_rec(), bad, good2])
  with pytest.raises(BadSample) as e:
    A.load_records(path, labels=["normal", "abnormal"])
  assert e.value.kind == kind
  assert reason in str(e.value)
  assert path in str(e.value)
  assert "#1" in str(e.value)  # the file position names records without an id
  if isinstance(bad, dict) and "item_id" in bad:
    assert "item 'bad1'" in str(e.value)


@pytest.mark.parametrize("name", ["a.json", "a.jsonl"])
def test_bad_records_skip_mode_counts(tmp_path, name):
  recs = [_rec(item_id="ok0")]
  for i, case in enumerate(sorted(BAD_CASES)):
    bad = copy.deepcopy(BAD_CASES[case][0])
    if isinstance(bad, dict) and "item_id" in bad:
      bad["item_id"] = f"bad{i}"
    recs += [bad, _rec(item_id=f"ok{i + 1}")]
  recs.append(_rec(item_id="ok3"))  # a duplicate id
  path = _write(tmp_path, recs, name)
  if name.endswith(".jsonl"):  # plus a line that is not JSON
    with open(path, "a") as f:
      f.write("{not json\n")
  ledger = SkipLedger()
  out = A.load_records(path, on_bad_sample="skip", ledger=ledger, labels=["normal", "abnormal"])
  assert [r.item_id for r in out] == [f"ok{i}" for i in range(len(BAD_CASES) + 1)]
  n_bad_record = len(BAD_CASES) - 1 + 1 + (1 if name.endswith(".jsonl") else 0)
  assert dict(ledger.counts) == {errors.BAD_RECORD: n_bad_record, errors.UNKNOWN_LABEL: 1}


def test_duplicate_id_error(tmp_path):
  path = _write(tmp_path, [_rec(), _rec()])
  with pytest.raises(BadSample, match=r"duplicate item_id .*first at .*#0"):
    A.load_records(path)


def test_jsonl_bad_line_error(tmp_path):
  p = tmp_path / "b.jsonl"
  p.write_text(json.dumps(GOOD) + "\n\n{broken\n")
  with pytest.raises(BadSample, match="line 3 is not valid JSON"):
    A.load_records(p)


def test_not_json_file(tmp_path):
  p = tmp_path / "c.json"
  p.write_text('[\n  {"item_id": "a",\n  oops\n]')
  with pytest.raises(ValueError, match=r"not valid JSON.*line 3, column 3"):
    A.load_records(p)
  p.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    A.load_records(p)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    A.load_records(tmp_path / "nope.json")
  with pytest.raises(ValueError, match="on_bad_sample"):
    A.load_records(DATA / "stage1_train_sample.json", on_bad_sample="ignore")


def test_labels_from_records_order_and_conflicts():
  def r(label, idx):
    return A.Record("i", "v", "p", "", label, idx, {}, "s")
  assert A.labels_from_records([r("b", 1), r("a", 0), r("b", 1)]) == ["a", "b"]
  assert A.labels_from_records([r("z", None), r("y", None), r("x", 0)]) == ["x", "z", "y"]
  with pytest.raises(ValueError, match="anno_label 0 and 1"):
    A.labels_from_records([r("a", 0), r("a", 1)])
  with pytest.raises(ValueError, match="names both"):
    A.labels_from_records([r("a", 0), r("b", 0)])


# ----------------------------------------------------------------------------- class files
@pytest.mark.parametrize("name,text,want", [
    ("c.json", '["left", "right"]', {"left": "", "right": ""}),
    ("c.json", '{"left": "goes left", "right": " goes right "}',
     {"left": "goes left", "right": "goes right"}),
    ("c.json", '[{"label": "up", "definition": "goes up"}]', {"up": "goes up"}),
    ("c.json", '{"a": [{"playbook_rule": ["r1", "r2"], "Policy Code": ["X"]}]}', {"a": "r1 r2"}),
    ("c.txt", "# comment\nleft: moves to the left\n\nright\n up : goes: up \n",
     {"left": "moves to the left", "right": "", "up": "goes: up"}),
])
def test_class_file_formats(tmp_path, name, text, want):
  p = tmp_path / name
  p.write_text(text)
  got = A.load_class_file(p)
  assert got == want and list(got) == list(want)


@pytest.mark.parametrize("text,match", [
    ('["a", "a"]', "duplicate label 'a'"),
    ("[]", "no labels"),
    ('{"a": 3}', "label 'a' maps to a int"),
    ('["a", ""]', "entry #1"),
    ('{"a": ', "not valid JSON"),
])
def test_bad_class_files(tmp_path, text, match):
  p = tmp_path / "c.json"
  p.write_text(text)
  with pytest.raises(ValueError, match=match):
    A.load_class_file(p)


# ----------------------------------------------------------------------------- video paths
@pytest.fixture()
def root(tmp_path):
  A.clear_path_index()
  for rel in ["frame_zips/smartbench_0001.zip", "a/frame_zips/dup.zip", "b/other/dup.zip",
              "x/same.mp4", "y/same.mp4", "frames/clip_dir/0001.jpg", "rel/v.mp4"]:
    p = tmp_path / "root" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
  yield str(tmp_path / "root")
  A.clear_path_index()


def test_relative_and_existing_absolute(root):
  assert A.resolve_video_path("rel/v.mp4", root) == os.path.join(root, "rel/v.mp4")
  absolute = os.path.join(root, "x/same.mp4")
  assert A.resolve_video_path(absolute, "/does/not/matter") == absolute
  with pytest.raises(BadSample) as e:
    A.resolve_video_path("rel/missing.mp4", root, item_id="it1")
  assert e.value.kind == errors.MISSING_FILE and "'it1'" in str(e.value)


def test_remap_by_name(root):
  got = A.resolve_video_path("/mnt/cluster/SmartHome-Bench/frame_zips/smartbench_0001.zip", root)
  assert got == os.path.join(root, "frame_zips/smartbench_0001.zip")
  # A frame folder is found by name too.
  assert A.resolve_video_path("/mnt/c/frames/clip_dir", root) == os.path.join(root,
                                                                              "frames/clip_dir")
  # Two files share the name: the one sharing more trailing folders wins.
  assert A.resolve_video_path("/mnt/z/frame_zips/dup.zip", root) == os.path.join(
      root, "a/frame_zips/dup.zip")
  with pytest.raises(BadSample) as e:
    A.resolve_video_path("/mnt/z/same.mp4", root, item_id="it2")
  assert e.value.kind == A.AMBIGUOUS_FILE
  assert "x/same.mp4" in str(e.value) and "y/same.mp4" in str(e.value)
  with pytest.raises(BadSample) as e:
    A.resolve_video_path("/mnt/z/absent.zip", root, item_id="it3")
  assert e.value.kind == errors.MISSING_FILE and "absent.zip" in str(e.value)
  with pytest.raises(BadSample, match="video root"):
    A.resolve_video_path("/mnt/z/absent.zip", None)


def test_release_records_resolve_onto_root(root):
  recs = A.load_records(DATA / "stage1_train_sample.json")
  assert A.resolve_video_path(recs[0].video, root, item_id=recs[0].item_id).endswith(
      "root/frame_zips/smartbench_0001.zip")
  with pytest.raises(BadSample, match="smartbench_0002"):
    A.resolve_video_path(recs[1].video, root, item_id=recs[1].item_id)
