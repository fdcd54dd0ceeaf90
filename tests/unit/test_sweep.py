"""launch/sweep.py: grid expansion, command lists, skipping finished runs, the results table."""
from __future__ import annotations

import json
import os
import shlex

import pytest
from tests.scripts import load_script  # noqa: E402



def _load():
  return load_script("launch", "sweep.py")


sweep = _load()


def test_split_values():
  assert sweep.split_values("a,b") == ["a", "b"]
  assert sweep.split_values("(1,-1,1),(2,-1,1)") == ["(1,-1,1)", "(2,-1,1)"]
  assert sweep.split_values("'x,y',[1,2]") == ["'x,y'", "[1,2]"]
  with pytest.raises(ValueError, match="unbalanced"):
    sweep.split_values("(1,2")
  with pytest.raises(ValueError, match="empty value"):
    sweep.split_values("a,,b")


def test_grid_expansion(tmp_path):
  root = str(tmp_path)
  runs = sweep.expand_grid([("train.learning_rate", ["1e-3", "3e-3"]), ("eval.batch_size", ["4"]),
                            ("grpo.estimator", ["grpo", "rloo"])], ["0", "1", "2"], root)
  assert len(runs) == 12
  assert runs[0].name == "train.learning_rate=1e-3,grpo.estimator=grpo,seed=0"
  assert runs[1].name == "train.learning_rate=1e-3,grpo.estimator=grpo,seed=1"
  assert runs[3].name == "train.learning_rate=1e-3,grpo.estimator=rloo,seed=0"
  assert runs[-1].name == "train.learning_rate=3e-3,grpo.estimator=rloo,seed=2"
  assert runs[0].workdir == os.path.join(root, runs[0].name)
  assert runs[0].overrides() == ["--config.train.learning_rate=1e-3", "--config.eval.batch_size=4",
                                 "--config.grpo.estimator=grpo", "--config.seed=0"]
  assert len({r.workdir for r in runs}) == 12
  (base,) = sweep.expand_grid([], None, root)
  assert base.name == "base" and base.overrides() == []
  with pytest.raises(ValueError, match="not both"):
    sweep.expand_grid([("seed", ["1", "2"])], ["0"], root)
  with pytest.raises(ValueError, match="given twice"):
    sweep.expand_grid([("a", ["1"]), ("a", ["2"])], None, root)


def test_command_list_and_slurm_script(tmp_path):
  root = str(tmp_path / "sw")
  runs = sweep.expand_grid([("train.num_steps", ["2", "3"])], ["0"], root)
  cmds = [sweep.command(r, "configs/sft.py:pulse", python="python3",
                        passthrough=["--config.data.eval_files=a=x.json,b=y.json"]) for r in runs]
  assert cmds[0] == ["python3", "-m", "deepintuit_jax.main", "--config=configs/sft.py:pulse",
                     f"--workdir={root}/train.num_steps=2,seed=0",
                     "--config.data.eval_files=a=x.json,b=y.json", "--config.train.num_steps=2",
                     "--config.seed=0"]
  paths = sweep.write_commands(root, cmds, slurm=True, sbatch_lines=["#SBATCH --gpus=8"])
  lines = open(paths[0]).read().splitlines()
  assert [shlex.split(l) for l in lines] == cmds
  script = open(paths[1]).read()
  assert "#SBATCH --array=0-1" in script and "#SBATCH --gpus=8" in script
  assert "SLURM_ARRAY_TASK_ID + 1" in script and os.path.abspath(paths[0]) in script
  # The CLI writes only the unfinished runs.
  os.makedirs(runs[0].workdir)
  json.dump({"final": True, "models": {}}, open(os.path.join(runs[0].workdir,
                                                            "eval_report.json"), "w"))
  assert sweep.main(["--config=configs/sft.py:pulse", f"--root={root}", "--mode=list",
                     "--seeds=0", "--config.train.num_steps=2,3"]) == 0
  (line,) = open(paths[0]).read().splitlines()
  assert "--config.train.num_steps=3" in line


def _report(workdir, acc, *, final=True, ece=None):
  os.makedirs(workdir, exist_ok=True)
  m = {"n": 10, "accuracy": acc, "macro_f1": acc / 2}
  if ece is not None:
    m["ece"] = ece
  with open(os.path.join(workdir, "eval_report.json"), "w") as f:
    json.dump({"step": 3, "final": final, "models": {"sft": {"test_close": m}}}, f)


def test_run_skips_finished_and_resumes_unfinished(tmp_path):
  root = str(tmp_path / "sw")
  calls = []

  def runner(cmd, workdir):  # stands in for main: writes the final report, or fails
    calls.append(workdir)
    if "--config.train.num_steps=3" in cmd and "--config.seed=1" in cmd:
      return 1
    _report(workdir, 0.5)
    return 0

  argv = ["--config=configs/sft.py:pulse", f"--root={root}", "--seeds=0,1",
          "--config.train.num_steps=2,3"]
  runs = sweep.expand_grid([("train.num_steps", ["2", "3"])], ["0", "1"], root)
  _report(runs[0].workdir, 0.7)                      # finished before
  _report(runs[1].workdir, 0.1, final=False)         # killed after an intermediate eval
  assert sweep.main(argv, runner=runner) == 1        # one run failed
  assert calls == [r.workdir for r in runs[1:]]
  assert sweep.is_finished(runs[1].workdir) and not sweep.is_finished(runs[3].workdir)
  assert os.path.exists(os.path.join(runs[2].workdir, sweep.DONE_MARKER))
  calls.clear()
  assert sweep.main(argv, runner=runner) == 1
  assert calls == [runs[3].workdir]                   # only the failed run is retried
  md = open(os.path.join(root, "sweep_results.md")).read()
  assert "| 2 | 2/2 | 0.600 ± 0.141 |" in md  # (0.7, 0.5): mean 0.6, sample std 0.141421


