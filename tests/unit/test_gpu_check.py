"""benchmarks/gpu_check.py --size=tiny runs every check on CPU, so the GPU check cannot rot
before a GPU is lent (the 3b size runs the same code at other shapes)."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_gpu_check_runs_every_check_and_passes(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  # The GPU machine has neither: importing them anywhere on the way must fail loudly here.
  for name in ("grain", "ml_collections"):
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.syspath_prepend(ROOT)
  from benchmarks import gpu_check
  out = gpu_check.main(["--size=tiny", f"--out={tmp_path / 'check.json'}"])
  names = [c["name"] for c in out["checks"]]
  assert names == ["attention", "parity_fp32", "parity_bf16", "sft_mfu", "peak_memory",
                   "decode_roofline"]
  for c in out["checks"]:
    figures = [c["value"]] + [v for v in c["figures"].values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in figures), c
    assert c["passed"], c
  assert out["passed"]
  assert json.loads((tmp_path / "check.json").read_text())["checks"] == out["checks"]


def test_unknown_check_and_missing_torch_say_so_in_one_line(monkeypatch, capsys):
  monkeypatch.syspath_prepend(ROOT)
  from benchmarks import gpu_check
  with pytest.raises(SystemExit):
    gpu_check.main(["--checks=parity,nope"])
  assert "unknown check(s) ['nope']" in capsys.readouterr().err
  real = gpu_check.importlib.util.find_spec
  monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else real(name, *a))
  with pytest.raises(SystemExit, match="parity check needs torch"):
    gpu_check.main(["--size=tiny"])
