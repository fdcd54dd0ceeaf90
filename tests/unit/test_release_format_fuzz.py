"""Property test of the release-format readers (issue 18 item 6): records mutated at random
(wrong types, missing keys, empty, huge and non-Unicode strings, bad paths, broken zips,
zero-length videos) in JSON or JSONL files that may themselves be cut short, hold bytes that
are not UTF-8 or nest too deeply. Every case loads, or its bad records are skipped and
counted, or it stops with a one-line error naming the item or the file: never another
exception (a traceback for the user) and never a hang. The class-file reader likewise."""
from __future__ import annotations

import copy
import datetime
import itertools
import json
import zipfile

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from tests.deadline import deadline
from deepintuit_jax.core.errors import UserError
from deepintuit_jax.data import annotations, chat
from deepintuit_jax.data.errors import BadSample, SkipLedger
from deepintuit_jax.data.examples import marker_error
from deepintuit_jax.data.pipeline import PipelineOptions, _builder
from deepintuit_jax.models import tiny

LABELS = ("left", "right")
BASE = {"item_id": "clip", "policy_title": "left", "anno_label": 0, "conversations": [
    {"role": "user", "content": [{"type": "video", "video": "good.mp4"},
                                 {"type": "text", "text": "Where does it go?"}]},
    {"role": "assistant", "content": "<think>left</think><answer>left</answer>"}]}
FIELDS = (("item_id",), ("policy_title",), ("reward_label",), ("anno_label",), ("title",),
          ("conversations",), ("conversations", 0), ("conversations", 0, "role"),
          ("conversations", 0, "content"), ("conversations", 0, "content", 0),
          ("conversations", 0, "content", 0, "type"), ("conversations", 0, "content", 0, "video"),
          ("conversations", 0, "content", 1, "text"), ("conversations", 1),
          ("conversations", 1, "role"), ("conversations", 1, "content"))
HUGE = "word " * 20_000
STRINGS = ("", HUGE, "x" * 100_000, "\udc80 lone surrogate", "nul\x00byte", "line\nbreak",
           "ümlaut ✓", "left", "right", "<answer>left</answer>")
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.just(10 ** 40),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(STRINGS),
                 st.text(max_size=12), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.sampled_from(("type", "text", "video", "role")),
                                 st.sampled_from(STRINGS[:3] + ("video", "text")), max_size=2))
# Video entries: files made by the `media` fixture, and paths that are not there or not usable.
VIDEOS = ("good.mp4", "empty.mp4", "no_frames.mp4", "garbage.mp4", "frames.zip", "cut.zip",
          "no_images.zip", "bad_image.zip", "empty_image.zip", "frames", "empty_dir",
          "notes.txt", "missing.mp4", "/elsewhere/cluster/good.mp4", "/elsewhere/good.mp4",
          "/elsewhere/none.mp4", "../../etc/passwd", "a" * 5000 + ".mp4", "go\x00od.mp4",
          "frames.zip/0.png", "")
VIDEO = ("conversations", 0, "content", 0, "video")


def _mutation():
  return st.one_of(st.tuples(st.just("set"), st.sampled_from(FIELDS), JUNK),
                   st.tuples(st.just("del"), st.sampled_from(FIELDS), st.none()),
                   st.tuples(st.just("set"), st.just(VIDEO), st.sampled_from(VIDEOS)))


def _apply(record: dict, kind: str, path: tuple, value) -> None:
  node = record
  for key in path[:-1]:
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError):
      return  # an earlier mutation removed or replaced the container
  if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int)
                                and path[-1] < len(node)):
    if kind == "del" and isinstance(node, dict):
      node.pop(path[-1], None)
    elif kind == "del":
      del node[path[-1]]
    else:
      node[path[-1]] = value


@st.composite
def release_files(draw):
  """(file name, bytes, number of records or None when the file itself is broken)."""
  records = []
  for i in range(draw(st.integers(1, 4))):
    r = copy.deepcopy(BASE)
    r["item_id"] = f"clip{i}"
    for kind, path, value in draw(st.lists(_mutation(), max_size=3)):
      _apply(r, kind, path, value)
    records.append(r)
  jsonl = draw(st.booleans())
  ascii_only = draw(st.booleans())
  if jsonl:
    data = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
  else:
    data = json.dumps(records, ensure_ascii=ascii_only)
  raw = data.encode("utf-8", "surrogatepass")  # a raw lone surrogate is not UTF-8 either
  count = len(records) if ascii_only else None
  damage = draw(st.sampled_from(("none",) * 6 + ("cut", "bad_byte", "empty", "deep", "value")))
  if damage == "cut":
    raw = raw[:draw(st.integers(0, len(raw)))]
  elif damage == "bad_byte":
    at = draw(st.integers(0, len(raw)))
    raw = raw[:at] + b"\xff\xfe" + raw[at:]
  elif damage == "empty":
    raw = b""
  elif damage == "deep":
    raw = b"[" * 100_000 + b"]" * 100_000 + (b"\n" if jsonl else b"")
  elif damage == "value":
    raw = json.dumps(draw(JUNK)).encode()
  return ("a.jsonl" if jsonl else "a.json"), raw, count if damage == "none" else None


def _write_mp4(path, frames):
  vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (28, 28))
  for i in range(frames):
    vw.write(np.full((28, 28, 3), 40 * i, np.uint8))
  vw.release()


