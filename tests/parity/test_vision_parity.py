"""Vision tower parity with transformers' Qwen2_5_VisionTransformerPretrainedModel (fp32).

Tiny random towers that differ in heads / head size, window size, full-attention blocks
and depth; several images and videos of different grids in one call (grids whose merged
h / w are not multiples of the window, t > 1). Every weight, bias and RMSNorm scale of
the reference is randomised so that a wrong mapping cannot hide behind ones / zeros.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from deepintuit_jax.models.qwen2_5_vl import hf_io  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions, VisionConfig  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl.vision import VisionTower, vision_layout  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl.vision_layout import window_index  # noqa: E402

# (name, config kwargs, grids). Patch 14 / merge 2 (as the real model); window 56 = 2x2
# merged tokens, 112 = 4x4.
VARIANTS = [
    ("w56_full1", dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48,
                       window_size=56, fullatt_block_indexes=(1,)),
     [(1, 6, 10), (2, 4, 8), (3, 10, 6)]),
    ("w112_none", dict(depth=3, hidden_size=48, num_heads=2, intermediate_size=40,
                       window_size=112, fullatt_block_indexes=()),
     [(2, 12, 10), (1, 4, 4), (1, 14, 6)]),
    ("w112_several", dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64,
                          window_size=112, fullatt_block_indexes=(0, 2, 3)),
     [(1, 10, 18), (2, 8, 8), (1, 2, 2)]),
]


def _hf_tower(cfg: VisionConfig, seed: int):
  from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
      Qwen2_5_VisionTransformerPretrainedModel)
  hf_cfg = Qwen2_5_VLVisionConfig(
      depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_heads=cfg.num_heads, out_hidden_size=cfg.out_hidden_size,
      window_size=cfg.window_size, fullatt_block_indexes=list(cfg.fullatt_block_indexes),
      patch_size=cfg.patch_size, spatial_merge_size=cfg.spatial_merge_size,
      temporal_patch_size=cfg.temporal_patch_size, in_channels=cfg.in_channels)
  model = Qwen2_5_VisionTransformerPretrainedModel._from_config(
      hf_cfg, attn_implementation="eager", dtype=torch.float32).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
        p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:  # unit-scale activations: weight ~ N(0, 1/fan_in)
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
  tensors = {"visual." + k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, tensors


def _ours(cfg, tensors, opts=RuntimeOptions()):
  tower = VisionTower(cfg, opts, rngs=nnx.Rngs(0))
  hf_io.assign_hf_tensors(tower, tensors, prefix="visual.")
  return tower


def _setup(kwargs, grids, seed):
  cfg = VisionConfig(out_hidden_size=24, **kwargs)
  grid = np.asarray(grids, np.int64)
  n = int(grid.prod(-1).sum())
  pixels = np.random.default_rng(seed).normal(size=(n, cfg.patch_dim)).astype(np.float32)
  hf, tensors = _hf_tower(cfg, seed)
  with torch.no_grad():
    ref = hf(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
  return cfg, grid, pixels, hf, tensors, ref


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name,kwargs,grids", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_vision_tower_matches_transformers(name, kwargs, grids):
  cfg, grid, pixels, _, tensors, ref = _setup(kwargs, grids, seed=len(name))
  tower = _ours(cfg, tensors)
  out = np.asarray(tower.encode(pixels, grid))
  assert out.shape == ref.shape == (pixels.shape[0] // 4, cfg.out_hidden_size)
  assert _rel(out, ref) < 2e-5, f"{name}: rel err {_rel(out, ref):.2e}"

  # Bucketed (jitted, padded) call: padding patches with garbage values change nothing real.
  n = pixels.shape[0]
  pad_to = n + 4 * 7
  layout = vision_layout(grid, cfg, pad_to=pad_to, max_frame_patches=256)
  noise = np.random.default_rng(1).normal(size=(pad_to - n, cfg.patch_dim)).astype(np.float32)
  padded = np.concatenate([pixels, 100.0 * noise])
  out_pad = nnx.jit(lambda m, x, lay: m(x, lay))(tower, jnp.asarray(padded), layout)
  assert out_pad.shape == (pad_to // 4, cfg.out_hidden_size)
  assert layout.num_merged_tokens == n // 4
  np.testing.assert_allclose(np.asarray(out_pad)[: n // 4], out, rtol=1e-5, atol=1e-5)


def test_window_index_matches_transformers():
  from transformers.vision_utils import get_vision_window_index
  rng = np.random.default_rng(0)
  for window in (56, 112, 224):
    cfg = VisionConfig(depth=1, hidden_size=32, num_heads=4, window_size=window,
                       fullatt_block_indexes=(), out_hidden_size=8)
    grid = np.stack([rng.integers(1, 4, 5), 2 * rng.integers(1, 12, 5),
                     2 * rng.integers(1, 12, 5)], -1)
    idx, lengths = window_index(grid, cfg)
    ref_idx, ref_cu = get_vision_window_index(torch.from_numpy(grid), 2, window, 14)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths)]), ref_cu.numpy())


def test_bf16_and_remat_close():
  name, kwargs, grids = VARIANTS[0]
  cfg, grid, pixels, _, tensors, ref = _setup(kwargs, grids, seed=3)
  bf16 = _ours(cfg, tensors, RuntimeOptions(dtype=jnp.bfloat16))
  out = np.asarray(bf16.encode(pixels, grid).astype(jnp.float32))
  assert np.isfinite(out).all()
  assert _rel(out, ref) < 5e-2, f"bf16 rel err {_rel(out, ref):.2e}"

  # Remat changes memory, not numbers; gradients flow through the blocks and are finite.
  tower = _ours(cfg, tensors, RuntimeOptions(remat="dots_saveable"))
  layout = vision_layout(grid, cfg)
  out = tower(jnp.asarray(pixels), layout)
  assert _rel(out, ref) < 2e-5

  def loss(m):
    return jnp.mean(m(jnp.asarray(pixels), layout) ** 2)
  grads = nnx.grad(loss)(tower)
  g = grads["blocks"][0]["attn"]["qkv"]["kernel"][...]
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


def test_errors_name_the_problem():
  cfg = VisionConfig(depth=1, hidden_size=32, num_heads=4, out_hidden_size=8,
                     fullatt_block_indexes=())
  tower = VisionTower(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layout expects"):
    tower(jnp.zeros((15, cfg.patch_dim)), vision_layout(np.array([[1, 4, 4]]), cfg))
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    vision_layout(np.array([[1, 3, 4]]), cfg)
  with pytest.raises(ValueError, match="pad_to"):
    vision_layout(np.array([[1, 4, 4]]), cfg, pad_to=10)
