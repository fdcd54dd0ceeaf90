"""Configuration and input mistakes raise a `UserError` naming the key / file and the reason
(main prints it as one line): model directories, empty annotation files, config values, a
misspelt config key."""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from deepintuit_jax.core import errors
from deepintuit_jax.data import annotations
from deepintuit_jax.models import safetensors_io
from deepintuit_jax.models.qwen2_5_vl import hf_load
from deepintuit_jax.stages import preflight


def _touch(d, *names):
  os.makedirs(d, exist_ok=True)
  for n in names:
    open(os.path.join(d, n), "w").close()


def test_model_dir_checks_name_the_key_and_the_problem(tmp_path):
  cases = [
      (str(tmp_path / "Qwen/Qwen2.5-VL-7B"), (), errors.InputNotFound, "no such directory"),
      (str(tmp_path / "onlybin"), ("pytorch_model.bin",), errors.InputError,
       r"only pickled weights \(pytorch_model\.bin\).*convert them to safetensors.*no config.json"),
      (str(tmp_path / "noconfig"), ("model.safetensors", "tokenizer.json"), errors.InputNotFound,
       "no config.json"),
      (str(tmp_path / "noweights"), ("config.json", "tokenizer.json"), errors.InputNotFound,
       "no model.safetensors"),
      (str(tmp_path / "notok"), ("config.json", "model.safetensors"), errors.InputNotFound,
       "no tokenizer files"),
  ]
  for path, files, kind, match in cases:
    if files:
      _touch(path, *files)
    with pytest.raises(kind, match=f"(?is)model.checkpoint='{path}'.*{match}"):
      hf_load.check_model_dir(path)
  _touch(str(tmp_path / "ok"), "config.json", "tokenizer.json")
  safetensors_io.save_file({"w": np.ones((4, 4), np.float32)},
                           str(tmp_path / "ok" / "model.safetensors"))
  hf_load.check_model_dir(str(tmp_path / "ok"))
  with pytest.raises(errors.InputNotFound, match="is a file"):
    hf_load.check_model_dir(str(tmp_path / "ok" / "config.json"))
  # The loader itself refuses pickles with the same type (still a ValueError for callers).
  with pytest.raises(ValueError, match="pickled"):
    hf_load.weight_files(str(tmp_path / "onlybin"))


def test_a_handed_over_export_with_broken_weights_is_named(tmp_path):
  """The chain's hand-over directories (an earlier step's hf/): a truncated or missing
  weight file is one line naming the key and the file, before anything is loaded."""
  hf = tmp_path / "grpo" / "hf"
  _touch(str(hf), "config.json", "tokenizer.json")
  shards = {"model-00001-of-00002.safetensors": {"a": np.ones((8, 8), np.float32)},
            "model-00002-of-00002.safetensors": {"b": np.ones((8,), np.float32)}}
  for name, tensors in shards.items():
    safetensors_io.save_file(tensors, str(hf / name))
  (hf / hf_load.INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002"
                                                              ".safetensors",
                                                              "b": "model-00002-of-00002"
                                                              ".safetensors"}}))
  c = ml_collections.ConfigDict(dict(infer=dict(policy=str(tmp_path / "grpo"),
                                                baselines=f"SFT={hf}")))
  preflight.check_config(c)  # whole: accepted (a workdir or its hf/)
  first = hf / "model-00001-of-00002.safetensors"
  os.truncate(first, os.path.getsize(first) - 16)
  with pytest.raises(errors.InputError) as e:
    preflight.check_config(c)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"infer.policy={str(tmp_path / 'grpo' / 'hf')!r}")
  assert "unusable weights" in msg and "model-00001-of-00002.safetensors" in msg
  assert "truncated file?" in msg
  os.remove(first)
  c.infer.policy = "none"
  with pytest.raises(errors.UserError, match=r"infer.baselines\[SFT\]=.*does not exist "
                                             r"\(missing shard file\)"):
    preflight.check_config(c)


def test_empty_or_unusable_annotation_file_is_named(tmp_path):
  for name, text in (("empty.json", ""), ("list.json", "[]"), ("blank.jsonl", "\n\n")):
    path = str(tmp_path / name)
    open(path, "w").write(text)
    with pytest.raises(errors.InputError, match=f"{name}' holds no records"):
      annotations.load_records(path)
  path = str(tmp_path / "allbad.json")
  json.dump([{"item_id": "a"}, {"item_id": "b"}], open(path, "w"))
  with pytest.raises(errors.InputError, match="none of its 2 record"):
    annotations.load_records(path, on_bad_sample="skip")
  with pytest.raises(errors.InputNotFound, match="does not exist"):
    annotations.load_records(str(tmp_path / "missing.json"))


def _config(**train):
  return ml_collections.ConfigDict(dict(
      init_from="", model=dict(checkpoint=""),
      train=dict(dict(num_steps=0, epochs=5, log_every=1), **train),
      data=dict(train_file="", class_file="", video_root="", eval_files="")))


def test_preflight_rejects_bad_values_and_missing_files(tmp_path):
  preflight.check_config(_config())
  with pytest.raises(errors.ConfigError, match=r"train.num_steps=-3: must be >= 0"):
    preflight.check_config(_config(num_steps=-3))
  with pytest.raises(errors.ConfigError, match=r"train.epochs=0: must be >= 1"):
    preflight.check_config(_config(epochs=0))
  with pytest.raises(errors.ConfigError, match=r"train.learning_rate=-1.0: must be > 0"):
    preflight.check_config(_config(learning_rate=-1.0))  # no "by recipe" sentinel any more
  c = _config()
  c.data.train_file = str(tmp_path / "train.json")
  with pytest.raises(errors.InputNotFound, match=r"data.train_file=.*train.json'.*no such file"):
    preflight.check_config(c)
  c = _config()
  c.data.eval_files = f"test={tmp_path}"
  with pytest.raises(errors.InputNotFound, match=r"data.eval_files\[test\].*not a file"):
    preflight.check_config(c)
  c = _config()
  c.data.special_tokens = "yes"
  with pytest.raises(errors.ConfigError, match="data.special_tokens='yes': must be one of added"):
    preflight.check_config(c)
  c = _config()
  c.model.checkpoint = "Qwen/Qwen2.5-VL-7B-Instruct"
  with pytest.raises(errors.InputNotFound, match="model.checkpoint=.*no such directory"):
    preflight.check_config(c)


def test_misspelt_config_key_message_puts_the_suggestion_first():
  from deepintuit_jax import main
  c = ml_collections.ConfigDict(dict(train=dict(learning_rate=1.0)))
  c.lock()
  with pytest.raises(AttributeError) as e:  # what ml_collections raises on the override
    c.train.get_type("lerning_rate")
  argv = ["main", "--config=configs/sft.py", "--config.train.lerning_rate=1"]
  assert main.flag_error_message(e.value, argv) == (
      "did you mean --config.train.learning_rate? --config.train.lerning_rate is not a "
      "config key")
