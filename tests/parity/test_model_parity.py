"""Full Qwen2.5-VL parity with transformers (fp32, tiny configs): image, video, both, padding.

Reference positions come from transformers' own `get_rope_index`; ours are computed by the
model on the host, so rope.get_rope_index is checked along the way.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from tools import hf_reference
from deepintuit_jax.models.qwen2_5_vl import rope, vision
from deepintuit_jax.models.qwen2_5_vl.config import (
    PRESETS, Qwen2_5_VLConfig, TextConfig, VisionConfig)
from deepintuit_jax.core.sharding import DEFAULT_RULES
from deepintuit_jax.models.qwen2_5_vl.model import Qwen2_5_VL

IMG, VID, VS, VE = 90, 91, 92, 93


def tiny_config(tied: bool = False) -> Qwen2_5_VLConfig:
  return Qwen2_5_VLConfig(
      vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                          window_size=56, fullatt_block_indexes=(1,), out_hidden_size=48),
      text=TextConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 2, 2),
                      tie_word_embeddings=tied),
      image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
      # the reference is the installed transformers (>= 5.3): its rope rule, so that the
      # model's own host positions (eager) match it too.
      rope_convention="transformers_5.3")


# ------------------------------------------------------------------ structure (no torch)
def test_every_param_has_known_logical_axes():
  model = nnx.eval_shape(lambda: Qwen2_5_VL(tiny_config(), rngs=nnx.Rngs(0)))
  names = dict(DEFAULT_RULES)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.get_value().shape), path
    assert all(a is None or a in names for a in axes), (path, axes)
  flat = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "lm_head.kernel" in flat and "model.layers.1.self_attn.o_proj.kernel" in flat
  assert "model.layers.0.self_attn.o_proj.bias" not in flat
  tied = nnx.eval_shape(lambda: Qwen2_5_VL(tiny_config(tied=True), rngs=nnx.Rngs(0)))
  assert tied.lm_head is None


@pytest.mark.parametrize("size,count", [("3b", 3_754_622_976), ("7b", 8_292_166_656),
                                        ("32b", 33_448_292_352), ("72b", 73_406_351_360)])
def test_published_sizes_have_transformers_param_counts(size, count):
  from deepintuit_jax.models.qwen2_5_vl.hf_io import abstract_model
  abstract = abstract_model(PRESETS[size])
  assert abstract.num_params() == count


# ------------------------------------------------------------------ parity
def _reference(cfg: Qwen2_5_VLConfig, seed: int = 0):
  """(torch, HF model with randomised norms and biases, our model with the same weights)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from deepintuit_jax.models.qwen2_5_vl.hf_io import assign_hf_tensors
  ref = hf_reference.hf_reference(cfg, seed=seed)
  tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  ours = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  assign_hf_tensors(ours, tensors)
  return torch, ref, ours


@pytest.fixture(scope="module")
def untied():
  return _reference(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def tied():
  return _reference(tiny_config(tied=True), seed=1)


@nnx.jit
def _forward(model, ids, mask, kw):
  """Jitted forward with host-computed positions / layouts in `kw` (eager dispatch of the
  many small ops is several times slower than one compile on the 2-core test machine)."""
  return model(ids, mask, output_hidden_states=True, **kw)


def _host_inputs(cfg, ids, mask, inputs):
  """What a jitted caller passes: position ids and layouts computed on the host."""
  kw = {}
  for kind, pix_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                  ("video", "pixel_values_videos", "video_grid_thw")):
    if pix_key in inputs:
      kw[pix_key] = inputs[pix_key]
      kw[f"{kind}_layout"] = vision.vision_layout(inputs[grid_key], cfg.vision)
  kw["position_ids"], _ = rope.get_rope_index(
      cfg, ids, mask, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
      inputs.get("second_per_grid_ts"))
  return kw


def _sequence(rng, pre: int, spans: list[tuple[int, int]], post: int) -> list[int]:
  """Text, then for each (pad token, count) a <vision_start> pads <vision_end> span, text."""
  out = list(rng.integers(0, 80, pre))
  for tok, n in spans:
    out += [VS] + [tok] * n + [VE] + list(rng.integers(0, 80, 2))
  return out + list(rng.integers(0, 80, post))


def _batch(rows: list[list[int]], pad: str = "left"):
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    sl = slice(t - len(r), t) if pad == "left" else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rel, atol=rel * float(np.abs(b).max()))


def _compare(ref_triple, ids, mask, inputs, *, eager: bool = False):
  """Logits, hidden states and rope deltas against transformers (positions from HF's own
  get_rope_index). eager=True goes through the model's host conveniences (grids only)."""
  torch, ref, ours = ref_triple
  tt = {k: torch.tensor(v) for k, v in inputs.items()}
  types = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
  with torch.no_grad():
    pos, deltas = ref.model.get_rope_index(
        torch.tensor(ids), torch.tensor(types), image_grid_thw=tt.get("image_grid_thw"),
        video_grid_thw=tt.get("video_grid_thw"),
        second_per_grid_ts=tt.get("second_per_grid_ts"), attention_mask=torch.tensor(mask))
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos,
               output_hidden_states=True, **tt)
  if eager:
    got = ours(ids, mask, output_hidden_states=True, **inputs)
  else:
    got = _forward(ours, ids, mask, _host_inputs(ours.config, ids, mask, inputs))
  valid = mask.astype(bool)
  _close(np.asarray(got.logits)[valid], want.logits.numpy()[valid])
  for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
    _close(np.asarray(a)[valid], b.numpy()[valid])
  np.testing.assert_array_equal(np.asarray(got.rope_deltas), deltas.numpy().reshape(-1))


