"""Grain pipeline: batching, buckets, mixed grids, exact resume, sharding, bad samples."""
import json
import os
import re
import zipfile

import cv2
import numpy as np
import pytest

from tests.deadline import deadline
from deepintuit_jax.data import chat, errors
from deepintuit_jax.data.annotations import Record
from deepintuit_jax.data.errors import BadSample, SkipLedger
from deepintuit_jax.data.pipeline import PipelineOptions, make_eval_batches, make_train_loader
from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl import rope
from deepintuit_jax.models.qwen2_5_vl.vision_layout import vision_layout

LABELS = ("left", "right")
# Tiny frames: min/max pixels make grids of 2x2 .. 4x4 patches (28..56 px per side).
OPTS = dict(min_pixels=28 * 28, max_pixels=56 * 56, max_frames=4, min_frames=2,
            length_buckets=(64, 128, 256), max_seq_len=256, patch_buckets=(32, 64, 128, 256),
            labels=LABELS)


@pytest.fixture(autouse=True)
def _no_hang():
  """Any test taking over 60 s fails instead of hanging the suite."""
  with deadline(60):
    yield


def _write_mp4(path, n, h, w, seed):
  rng = np.random.default_rng(seed)
  vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (w, h))
  assert vw.isOpened()
  for _ in range(n):
    vw.write(rng.integers(0, 255, (h, w, 3), np.uint8))
  vw.release()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("videos"))
  sizes = [(28, 28), (56, 56), (28, 56), (56, 28)]
  recs = []
  for i in range(12):
    h, w = sizes[i % 4]
    _write_mp4(os.path.join(root, f"v{i}.mp4"), 4 + 2 * (i % 2), h, w, seed=i)
    label = LABELS[i % 2]
    recs.append(Record(item_id=f"item{i}", video=f"v{i}.mp4", prompt=f"Where does it go? {i}",
                       response=f"<think>it moves {label}</think><answer>{label}</answer>",
                       label=label, label_index=i % 2, extra={}, source=f"test:#{i}"))
  tok = tiny.build_tokenizer(seed=0)
  chat.add_special_tokens(tok, LABELS)
  return dict(root=root, records=recs, tok=tok, cfg=tiny.tiny_config())


def _opts(env, **kw):
  return PipelineOptions(**{**OPTS, "video_root": env["root"], **kw})


def _loader(env, records=None, **kw):
  bs = kw.pop("batch_size", 4)
  ne = kw.pop("num_epochs", None)
  pk = {k: kw.pop(k) for k in ("process_index", "process_count", "ledger", "groups",
                               "shape_sync") if k in kw}
  pk.setdefault("process_index", 0)
  pk.setdefault("process_count", 1)
  return make_train_loader(env["records"] if records is None else records, tokenizer=env["tok"],
                           model_config=env["cfg"], options=_opts(env, **kw), batch_size=bs,
                           num_epochs=ne, **pk)


def _arrays(batch):
  return {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}


def _same(a, b):
  assert a["item_id"] == b["item_id"]
  for k, v in _arrays(a).items():
    np.testing.assert_array_equal(v, b[k], err_msg=k)


