import pytest

from deepintuit_jax.models.qwen2_5_vl import PRESETS, Qwen2_5_VLConfig


def test_hf_dict_round_trip():
  for name, cfg in PRESETS.items():
    assert Qwen2_5_VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, name


def test_rejects_other_architecture():
  d = PRESETS["3b"].to_hf_dict()
  d["model_type"], d["architectures"] = "llama", ["LlamaForCausalLM"]
  with pytest.raises(ValueError, match="unsupported architecture"):
    Qwen2_5_VLConfig.from_hf_dict(d, source="x/config.json")


def test_missing_key_names_it():
  d = PRESETS["3b"].to_hf_dict()
  del d["text_config"]["num_hidden_layers"], d["num_hidden_layers"]
  with pytest.raises(ValueError, match="num_hidden_layers"):
    Qwen2_5_VLConfig.from_hf_dict(d)


def test_rope_convention_round_trip_and_bad_record_names_the_file():
  cfg = Qwen2_5_VLConfig(rope_convention="transformers_5.2")
  d = cfg.to_hf_dict()
  assert d["deepintuit_rope_convention"] == "transformers_5.2"
  assert Qwen2_5_VLConfig.from_hf_dict(d) == cfg
  d["deepintuit_rope_convention"] = "transformers"
  with pytest.raises(ValueError, match=r"x/config.json: deepintuit_rope_convention"):
    Qwen2_5_VLConfig.from_hf_dict(d, source="x/config.json")