def _png(value: int) -> bytes:
  return cv2.imencode(".png", np.full((28, 28, 3), value, np.uint8))[1].tobytes()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """The video root: a good mp4, zip and frame folder, and broken ones of each."""
  root = tmp_path_factory.mktemp("media")
  _write_mp4(str(root / "good.mp4"), 4)
  _write_mp4(str(root / "no_frames.mp4"), 0)  # a container with no frame
  (root / "empty.mp4").write_bytes(b"")
  (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
  (root / "notes.txt").write_text("not a video")
  with zipfile.ZipFile(root / "frames.zip", "w") as z:
    for i in range(4):
      z.writestr(f"{i}.png", _png(40 * i))
  (root / "cut.zip").write_bytes((root / "frames.zip").read_bytes()[:300])
  with zipfile.ZipFile(root / "no_images.zip", "w") as z:
    z.writestr("readme.txt", "no frames here")
  with zipfile.ZipFile(root / "bad_image.zip", "w") as z:
    z.writestr("0.png", b"\x89PNG not really")
  with zipfile.ZipFile(root / "empty_image.zip", "w") as z:
    z.writestr("0.png", b"")
  (root / "frames").mkdir()
  for i in range(3):
    (root / "frames" / f"{i}.png").write_bytes(_png(60 * i))
  (root / "empty_dir").mkdir()
  # By name: "/elsewhere/cluster/good.mp4" is cluster/good.mp4, "/elsewhere/good.mp4" a tie.
  (root / "cluster").mkdir()
  (root / "cluster" / "good.mp4").write_bytes((root / "good.mp4").read_bytes())
  return str(root)


@pytest.fixture(scope="module")
def builders(media):
  tok = tiny.build_tokenizer(seed=0)
  chat.add_special_tokens(tok, LABELS)
  cfg = tiny.tiny_config()
  opts = {mode: PipelineOptions(video_root=media, min_pixels=28 * 28, max_pixels=56 * 56,
                                max_frames=4, min_frames=2, max_seq_len=256,
                                length_buckets=(64, 128, 256), patch_buckets=(32, 64, 128, 256),
                                labels=LABELS, on_bad_sample=mode)
          for mode in ("error", "skip")}
  return lambda records, mode: _builder(records, tok, cfg, opts[mode], False)


@pytest.fixture(autouse=True)
def _no_hang():
  with deadline(120, "the fuzz test"):
    yield


def _one_line(e: BaseException, *names: str) -> None:
  """What `main` prints (`error: <e>`): one printable line that names one of `names`."""
  msg = str(e)
  assert "\n" not in msg and "\r" not in msg and len(msg) < 2000, repr(msg[:3000])
  msg.encode("utf-8")  # printable to a UTF-8 terminal
  assert any(n and n in msg for n in names), (msg, names)


_COUNTER = itertools.count()
SETTINGS = settings(max_examples=300, deadline=datetime.timedelta(seconds=10), derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                          HealthCheck.too_slow])


@SETTINGS
@given(case=release_files(), mode=st.sampled_from(("error", "skip")))
def test_mutated_release_files_load_skip_or_stop_with_one_line(media, builders, tmp_path, case,
                                                               mode):
  name, raw, count = case
  path = str(tmp_path / f"{next(_COUNTER)}_{name}")
  with open(path, "wb") as f:
    f.write(raw)
  ledger = SkipLedger()
  try:
    records = annotations.load_records(path, on_bad_sample=mode, ledger=ledger, labels=LABELS)
  except BadSample as e:  # the first bad record, in error mode
    event(f"stopped: {e.kind}")
    assert mode == "error"
    _one_line(e, path)
    return
  except UserError as e:  # the file as a whole: missing, not JSON, no usable record
    event("stopped: the file")
    _one_line(e, path)
    return
  if count is not None and mode == "skip":
    assert len(records) + ledger.total == count
  build = builders(records, mode)
  for i, record in enumerate(records):
    out = build(i, i)  # what a data worker hands the loader
    assert "error" not in out and "oom" not in out, out.get("error")
    if "bad" in out:  # raised in error mode, counted in skip mode: either way one line
      err = marker_error(out)
      event(f"skipped or stopped: {err.kind}")
      assert err.item_id == record.item_id
      _one_line(err, repr(record.item_id)[:60])
    else:
      event("loaded")
      assert out["input_ids"].size and out["pixel_values_videos"].size


CLASS_VALUES = st.one_of(JUNK, st.lists(st.dictionaries(
    st.sampled_from(("prompt", "definition", "playbook_rule", "label")), JUNK, max_size=3),
    max_size=3))


@st.composite
def class_files(draw):
  kind = draw(st.sampled_from(("object", "list", "text", "bytes")))
  if kind == "object":
    data = json.dumps(draw(st.dictionaries(st.sampled_from(STRINGS + ("a", "b")),
                                           CLASS_VALUES, max_size=4)))
  elif kind == "list":
    data = json.dumps(draw(st.lists(st.one_of(JUNK, st.dictionaries(
        st.sampled_from(("label", "definition")), JUNK, max_size=2)), max_size=4)))
  elif kind == "text":
    data = "\n".join(draw(st.lists(st.sampled_from(STRINGS + ("# note", "a: the a class")),
                                   max_size=4)))
  else:
    return draw(st.sampled_from((b"\xff\xfe left", b"[" * 100_000, b'{"a": "\xc3"}', b"")))
  return data.encode("utf-8", "surrogatepass")


@SETTINGS
@given(raw=class_files())
def test_mutated_class_files_load_or_stop_with_one_line(tmp_path, raw):
  path = str(tmp_path / f"{next(_COUNTER)}_classes.json")
  with open(path, "wb") as f:
    f.write(raw)
  try:
    classes = annotations.load_class_file(path)
  except UserError as e:
    _one_line(e, path)
    return
  assert classes and all(isinstance(k, str) and isinstance(v, str) for k, v in classes.items())
  json.dumps(classes, ensure_ascii=False).encode("utf-8")  # written as the trace stage does
