"""get_rope_index parity for each rope rule the config offers (rope.CONVENTIONS):

* "transformers_5.3" against the installed transformers' `Qwen2_5_VLModel.get_rope_index`
  (>= 5.3: the text after a vision chunk starts at `start + max(h, w) / merge`);
* "qwen" against `_qwen_reference`, a transcription written here of the original Qwen2.5-VL
  `get_rope_index` (transformers 4.49-4.51, which vLLM follows): vision-start scanning,
  one past the chunk's largest position, a float32 time tensor truncated by `.long()`;
* "transformers_5.2" against the same transcription with the seconds per grid cast to int64
  first, as transformers 4.52-5.2 do.
"""
import functools
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, VisionConfig  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl.rope import get_rope_index  # noqa: E402

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _config(tps=2.0):
  return Qwen2_5_VLConfig(vision=VisionConfig(tokens_per_second=tps, out_hidden_size=3584))


def _hf(cfg, ids, mask, img, vid, spg):
  """Calls transformers' method unbound on a stand-in holding only what it reads."""
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
  stub = types.SimpleNamespace(
      config=types.SimpleNamespace(vision_config=types.SimpleNamespace(
          spatial_merge_size=cfg.vision.spatial_merge_size,
          tokens_per_second=cfg.vision.tokens_per_second)))
  stub.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stub)
  ids_t = torch.from_numpy(np.asarray(ids, np.int64))
  tt = torch.zeros_like(ids_t, dtype=torch.int32)
  tt[ids_t == IMG], tt[ids_t == VID] = 1, 2
  as_t = lambda a, dt=torch.int64: None if a is None else torch.tensor(np.asarray(a), dtype=dt)
  pos, deltas = Qwen2_5_VLModel.get_rope_index(
      stub, ids_t, mm_token_type_ids=tt, image_grid_thw=as_t(img), video_grid_thw=as_t(vid),
      second_per_grid_ts=as_t(spg, torch.float32), attention_mask=as_t(mask))
  return pos.numpy(), deltas.numpy().reshape(-1)


