"""Logit parity of our model against transformers in fp32 and bf16 (a gpu_check check).

One random-weight transformers model (`tools/hf_reference.py`: HF init with norms and
biases randomised) gives its tensors to two of ours (fp32 and bf16 compute); all four runs
(transformers fp32 / bf16, ours fp32 / bf16) see one row of text with one video
(`sft_step.make_batch`). Errors are relative L2 norms of the logits against transformers in
fp32, computed without TF32 (torch) and with "highest" matmul precision (JAX), so the fp32
figures measure rounding only and transformers' own bf16 error is the yardstick for ours.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import sft_step


def shallow(cfg, layers: int, vision_depth: int):
  """`cfg` at reduced depth: `layers` decoder layers, `vision_depth` vision blocks (the
  full-attention blocks that remain stay; none left = the last block)."""
  v = cfg.vision
  full = tuple(i for i in v.fullatt_block_indexes if i < vision_depth) or (vision_depth - 1,)
  return cfg.replace(
      text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
      vision=dataclasses.replace(v, depth=vision_depth, fullatt_block_indexes=full))


def rel_err(a, ref) -> float:
  """||a - ref|| / ||ref|| in float64."""
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _hf_logits(cfg, b: dict) -> tuple[dict, np.ndarray, np.ndarray]:
  """(HF tensors as NumPy, transformers' fp32 logits, its bf16 logits) [1, T, V]; the
  torch model is gone (and its GPU cache released) when this returns."""
  import torch
  from tools import hf_reference
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the patch Conv3d too)
  torch.backends.cudnn.allow_tf32 = False
  ref = hf_reference.hf_reference(cfg, device=dev)
  tensors = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
  kw = dict(input_ids=torch.as_tensor(b["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(b["attention_mask"]),
            pixel_values_videos=torch.as_tensor(b["pixels"]),
            video_grid_thw=torch.as_tensor(b["grid"]),
            # Our rope positions (equal to transformers' own: tests/parity): its forward
            # only computes them itself with version-dependent extra inputs.
            position_ids=torch.as_tensor(b["position_ids"], dtype=torch.long))
  kw = {k: v.to(dev) for k, v in kw.items()}
  with torch.no_grad():
    fp32 = ref(**kw).logits.float().cpu().numpy()
    ref.to(torch.bfloat16)  # transformers' own bf16 inference: weights and compute
    bf16 = ref(**kw).logits.float().cpu().numpy()
  del ref, kw
  if dev == "cuda":
    torch.cuda.empty_cache()
  return tensors, fp32, bf16


def _our_logits(cfg, tensors: dict, b: dict, dtype) -> np.ndarray:
  """Our jitted forward with the HF tensors, compute in `dtype` -> logits [1, T, V]."""
  from flax import nnx
  from deepintuit_jax.models.qwen2_5_vl import hf_io, vision
  from deepintuit_jax.models.qwen2_5_vl.config import RuntimeOptions
  model = hf_io.abstract_model(cfg, RuntimeOptions(dtype=dtype))
  hf_io.assign_hf_tensors(model, tensors)
  forward = nnx.jit(lambda m, ids, mask, pix, pos, layout: m(
      ids, mask, pixel_values_videos=pix, position_ids=pos, video_layout=layout).logits)
  return np.asarray(forward(model, b["input_ids"], b["attention_mask"], b["pixels"],
                            b["position_ids"], vision.vision_layout(b["grid"], cfg.vision)))


def logit_errors(cfg, frames: int, side: int, text: int) -> dict:
  """Relative L2 logit errors against transformers' fp32 forward: `hf_bf16`, `ours_fp32`,
  `ours_bf16`; `argmax_agree_bf16`: the share of positions where our bf16 top token is
  transformers' fp32 one; `tokens`: the sequence length."""
  import jax
  import jax.numpy as jnp
  b = sft_step.make_batch(cfg, frames, side, text, 1, 1)
  tensors, hf32, hf16 = _hf_logits(cfg, b)
  with jax.default_matmul_precision("highest"):
    ours32 = _our_logits(cfg, tensors, b, jnp.float32)
  ours16 = _our_logits(cfg, tensors, b, jnp.bfloat16)  # auto attention: cuDNN on GPU
  return dict(hf_bf16=rel_err(hf16, hf32), ours_fp32=rel_err(ours32, hf32),
              ours_bf16=rel_err(ours16, hf32),
              argmax_agree_bf16=float(np.mean(ours16.argmax(-1) == hf32.argmax(-1))),
              tokens=int(b["input_ids"].shape[1]))
