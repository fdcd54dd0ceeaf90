"""The tiny base: a tiny Qwen2.5-VL-shaped model pretrained on described clips, so that the
embedded default starts from a model that already sees (as real runs start from Qwen2.5-VL).

    from deepintuit_jax.models import tiny_base
    hf_dir = tiny_base.checkpoint_dir(cache_dir)   # the HF directory to start from

`base_config()` is its architecture (a sibling of `tiny.tiny_config()`, which the unit
and parity tests keep using unchanged). The weights are built by
`scripts/build_tiny_base.py` (deterministic for a seed) from the corpus of
`tools/tiny_base_corpus.py` and shipped in `deepintuit_jax/assets/tiny_base/`;
`checkpoint_dir` copies them once into the cache under a versioned name (atomic rename).
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from deepintuit_jax.models import tiny
from deepintuit_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# Bump whenever the shipped weights or `base_config` change (names the cache entry).
VERSION = 3
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_base")
# Files of a complete HF directory (what `checkpoint_dir` checks and copies).
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
         "video_preprocessor_config.json")


def base_config(**overrides: Any) -> Qwen2_5_VLConfig:
  """The tiny base's architecture: `tiny.tiny_config` with a decoder whose mrope turns a
  height / width step into a real rotation (head size 32, rope theta 10, sections 2/7/7:
  frequencies 1..0.12 rad per step, against at most 0.03 and 2e-4 for the tiny config's
  head 16, theta 1e6, 2/3/3) and a wider, deeper decoder; a tower twice as wide (128,
  MLP 256): at 64 / 128 it learned the per-token motion target more slowly and generalised
  less (held-out per-token motion 0.63 against 0.70 after 2,000 steps of
  tools/tiny_base_tower.py at lr 1e-3 on 2,000 clips). Same keywords as `tiny_config`."""
  text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=10.0,
              mrope_section=(2, 7, 7))
  text.update(overrides.pop("text", None) or {})
  vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2)
  vision.update(overrides.pop("vision", None) or {})
  return tiny.tiny_config(text=text, vision=vision, **overrides)


def default_init(init_from: str, *, model_checkpoint: str, cache_dir: str) -> str:
  """A stage config's `init_from`: "auto" = the tiny base (`checkpoint_dir`) when no
  `model.checkpoint` is set (the embedded default), else "" (start from the checkpoint);
  any other value is returned unchanged ("" = the random tiny model / model.checkpoint)."""
  if init_from != "auto":
    return init_from
  return "" if model_checkpoint else checkpoint_dir(cache_dir)


def is_complete(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, f)) for f in FILES)


def checkpoint_dir(cache_dir: str, *, source: str = ASSET_DIR) -> str:
  """The HF directory the embedded default starts from: `<cache_dir>/tiny_base_v<VERSION>`,
  copied once from the shipped `source` (a temporary directory renamed into place, so a run
  killed while copying never leaves a half-written entry). Raises FileNotFoundError naming
  the missing file when `source` is incomplete (rebuild with scripts/build_tiny_base.py)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"tiny_base_v{VERSION}")
  if is_complete(path):
    return path
  missing = [f for f in FILES if not os.path.isfile(os.path.join(source, f))]
  if missing:
    raise FileNotFoundError(f"tiny base {source!r}: missing {missing}; rebuild it with "
                            "`python scripts/build_tiny_base.py --out DIR`")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp)
  try:
    os.replace(tmp, path)
  except OSError:  # another process won the race: its copy is as good
    shutil.rmtree(tmp, ignore_errors=True)
  return path