def _seq(parts, rng):
  """parts: list of ("text", n) / ("image", grid) / ("video", grid) -> token list."""
  out = []
  for kind, x in parts:
    if kind == "text":
      out += rng.integers(0, 1000, x).tolist()
    else:
      out += [VS] + [IMG if kind == "image" else VID] * (int(np.prod(x)) // 4) + [VE]
  return out


def _batch(seqs, side):
  t = max(map(len, seqs))
  ids = np.full((len(seqs), t), 151643, np.int64)
  mask = np.zeros((len(seqs), t), np.int64)
  for i, s in enumerate(seqs):
    sl = slice(t - len(s), t) if side[i] == "left" else slice(0, len(s))
    ids[i, sl], mask[i, sl] = s, 1
  return ids, mask


def _qwen_reference(cfg, ids, mask, img, vid, spg, *, int_seconds=False):
  """Original Qwen2.5-VL rule (torch), one row at a time over its real tokens. Returns
  positions [3, B, T] (padding 1) and deltas [B] as max + 1 - real tokens (the original
  subtracts the padded row length; decoding here counts real tokens only)."""
  ids_t = torch.as_tensor(np.asarray(ids, np.int64))
  mask_t = torch.ones_like(ids_t) if mask is None else torch.as_tensor(np.asarray(mask))
  img_t = None if img is None else torch.as_tensor(np.asarray(img, np.int64))
  vid_t = None if vid is None else torch.as_tensor(np.asarray(vid, np.int64))
  spg_t = None if spg is None else torch.as_tensor(np.asarray(spg, np.float32))
  m, tps = cfg.vision.spatial_merge_size, cfg.vision.tokens_per_second
  pos = torch.ones(3, *ids_t.shape, dtype=torch.int64)
  deltas, n_img, n_vid = [], 0, 0
  for b in range(ids_t.shape[0]):
    row = ids_t[b][mask_t[b] == 1]
    toks = row.tolist()
    starts = torch.nonzero(row == VS).flatten()
    kinds = row[starts + 1].tolist()
    pieces, st = [], 0
    for kind in kinds:
      ed = toks.index(kind, st)
      if kind == IMG:
        (t, h, w), seconds = img_t[n_img].tolist(), torch.tensor(0.0)
        n_img += 1
      else:
        (t, h, w) = vid_t[n_vid].tolist()
        seconds = torch.tensor(1.0) if spg_t is None else spg_t[n_vid]
        n_vid += 1
      if int_seconds:
        seconds = seconds.to(torch.int64)
      gh, gw = h // m, w // m
      base = pieces[-1].max() + 1 if pieces else 0
      pieces.append(torch.arange(ed - st).view(1, -1).expand(3, -1) + base)
      time = (torch.arange(t).view(-1, 1).expand(-1, gh * gw) * seconds * tps).long().flatten()
      hh = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
      ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
      pieces.append(torch.stack([time, hh, ww]) + (ed - st) + base)
      st = ed + t * gh * gw
    if st < len(toks):
      base = pieces[-1].max() + 1 if pieces else 0
      pieces.append(torch.arange(len(toks) - st).view(1, -1).expand(3, -1) + base)
    flat = torch.cat(pieces, dim=1)
    pos[:, b, mask_t[b] == 1] = flat
    deltas.append(int(flat.max()) + 1 - len(toks))
  return pos.numpy(), np.asarray(deltas)


def _check_rule(cfg, ids, mask, img, vid, spg, convention):
  pos, deltas = get_rope_index(cfg, ids, mask, img, vid, spg, convention=convention)
  if convention == "transformers_5.3":
    ref_pos, ref_deltas = _hf(cfg, ids, mask, img, vid, spg)
  else:
    ref_pos, ref_deltas = _qwen_reference(cfg, ids, mask, img, vid, spg,
                                          int_seconds=convention == "transformers_5.2")
    if convention == "transformers_5.2":  # its padded positions are 0, not 1
      ref_pos = np.where(np.asarray(mask if mask is not None else 1) == 0, 0, ref_pos)
  assert pos.dtype == np.int32 and deltas.dtype == np.int32
  assert pos.shape == (3,) + ids.shape and deltas.shape == (ids.shape[0],)
  np.testing.assert_array_equal(pos, ref_pos)
  np.testing.assert_array_equal(deltas, ref_deltas)
  return pos, deltas


RULES = ("qwen", "transformers_5.2", "transformers_5.3")


@pytest.mark.parametrize("rule", RULES)
def test_named_cases(rule):
  rng = np.random.default_rng(0)
  cfg = _config()
  _check = functools.partial(_check_rule, convention=rule)
  # text only, with and without padding
  ids = rng.integers(0, 1000, (2, 7))
  _check(cfg, ids, None, None, None, None)
  _check(cfg, ids, np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]), None, None, None)
  # one image; one video (t > 1, default seconds); fractional seconds
  img = [(1, 4, 6)]
  ids, mask = _batch([_seq([("text", 3), ("image", img[0]), ("text", 4)], rng)], ["right"])
  _check(cfg, ids, mask, img, None, None)
  vid = [(4, 4, 4)]
  ids, mask = _batch([_seq([("text", 2), ("video", vid[0]), ("text", 3)], rng)], ["right"])
  _check(cfg, ids, mask, None, vid, None)
  _check(cfg, ids, mask, None, vid, [0.75])
  # several images and videos per sequence, mixed padding sides, images on both rows
  img = [(1, 2, 4), (1, 6, 2), (1, 4, 4)]
  vid = [(3, 2, 2), (2, 4, 6), (5, 2, 4)]
  seqs = [_seq([("text", 2), ("image", img[0]), ("video", vid[0]), ("text", 3),
                ("image", img[1]), ("text", 1)], rng),
          _seq([("video", vid[1]), ("text", 5), ("image", img[2]), ("video", vid[2])], rng)]
  for side in (["right", "right"], ["left", "left"], ["left", "right"]):
    ids, mask = _batch(seqs, side)
    _check(cfg, ids, mask, img, vid, [0.5, 1.0, 1.3333334])
  # several grids in one run of pad tokens (no separator) are split by their sizes
  ids = np.array([[5] + [IMG] * 2 + [IMG] * 6 + [7]])
  pos, _ = get_rope_index(cfg, ids, None, [(1, 2, 4), (1, 4, 6)], convention=rule)
  np.testing.assert_array_equal(pos[1, 0, 3:9], [3, 3, 3, 4, 4, 4])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tps", [2.0, 1.5])