def _pixels(rng, cfg, grids):
  n = int(np.prod(np.asarray(grids), -1).sum())
  return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


def test_image_parity_through_host_conveniences(untied):
  rng = np.random.default_rng(0)
  grid = np.array([[1, 4, 6]])
  ids, mask = _batch([_sequence(rng, 3, [(IMG, 6)], 4)])
  _compare(untied, ids, mask,
           dict(pixel_values=_pixels(rng, untied[2].config, grid), image_grid_thw=grid),
           eager=True)


def test_video_parity_with_fractional_seconds_per_grid(tied):
  rng = np.random.default_rng(1)
  grid = np.array([[3, 4, 4]])
  ids, mask = _batch([_sequence(rng, 2, [(VID, 12)], 3)])
  _compare(tied, ids, mask,
           dict(pixel_values_videos=_pixels(rng, tied[2].config, grid), video_grid_thw=grid,
                second_per_grid_ts=np.array([1.5], np.float32)))


@pytest.mark.parametrize("pad", ["left", "right"])
def test_image_and_video_padded_batch_parity(untied, pad):
  cfg = untied[2].config
  rng = np.random.default_rng(2)
  igrid = np.array([[1, 4, 4], [1, 2, 4]])
  vgrid = np.array([[2, 4, 6], [4, 2, 2]])
  rows = [_sequence(rng, 2, [(IMG, 4), (VID, 12)], 2),   # image + video
          _sequence(rng, 5, [(IMG, 2)], 1),              # image only, shorter: padded
          _sequence(rng, 1, [(VID, 4)], 6)]              # video only
  ids, mask = _batch(rows, pad)
  _compare(untied, ids, mask,
           dict(pixel_values=_pixels(rng, cfg, igrid), image_grid_thw=igrid,
                pixel_values_videos=_pixels(rng, cfg, vgrid), video_grid_thw=vgrid,
                second_per_grid_ts=np.array([0.5, 2.0], np.float32)))


def test_text_only_parity_and_cached_decode(tied):
  torch, ref, ours = tied
  ids = np.random.default_rng(3).integers(0, 80, (2, 9))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids)).logits.numpy()
  got = ours(ids)
  _close(got.logits, want)
  np.testing.assert_array_equal(np.asarray(got.rope_deltas), 0)
  out = ours(ids[:, :6], cache=ours.init_cache(2, 12))
  steps = [np.asarray(out.logits)]
  for i in range(6, 9):
    out = ours(ids[:, i:i + 1], cache=out.cache)
    steps.append(np.asarray(out.logits))
  _close(np.concatenate(steps, 1), want)


@nnx.jit
def _cached(model, ids, mask, kw, cache):
  return model(ids, mask, cache=cache, **kw)


def test_video_prefill_then_decode_matches_full_forward(untied):
  """Cached decoding after a video prompt continues at position max + 1 (rope_deltas)."""
  ours = untied[2]
  cfg = ours.config
  rng = np.random.default_rng(5)
  vgrid = np.array([[2, 4, 4], [2, 2, 4]])
  rows = [_sequence(rng, 2, [(VID, 8)], 1), _sequence(rng, 1, [(VID, 4)], 1)]
  ids, mask = _batch(rows, "left")
  extra = rng.integers(0, 80, (2, 3))
  full_ids = np.concatenate([ids, extra], 1)
  full_mask = np.concatenate([mask, np.ones_like(extra)], 1)
  inputs = dict(pixel_values_videos=_pixels(rng, cfg, vgrid), video_grid_thw=vgrid,
                second_per_grid_ts=np.array([1.0, 0.5], np.float32))
  want = np.asarray(_forward(ours, full_ids, full_mask,
                             _host_inputs(cfg, full_ids, full_mask, inputs)).logits)
  out = _cached(ours, ids, mask, _host_inputs(cfg, ids, mask, inputs),
                ours.init_cache(2, full_ids.shape[1]))
  got = [np.asarray(out.logits)]
  for i in range(3):
    out = _cached(ours, extra[:, i:i + 1], np.ones((2, 1), np.int64), {}, out.cache)
    got.append(np.asarray(out.logits))
  valid = full_mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(got, 1)[valid], want[valid], rtol=2e-5, atol=2e-5)


def test_pad_token_feature_mismatch_raises_clearly(untied):
  ours = untied[2]
  rng = np.random.default_rng(0)
  grid = np.array([[1, 4, 6]])  # 6 merged tokens
  ids, mask = _batch([_sequence(rng, 3, [(IMG, 5)], 4)])
  with pytest.raises(ValueError, match=r"5 image pad token.*\(id 90\).*6 feature"):
    ours(ids, mask, pixel_values=_pixels(rng, ours.config, grid), image_grid_thw=grid)
  with pytest.raises(ValueError, match="position_ids"):
    _forward(ours, ids, mask, dict(pixel_values=_pixels(rng, ours.config, grid),
                                   image_grid_thw=grid,
                                   image_layout=vision.vision_layout(grid, ours.config.vision)))