def test_table_from_fixed_metric_files(tmp_path):
  root = str(tmp_path)
  runs = sweep.expand_grid([("lr", ["a", "b"])], ["0", "1", "2"], root)
  # Point a: accuracy 0.5, 0.6, 0.7 -> mean 0.6, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1;
  #          ece 0.2, 0.1, 0.3     -> mean 0.2, std 0.1.
  for r, acc, ece in zip(runs[:3], (0.5, 0.6, 0.7), (0.2, 0.1, 0.3)):
    _report(r.workdir, acc, ece=ece)
  # Point b: one run in the legacy report format, one only with metrics.jsonl, one missing.
  #          accuracy 0.2, 0.4 -> mean 0.3, std sqrt(2 * 0.01) = 0.141421; macro_f1 0.1, 0.3.
  os.makedirs(runs[3].workdir)
  with open(os.path.join(runs[3].workdir, "eval_report.json"), "w") as f:
    json.dump({"step": 3, "splits": {"test_close": {"accuracy": 0.2, "macro_f1": 0.1}}}, f)
  os.makedirs(runs[4].workdir)
  with open(os.path.join(runs[4].workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    f.write(json.dumps({"step": 2, "split": "test_close", "accuracy": 0.9, "macro_f1": 0.9}) + "\n")
    f.write(json.dumps({"step": 3, "split": "test_close", "accuracy": 0.4, "macro_f1": 0.3}) + "\n")
  # Two model names across runs ("sft" and "model") -> columns name the model.
  keys, cols, rows = sweep.collect(runs)
  assert keys == ["lr"]
  assert cols == ["sft/test_close/accuracy", "sft/test_close/macro_f1", "sft/test_close/ece",
                  "model/test_close/accuracy", "model/test_close/macro_f1"]
  a, b = rows
  assert a["seeds"] == "3/3" and b["seeds"] == "2/3"
  assert a["sft/test_close/accuracy"] == pytest.approx((0.6, 0.1))
  assert a["sft/test_close/ece"] == pytest.approx((0.2, 0.1))
  assert a["model/test_close/accuracy"] is None
  assert b["model/test_close/accuracy"] == pytest.approx((0.3, 0.141421), abs=1e-6)
  assert b["model/test_close/macro_f1"] == pytest.approx((0.2, 0.141421), abs=1e-6)
  md = sweep.table_markdown(keys, cols, rows)
  assert md.splitlines()[0] == ("| lr | seeds | sft/test_close/accuracy | sft/test_close/macro_f1 "
                                "| sft/test_close/ece | model/test_close/accuracy | "
                                "model/test_close/macro_f1 |")
  assert md.splitlines()[2] == "| a | 3/3 | 0.600 ± 0.100 | 0.300 ± 0.050 | 0.200 ± 0.100 | - | - |"
  assert md.splitlines()[3] == "| b | 2/3 | - | - | - | 0.300 ± 0.141 | 0.200 ± 0.141 |"
  csv_lines = sweep.table_csv(keys, cols, rows).splitlines()
  assert csv_lines[0].startswith("lr,seeds,sft/test_close/accuracy/mean,sft/test_close/accuracy/std")
  first = csv_lines[1].split(",")
  assert first[:2] == ["a", "3/3"] and float(first[2]) == pytest.approx(0.6)
  assert float(first[3]) == pytest.approx(0.1) and first[-4:] == ["", "", "", ""]
  # One seed: the mean alone, no std.
  _, cols1, rows1 = sweep.collect(runs[:1])
  assert rows1[0]["test_close/accuracy"] == (0.5, None)
  assert "| a | 1/1 | 0.500 |" in sweep.table_markdown(["lr"], cols1, rows1)


def _chain_results(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"close_split": "test_close", "open_split": "test_open", "rows": [
        {"model": m, "close_accuracy": c, "close_macro_f1": None, "close_ece": None,
         "open_accuracy": o, "open_macro_f1": None, "open_ece": None} for m, c, o in rows]}, f)


def test_chain_seeds_give_one_line_per_model(tmp_path):
  """Chains (configs/deepintuit.py) write results.json: a finished run, one row per model;
  the table has a line per model with mean +- sample std over the seeds."""
  runs = sweep.expand_grid([], ["0", "1", "2"], str(tmp_path))
  # SFT close 0.5, 0.6, 0.7 -> 0.6 +- 0.1; open 0.2, 0.2, 0.2 -> 0.2 +- 0; GRPO one seed only.
  for r, close in zip(runs, (0.5, 0.6, 0.7)):
    _chain_results(r.workdir, [("SFT", close, 0.2)] + ([("GRPO", 0.9, 0.4)] if close == 0.5
                                                        else []))
  assert all(sweep.is_finished(r.workdir) for r in runs)
  keys, cols, rows = sweep.collect(runs, ["accuracy"])
  (row,) = rows
  assert row["SFT/test_close/accuracy"] == pytest.approx((0.6, 0.1))
  assert row["SFT/test_open/accuracy"] == pytest.approx((0.2, 0.0))
  assert row["GRPO/test_close/accuracy"] == (0.9, None)  # one seed: no spread
  md = sweep.models_markdown(keys, cols, rows)
  assert md.splitlines()[0] == "| model | seeds | test_close/accuracy | test_open/accuracy |"
  assert "| SFT | 3/3 | 0.600 ± 0.100 | 0.200 ± 0.000 |" in md
  assert "| GRPO | 3/3 | 0.900 | 0.400 |" in md