def test_fuzz(tps, rule):
  rng = np.random.default_rng(int(tps * 10))
  cfg = _config(tps)
  _check = functools.partial(_check_rule, convention=rule)
  for _ in range(25):
    b = int(rng.integers(1, 4))
    seqs, img, vid, spg = [], [], [], []
    for _ in range(b):
      parts = [("text", int(rng.integers(0, 4)))]
      for _ in range(int(rng.integers(0, 4))):
        kind = ["image", "video"][int(rng.integers(0, 2))]
        grid = (int(rng.integers(1, 2 if kind == "image" else 7)),
                2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))
        (img if kind == "image" else vid).append(grid)
        if kind == "video":
          spg.append(float(rng.choice([0.5, 1.0, 2.0, 0.3333, 0.8, 1.7])))
        parts += [(kind, grid), ("text", int(rng.integers(0, 3)))]
      seqs.append(_seq(parts, rng))
    seqs = [s or [1] for s in seqs]  # transformers fails on a row without real tokens
    ids, mask = _batch(seqs, [["left", "right"][int(rng.integers(0, 2))] for _ in seqs])
    _check(cfg, ids, mask, img or None, vid or None, spg if vid and rng.random() < 0.8 else None)


def test_rules_differ_after_a_long_video():
  cfg = _config()
  assert cfg.rope_convention == "qwen"  # the default: the original code's and vLLM's rule
  # video (t=3, 2x1 merged) at 2 s per grid: temporal positions 0, 4, 8 exceed the spatial 2.
  ids = np.array([[9, 9] + [VID] * 6 + [9, 9]])
  hf_pos, hf_d = get_rope_index(cfg, ids, None, None, [(3, 4, 2)], [2.0],
                                convention="transformers_5.3")
  qw_pos, qw_d = get_rope_index(cfg, ids, None, None, [(3, 4, 2)], [2.0])
  np.testing.assert_array_equal(qw_pos[:, 0, :8], hf_pos[:, 0, :8])
  np.testing.assert_array_equal(qw_pos[0, 0, 2:8], [2, 2, 6, 6, 10, 10])
  np.testing.assert_array_equal(hf_pos[0, 0, 8:], [4, 5])  # start + max(h, w)/m
  np.testing.assert_array_equal(qw_pos[0, 0, 8:], [11, 12])  # one past the chunk's max
  assert (hf_d[0], qw_d[0]) == (11 - 10, 13 - 10)  # max position + 1 - length
  # padding value and agreement when the spatial extent dominates
  ids = np.array([[0, 9] + [IMG] * 4 + [9]])
  mask = np.array([[0, 1, 1, 1, 1, 1, 1]])
  qw, _ = get_rope_index(cfg, ids, mask, [(1, 4, 4)], convention="qwen")
  hf, _ = get_rope_index(cfg, ids, mask, [(1, 4, 4)], convention="transformers_5.3")
  assert qw[0, 0, 0] == 1 and hf[0, 0, 0] == 0
  np.testing.assert_array_equal(qw[:, :, 1:], hf[:, :, 1:])
  # 1.125 s per grid (8 of 9 frames at 2 fps): "qwen" keeps the fraction, 5.2 truncates it
  ids = np.array([[9] + [VID] * 5 + [9]])  # 5 temporal steps of one merged token
  for rule, want in (("qwen", [0, 1, 3, 5, 7, 10, 11]),
                     ("transformers_5.2", [0, 1, 3, 5, 7, 9, 10]),
                     ("transformers_5.3", [0, 1, 3, 5, 7, 10, 2])):
    pos, _ = get_rope_index(cfg, ids, None, None, [(5, 2, 2)], [1.125], convention=rule)
    np.testing.assert_array_equal(pos[0, 0, :], want, err_msg=rule)


def test_mismatch_errors():
  cfg = _config()
  ids = np.array([[9] + [IMG] * 3 + [9]])
  with pytest.raises(ValueError, match="does not match image grids"):
    get_rope_index(cfg, ids, None, [(1, 4, 4)])
  with pytest.raises(ValueError, match="used up"):
    get_rope_index(cfg, ids, None, None)
  with pytest.raises(ValueError, match="2 image grids given"):
    get_rope_index(cfg, np.array([[9] + [IMG] * 4]), None, [(1, 4, 4), (1, 4, 4)])
  with pytest.raises(ValueError, match="second_per_grid_ts has 1 entries for 2 videos"):
    get_rope_index(cfg, np.array([[VID] * 2]), None, None, [(1, 2, 4), (1, 2, 4)], [1.0])
