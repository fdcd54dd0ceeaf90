"""scripts/serve_check.py, transformers half: a tiny export answers in transformers' generate
as in the project's greedy evaluation, clip for clip.

Path covered: CI has no torchvision, which transformers' Qwen2-VL video processor imports, so
transformers is fed this project's pixel values (`--transformers_input=pixels`; equal to the
processor's by tests/parity/test_video_golden.py), its prompt ids and seconds per grid, with
its rope rule patched to the export's. The vLLM half is run by hand (docs/serving.md).
"""
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from deepintuit_jax.data import synthetic  # noqa: E402
from deepintuit_jax.models import qwen2_5_vl, tiny_base  # noqa: E402
from deepintuit_jax.models.qwen2_5_vl import hf_save  # noqa: E402
from tests.scripts import load_script  # noqa: E402



def _script():
  return load_script("scripts", "serve_check.py")


def _split(root, n_frames=(7, 16)):
  """Clips at 2 fps, 60 x 80 px (7 frames: all kept, an odd count; 16: 8 of them sampled);
  a release-format file."""
  rng = np.random.default_rng(0)
  records = []
  for i, t in enumerate(n_frames):
    frames = rng.integers(0, 256, (t, 60, 80, 3), dtype=np.uint8)
    synthetic.write_mp4(str(root / f"clip{i}.mp4"), frames, 2.0)
    records.append({"item_id": f"c{i}", "policy_title": "left", "reward_label": "left",
                    "conversations": [
                        {"role": "user", "content": [{"type": "video", "video": f"clip{i}.mp4"},
                                                     {"type": "text", "text": "Which way?"}]},
                        {"role": "assistant", "content": "left"}]})
  path = root / "split.json"
  path.write_text(json.dumps(records))
  return str(path)


@pytest.fixture(autouse=True)
def _installed_rope():
  """serve_check patches transformers' class for the whole process: put it back for the
  parity tests that run after this module in the same worker."""
  yield
  from deepintuit_jax import serving
  serving.patch_transformers_rope(None)


def test_transformers_answers_as_the_project(tmp_path, capsys):
  """The tiny base as an export (trained weights with rope theta 10: its answers move with the
  positions, where a random tiny model's do not), so that the unpatched transformers (>= 5.3:
  rule `transformers_5.3`) is seen to differ, and the patched one to agree."""
  export = str(tmp_path / "run" / "hf")
  hf_save.save_pretrained(qwen2_5_vl.from_pretrained(tiny_base.ASSET_DIR), export,
                          processor=hf_save.ProcessorSettings(min_pixels=3136,
                                                              max_pixels=64 * 28 * 28,
                                                              max_frames=8))
  with open(os.path.join(export, "config.json")) as f:
    assert json.load(f)["deepintuit_rope_convention"] == "qwen"  # the export records it
  split = _split(tmp_path)
  args = [export, split, "--engines=project,transformers", "--max_new_tokens=24",
          "--transformers_input=pixels", f"--out={tmp_path / 'out'}"]
  mod = _script()
  assert mod.main(args) == 0
  table = json.loads((tmp_path / "out" / "agreement.json").read_text())
  assert table["transformers"]["clips"] == 2
  assert table["transformers"]["same_text"] == 2, capsys.readouterr().out
  assert mod.main(args + ["--engines=transformers", "--no_rope_patch", "--rerun"]) == 0
  table = json.loads((tmp_path / "out" / "agreement.json").read_text())
  assert table["transformers"]["same_text"] == 0, capsys.readouterr().out  # its own rule
  rows = [json.loads(x) for x in (tmp_path / "out" / "project.jsonl").read_text().splitlines()]
  assert all(r["response"] for r in rows)  # a random model still writes something


def test_user_errors(tmp_path, capsys):
  mod = _script()
  assert mod.main([str(tmp_path), "x.json"]) == 2
  assert "not an HF export directory" in capsys.readouterr().err
