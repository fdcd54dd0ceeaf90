"""transformers' PyTorch Qwen2.5-VL for a config of ours, with random weights: the reference of
the parity tests (tests/parity) and of benchmarks/parity_check.py / gpu_check.py. Needs torch
and transformers; never imported by the package."""
from __future__ import annotations

from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig


def randomize_norms_and_biases(torch_model) -> None:
  """In place, on a transformers model: norm weights ~ 1 + 0.3 N(0, 1), biases ~ 0.5 N(0, 1),
  so that a wrong parameter mapping cannot hide behind HF's ones and zeros (parity tests)."""
  import torch
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))


def hf_reference(config: Qwen2_5_VLConfig, *, seed: int = 0, attn: str = "eager",
                 device: str = "cpu"):
  """transformers' `Qwen2_5_VLForConditionalGeneration` for `config`: HF's random init under
  torch seed `seed`, then `randomize_norms_and_biases`; float32, eval mode, on `device`.
  attn: transformers' attention implementation of both towers ("eager" = exact math).
  Its tensors, `{k: v.cpu().numpy() for k, v in ref.state_dict().items()}`, go into our
  model with `hf_io.assign_hf_tensors` (parity tests, benchmarks/gpu_check.py)."""
  import torch
  import transformers
  d = config.to_hf_dict()
  d["vision_config"]["tokens_per_second"] = int(d["vision_config"]["tokens_per_second"])
  hc = transformers.Qwen2_5_VLConfig(**d)
  hc._attn_implementation = attn
  hc.vision_config._attn_implementation = attn
  torch.manual_seed(seed)
  with torch.device(device):  # initialised where it runs (a 3B-wide init is slow on CPU)
    ref = transformers.Qwen2_5_VLForConditionalGeneration(hc).eval()
  randomize_norms_and_biases(ref)
  return ref