def test_batch_contract_buckets_and_mixed_grids(env):
  loader = _loader(env, shuffle=False, batch_size=4, num_epochs=1)
  batches = list(loader)
  assert len(batches) == 3 == loader.steps_per_epoch
  pad = env["tok"].pad_token_id
  cfg = env["cfg"]
  for b in batches:
    ids, am, lm = b["input_ids"], b["attention_mask"], b["loss_mask"]
    bsz, t = ids.shape
    assert bsz == 4 and t in (64, 128, 256) and ids.dtype == np.int32
    lengths = am.sum(1)
    assert t == min(x for x in (64, 128, 256) if x >= lengths.max())  # smallest bucket
    for r in range(4):  # right padding with the pad id, mask only inside the real tokens
      assert am[r, :lengths[r]].all() and not am[r, lengths[r]:].any()
      assert (ids[r, lengths[r]:] == pad).all() and not lm[r, lengths[r] - 1:].any()
    # Grids differ within a batch; pad tokens match t*h*w/4 of each grid.
    grids = b["video_grid_thw"]
    assert grids.shape == (4, 3) and len({tuple(g) for g in grids.tolist()}) > 1
    n_tok = (ids == cfg.video_token_id).sum(1)
    np.testing.assert_array_equal(n_tok, grids.prod(1) // 4)
    n = int(grids.prod(1).sum())
    pv = b["pixel_values_videos"]
    assert pv.shape[0] == min(x for x in (32, 64, 128, 256) if x >= n) and pv.shape[1] == 1176
    assert not pv[n:].any() and np.abs(pv[:n]).sum(1).min() > 0
    # The layout's shapes depend only on the patch bucket and max_frame_patches (16).
    ref = vision_layout(np.array([[2, 2, 2]]), cfg.vision, pad_to=pv.shape[0],
                        max_frame_patches=16)
    lay = b["video_layout"]
    for x, y in zip(ref.__dict__.values(), lay.__dict__.values()):
      if isinstance(x, np.ndarray):
        assert x.shape == y.shape
    assert lay.num_merged_tokens == n // 4
    pos, _ = rope.get_rope_index(cfg, ids, am, None, grids, b["second_per_grid_ts"])
    np.testing.assert_array_equal(b["position_ids"], pos)
    # 4 and 6 source frames at 4 fps, max 4 frames sampled: two temporal patches.
    assert b["second_per_grid_ts"].dtype == np.float32 and (grids[:, 0] == 2).all()
    assert b["labels"] == [("left", "right")[int(i[4:]) % 2] for i in b["item_id"]]
  assert [i for b in batches for i in b["item_id"]] == [f"item{i}" for i in range(12)]


def test_loss_mask_targets_the_response(env):
  b = next(iter(_loader(env, shuffle=False, batch_size=2)))
  tok = env["tok"]
  for r in range(2):
    tgt = b["input_ids"][r, 1:][b["loss_mask"][r, :-1] == 1]
    rec = env["records"][int(b["item_id"][r][4:])]
    assert tok.decode(tgt.tolist(), skip_special_tokens=False) == rec.response + "<|im_end|>\n"


def test_shuffle_differs_per_epoch_and_covers(env):
  loader = _loader(env, batch_size=4, num_epochs=2, seed=3)
  ids = [i for b in loader for i in b["item_id"]]
  e0, e1 = ids[:12], ids[12:]
  assert sorted(e0) == sorted(e1) == sorted(r.item_id for r in env["records"])
  assert e0 != e1 and e0 != [r.item_id for r in env["records"]]
  again = [i for b in _loader(env, batch_size=4, num_epochs=2, seed=3) for i in b["item_id"]]
  assert again == ids


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(env, tmp_path, workers):
  """k batches, state, m more == a new loader set to that state, m batches; also in worker
  processes, with bad samples skipped (markers cross processes; counts restored)."""
  bad, _ = _bad_env(env, tmp_path)
  records = env["records"] + bad[:3]
  kw = dict(batch_size=3, num_workers=workers, seed=7, on_bad_sample="skip")
  a = _loader(env, records, **kw)
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))  # JSON round trip, as a checkpoint would
  want = [next(a) for _ in range(5)]  # crosses the epoch boundary (4 batches per epoch)
  metrics = a.skip_metrics()
  a.close()
  b = _loader(env, records, **kw)
  b.set_state(state)
  got = [next(b) for _ in range(5)]
  b.close()
  for x, y in zip(want, got):
    _same(x, y)
  assert b.skip_metrics() == metrics and metrics["skipped/total"] >= 3
  if not workers:
    with pytest.raises(ValueError, match="batch_size"):
      _loader(env, records, **{**kw, "batch_size": 2}).set_state(state)
    with pytest.raises(ValueError, match="seed=7"):
      _loader(env, records, **{**kw, "seed": 8}).set_state(state)


def test_sharding_two_processes(env):
  shards = [[i for b in _loader(env, batch_size=2, num_epochs=1, process_index=p,
                                process_count=2) for i in b["item_id"]] for p in (0, 1)]
  assert len(shards[0]) == len(shards[1]) == 6
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == {r.item_id for r in env["records"]}


def test_partial_batch_padded_with_dummy_rows(env):
  batches = list(_loader(env, batch_size=5, num_epochs=1, drop_remainder=False))
  assert [b["num_real"] for b in batches] == [5, 5, 2]
  last = batches[-1]
  assert last["item_id"][2:] == ["", "", ""] and not last["loss_mask"][2:].any()
  assert (last["attention_mask"][2:].sum(1) == 1).all()
  assert len(list(_loader(env, batch_size=5, num_epochs=1))) == 2  # drop_remainder


def test_grouped_batches_split_rows_and_videos(env):
  flat = next(iter(_loader(env, shuffle=False, batch_size=4)))
  seen = []

  def sync(needs):  # stands in for the max over processes: forces larger shapes
    seen.append(needs)
    return (256, 256)
  grouped = next(iter(_loader(env, shuffle=False, batch_size=4, groups=2, shape_sync=sync)))
  t = flat["input_ids"].shape[1]
  # Grids (t, h, w) of rows 0..3: 2x2x2, 2x4x4, 2x2x4, 2x4x2 (8, 32, 16, 16 patches): the
  # groups need 40 and 32 patches -> bucket 64 (the flat batch: 72 -> 128).
  assert flat["video_grid_thw"].tolist() == [[2, 2, 2], [2, 4, 4], [2, 2, 4], [2, 4, 2]]
  assert seen == [(t, 64)] and flat["pixel_values_videos"].shape[0] == 128
  assert grouped["input_ids"].shape == (2, 2, 256) and grouped["num_groups"] == 2
  assert grouped["position_ids"].shape == (2, 3, 2, 256)
  assert grouped["pixel_values_videos"].shape == (2, 256, flat["pixel_values_videos"].shape[1])
  assert grouped["item_id"] == flat["item_id"]
  np.testing.assert_array_equal(grouped["input_ids"].reshape(4, -1)[:, :t], flat["input_ids"])
  np.testing.assert_array_equal(
      grouped["position_ids"].transpose(1, 0, 2, 3).reshape(3, 4, -1)[..., :t],
      flat["position_ids"])
  n0 = int(flat["video_grid_thw"][:2].prod(-1).sum())
  n1 = int(flat["video_grid_thw"][2:].prod(-1).sum())
  pv, gp = flat["pixel_values_videos"], grouped["pixel_values_videos"]
  np.testing.assert_array_equal(gp[0, :n0], pv[:n0])
  np.testing.assert_array_equal(gp[1, :n1], pv[n0:n0 + n1])
  assert not gp[0, n0:].any() and not gp[1, n1:].any()
  assert grouped["video_layout"].merged_valid.sum(-1).tolist() == [n0 // 4, n1 // 4]
  # A last partial batch leaves whole groups of dummy rows: no videos, zero pixels.
  last = list(_loader(env, shuffle=False, batch_size=8, num_epochs=1, drop_remainder=False,
                      groups=4))[-1]
  assert last["num_real"] == 4 and not last["pixel_values_videos"][2:].any()
  assert not last["video_layout"].merged_valid[2:].any()
  with pytest.raises(ValueError, match="groups=3"):
    _loader(env, batch_size=4, groups=3)


def _bad_env(env, tmp_path):
  root = env["root"]
  with open(os.path.join(root, "corrupt.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(300))
  with open(os.path.join(root, "garbage.zip"), "wb") as f:
    f.write(b"PK\x03\x04 this is not a zip archive")
  with zipfile.ZipFile(os.path.join(root, "empty.zip"), "w"):
    pass
  good = env["records"][0]
  mk = lambda i, **kw: Record(**{**good.__dict__, "item_id": f"bad_{i}", **kw})
  bad = [mk("missing", video="nope.mp4"), mk("corrupt", video="corrupt.mp4"),
         mk("zip", video="garbage.zip"), mk("emptyzip", video="empty.zip"),
         mk("noprompt", prompt=""), mk("label", label="up"), mk("long", prompt="left " * 400)]
  # A corrupt mp4 may read as corrupt or as holding no frames, depending on the codec.
  kinds = {"bad_missing": {errors.MISSING_FILE},
           "bad_corrupt": {errors.CORRUPT_VIDEO, errors.NO_FRAMES},
           "bad_zip": {errors.BAD_ZIP}, "bad_emptyzip": {errors.NO_FRAMES},
           "bad_noprompt": {errors.BAD_RECORD}, "bad_label": {errors.UNKNOWN_LABEL},
           "bad_long": {errors.TOO_LONG}}
  return bad, kinds


def test_bad_samples_error_mode_names_item_path_reason(env, tmp_path):
  bad, kinds = _bad_env(env, tmp_path)
  for rec in bad:
    loader = _loader(env, records=[env["records"][1], rec], batch_size=2, num_epochs=1,
                     shuffle=False, on_bad_sample="error")
    with pytest.raises(BadSample) as e:
      next(loader)
    assert e.value.item_id == rec.item_id and rec.item_id in str(e.value)
    assert e.value.kind in kinds[rec.item_id]
    if rec.item_id in ("bad_missing", "bad_corrupt", "bad_zip", "bad_emptyzip"):
      assert os.path.basename(rec.video) in str(e.value)


def test_bad_samples_skip_mode_counts_by_kind(env, tmp_path):
  bad, kinds = _bad_env(env, tmp_path)
  good = env["records"][:7]
  records = [r for pair in zip(good, bad) for r in pair]
  prior = SkipLedger()  # e.g. from annotations.load_records(..., ledger=prior)
  prior.add(BadSample("missing field", kind=errors.BAD_RECORD, item_id="x0"))
  loader = _loader(env, records=records, batch_size=2, num_epochs=1, on_bad_sample="skip",
                   ledger=prior)
  seen = [i for b in loader for i in b["item_id"]]
  # 7 good ones in batches of 2: the epoch's partial batch (one item) is dropped.
  assert len(set(seen)) == len(seen) == 6 and set(seen) < {r.item_id for r in good}
  m = loader.skip_metrics()
  assert m["skipped/total"] == 8
  assert m["skipped/bad_record"] == 2 and m["skipped/missing_file"] == 1
  assert m["skipped/bad_zip"] == 1 and m["skipped/unknown_label"] == 1
  assert m["skipped/too_long"] == 1
  assert m.get("skipped/corrupt_video", 0) + m["skipped/no_frames"] == 2
  assert "bad_missing" in loader.skip_summary()
  assert "epoch 0 done: skipped 7" in loader.epoch_summaries[0]


def test_eval_batches_generation_left_padded(env, tmp_path):
  bad, _ = _bad_env(env, tmp_path)
  records = env["records"][:5] + [bad[0]]
  batches = list(make_eval_batches(
      records, tokenizer=env["tok"], model_config=env["cfg"],
      options=_opts(env, on_bad_sample="skip"), batch_size=4, process_index=0,
      process_count=1))
  assert [b["num_real"] for b in batches] == [4, 1]
  assert batches[1]["item_id"] == ["item4", "", "", ""]
  tok = env["tok"]
  for b in batches:
    am = b["attention_mask"]
    t = am.shape[1]
    for r in range(b["num_real"]):
      n = int(am[r].sum())
      assert am[r, t - n:].all() and not am[r, :t - n].any()  # left padding
      text = tok.decode(b["input_ids"][r, t - n:].tolist(), skip_special_tokens=False)
      assert text.endswith("<|im_start|>assistant\n") and "<answer>" not in text
    assert not b["loss_mask"].any() and b["rope_deltas"].shape == (4,)
  assert batches[0]["labels"] == ["left", "right", "left", "right"]
  tf = list(make_eval_batches(records[:4], tokenizer=tok, model_config=env["cfg"],
                              options=_opts(env), batch_size=4, for_generation=False,
                              process_index=0, process_count=1))
  ref = next(iter(_loader(env, shuffle=False, batch_size=4)))
  _same(tf[0], ref)


def test_eval_batches_sharded_equal_counts(env):
  shards = [list(make_eval_batches(env["records"][:5], tokenizer=env["tok"],
                                   model_config=env["cfg"], options=_opts(env), batch_size=2,
                                   process_index=p, process_count=2)) for p in (0, 1)]
  assert [len(s) for s in shards] == [2, 2]  # ceil(ceil(5 / 2) / 2) on every process
  ids = [[i for b in s for i in b["item_id"]] for s in shards]
  assert ids == [["item0", "item2", "item4", ""], ["item1", "item3", "", ""]]
  assert shards[1][1]["num_real"] == 0 and shards[1][1]["pixel_values_videos"] is None


def test_unexpected_error_names_the_item(env, monkeypatch):
  from deepintuit_jax.data import video

  def broken(*a, **k):
    raise RuntimeError("decoder exploded")
  monkeypatch.setattr(video, "load_video", broken)
  with _loader(env, batch_size=2, on_bad_sample="skip") as loader:
    with pytest.raises(RuntimeError, match=r"item 'item\d+'.*decoder exploded"):
      next(loader)


def test_options_validation():
  with pytest.raises(ValueError, match="on_bad_sample"):
    PipelineOptions(on_bad_sample="ignore")
  with pytest.raises(ValueError, match="multiples of 4"):
    PipelineOptions(patch_buckets=(30,))
  o = PipelineOptions(max_seq_len=1000, length_buckets=(256, 512, 1024, 2048))
  assert o.length_buckets == (256, 512, 1000)
  assert o.length_bucket(513) == 1000 and o.patch_bucket(300) == 512
  with pytest.raises(ValueError, match="max_seq_len"):
    o.length_bucket(1001)
  # length steps: each interval between buckets cut into `steps` steps (multiples of 8),
  # never past the bucket itself.
  o = PipelineOptions(max_seq_len=8192)
  assert o.length_bucket(407, 8) == 416 and o.length_bucket(407, 4) == 448
  assert o.length_bucket(407, 1) == o.length_bucket(407) == 512
  assert o.length_bucket(1, 8) == 32 and o.length_bucket(256, 8) == 256
  assert o.length_bucket(257, 8) == 288 and o.length_bucket(5000, 8) == 5120
  grid = {o.length_bucket(n, 8) for n in range(1, 8193)}
  assert len(grid) == 8 * len(o.length_buckets) and all(n % 8 == 0 for n in grid)
  assert PipelineOptions(max_seq_len=1000).length_bucket(999, 8) == 1000


def test_synthetic_benchmark_end_to_end(tmp_path):
  """The release-format files of data/synthetic.py -> records -> batches."""
  from deepintuit_jax.data import annotations, synthetic
  paths = synthetic.generate(tmp_path, seed=1, num_train=4, num_test=1, min_frames=4,
                             max_frames=6)
  classes = annotations.load_class_file(paths["classes"])
  recs = annotations.load_records(paths["train"], labels=list(classes))
  tok = tiny.build_tokenizer(seed=0)
  chat.add_special_tokens(tok, list(classes))
  opts = PipelineOptions(video_root=str(tmp_path), min_pixels=28 * 28, max_pixels=56 * 56,
                         max_seq_len=4096, labels=tuple(classes), shuffle=False)
  with make_train_loader(recs, tokenizer=tok, model_config=tiny.tiny_config(),
                         options=opts, batch_size=4, num_epochs=1, process_index=0,
                         process_count=1) as loader:
    (b,) = list(loader)
  assert b["item_id"] == [r.item_id for r in recs] and b["labels"] == [r.label for r in recs]
  for r, rec in enumerate(recs):
    tgt = b["input_ids"][r, 1:][b["loss_mask"][r, :-1] == 1]
    assert tok.decode(tgt.tolist(), skip_special_tokens=False) == rec.response + "<|im_end|>\n"
    assert rec.label in tok.decode(tgt.tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("fault,workers", [("kill", 2), ("oom", 0)])
def test_a_dying_data_worker_stops_with_one_line_and_the_state_still_resumes(
    env, monkeypatch, fault, workers):
  """A worker killed (as by the out-of-memory killer) or out of memory on an item: the loader
  raises one line naming the worker (and, for a MemoryError, the item) instead of hanging
  (the autouse 60 s alarm), and the state taken before still resumes the same batches (the
  order does not depend on the workers: the reference reads in-process, as it is faster)."""
  from deepintuit_jax.core.errors import DataWorkerError
  from deepintuit_jax.data import pipeline
  from tests.unit.faulty_builder import FaultyBuilder
  kw = dict(batch_size=3, num_workers=workers, seed=7)
  ref = _loader(env, **{**kw, "num_workers": 0})
  for _ in range(2):
    next(ref)
  want = [next(ref) for _ in range(3)]
  ref.close()
  victim = want[1]["item_id"][0]  # met only after the state below is taken
  build = pipeline._builder
  monkeypatch.setattr(pipeline, "_builder",
                      lambda *a: FaultyBuilder.of(build(*a), victim=victim, fault=fault))
  dying = _loader(env, **kw)
  for _ in range(2):
    next(dying)
  state = json.loads(json.dumps(dying.get_state()))
  with pytest.raises(DataWorkerError) as e:
    for _ in range(6):
      next(dying)
  dying.close()
  msg = str(e.value)
  assert "\n" not in msg and "lower data.num_workers" in msg
  if fault == "kill":
    assert re.search(rf"data worker \d of {workers} was killed \(SIGKILL", msg), msg
  else:
    assert "out of memory in the main process" in msg and repr(victim) in msg, msg
  monkeypatch.setattr(pipeline, "_builder", build)
  resumed = _loader(env, **kw)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(3)]
  resumed.close()
  for x, y in zip(want, got):
    _same(x, y)
