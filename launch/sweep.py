"""Sweeps for ablations: a grid of config overrides x seeds, one workdir per run.

    python launch/sweep.py --config=configs/sft.py --root=runs/sweep_lr \
        --config.train.learning_rate=1e-3,3e-3 --seeds=0,1,2 [--mode=run]

Every `--config.x=a,b,c` is a grid axis (values split at top-level commas, so `(1,-1,1)`
stays one value; an axis with one value is a fixed override); `--seeds=0,1,2` adds
`--config.seed=s`; `--pass=ARG` hands ARG unchanged to every run (a value that must keep a
top-level comma, e.g. `--pass=--config.data.eval_files=a=x.json,b=y.json`). Each run gets
`<root>/<axis=value,...,seed=s>` as its workdir.

Modes:
  run      one run after another here: a finished run is skipped; an unfinished one is
           (re)started with `python -m deepintuit_jax.main`, which resumes a killed run from
           its workdir's checkpoint; then `collect`.
  list     `<root>/commands.txt`, one command per unfinished run (any scheduler).
  slurm    the list plus `<root>/sweep.sbatch`, a SLURM array job over it (`--sbatch=LINE`
           adds header lines such as `--sbatch='#SBATCH --gpus=8'`); submit it with sbatch.
  collect  `<root>/sweep_results.md` and `.csv`: per grid point, mean +- sample std over the
           seeds of each final metric (`--metrics`, per model and split).

A run is finished when its workdir's `eval_report.json` says `"final": true`
(`evals.report.write_report(..., final=True)`) or when this script saw its `main` exit 0
(it then writes `sweep_done.json` there). Final metrics come from `eval_report.json`, else
from the last eval rows of `metrics.jsonl`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from deepintuit_jax.evals import report as report_lib  # noqa: E402

DONE_MARKER = "sweep_done.json"
CHAIN_RESULTS = "results.json"  # the chain's table (configs/deepintuit.py), one row per model
DEFAULT_METRICS = ("accuracy", "macro_f1", "ece")
MODES = ("run", "list", "slurm", "collect")


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid with one seed.

  point: ((config key, value), ...) of the grid axes (without the seed), in axis order;
  seed: the seed as given, or None (the config's own); workdir: `<root>/<name>`."""
  name: str
  point: tuple[tuple[str, str], ...]
  seed: str | None
  workdir: str

  def overrides(self) -> list[str]:
    out = [f"--config.{k}={v}" for k, v in self.point]
    return out + ([] if self.seed is None else [f"--config.seed={self.seed}"])


def split_values(text: str) -> list[str]:
  """`a,b,(1,-1,1)` -> ["a", "b", "(1,-1,1)"]: commas inside () [] {} or quotes stay."""
  out, depth, quote, cur = [], 0, "", []
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  out.append("".join(cur))
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  if any(not v for v in out):
    raise ValueError(f"empty value in {text!r}")
  return out


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_")


def expand_grid(axes: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[str] | None,
                root: str) -> list[Run]:
  """Runs of the grid (first axis slowest, seeds fastest). Names list every axis with more
  than one value, then the seed; "base" when there is none."""
  keys = [k for k, _ in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a config key is given twice: {keys}")
  if seeds is not None and "seed" in keys:
    raise ValueError("give the seeds either with --seeds or with --config.seed, not both")
  varying = {k for k, vals in axes if len(vals) > 1}
  runs, names = [], set()
  for values in itertools.product(*[list(v) for _, v in axes]):
    point = tuple(zip(keys, values))
    for seed in (list(seeds) if seeds is not None else [None]):
      parts = [f"{k}={v}" for k, v in point if k in varying]
      parts += [] if seed is None else [f"seed={seed}"]
      name = _safe(",".join(parts)) or "base"
      if name in names:
        raise ValueError(f"two runs would share the workdir name {name!r}")
      names.add(name)
      runs.append(Run(name, point, seed, os.path.join(root, name)))
  return runs


def command(run: Run, config: str, *, python: str = sys.executable,
            passthrough: Sequence[str] = ()) -> list[str]:
  """The `main` command line of one run."""
  return [python, "-m", "deepintuit_jax.main", f"--config={config}",
          f"--workdir={run.workdir}", *passthrough, *run.overrides()]


def is_finished(workdir: str) -> bool:
  """The run's final eval report (or a chain's results.json) is there, or the sweep saw its
  main exit 0."""
  if any(os.path.exists(os.path.join(workdir, f)) for f in (DONE_MARKER, CHAIN_RESULTS)):
    return True
  try:
    return report_lib.read_report(workdir).get("final") is True
  except (OSError, ValueError):
    return False


def subprocess_runner(cmd: Sequence[str], workdir: str) -> int:
  """Runs `cmd` in the current directory with this process's stdout / stderr."""
  return subprocess.run(list(cmd)).returncode


def run_all(runs: Sequence[Run], commands: Sequence[Sequence[str]], *,
            runner: Callable[[Sequence[str], str], int] = subprocess_runner,
            log: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs every unfinished run in turn. Returns {"skipped", "done", "failed"}: run names."""
  out: dict[str, list[str]] = {"skipped": [], "done": [], "failed": []}
  for i, (run, cmd) in enumerate(zip(runs, commands), 1):
    if is_finished(run.workdir):
      log(f"[{i}/{len(runs)}] {run.name}: finished, skipped")
      out["skipped"].append(run.name)
      continue
    log(f"[{i}/{len(runs)}] {run.name}: {shlex.join(cmd)}")
    t0 = time.time()
    rc = runner(cmd, run.workdir)
    if rc == 0:
      os.makedirs(run.workdir, exist_ok=True)
      with open(os.path.join(run.workdir, DONE_MARKER), "w") as f:
        json.dump({"command": list(cmd), "seconds": round(time.time() - t0, 1)}, f)
      out["done"].append(run.name)
    else:
      log(f"[{i}/{len(runs)}] {run.name}: FAILED with exit status {rc}")
      out["failed"].append(run.name)
  return out


def write_commands(root: str, commands: Sequence[Sequence[str]], *, slurm: bool = False,
                   sbatch_lines: Sequence[str] = (), job_name: str = "sweep") -> list[str]:
  """`<root>/commands.txt` (+ `<root>/sweep.sbatch` for SLURM). Returns the paths."""
  os.makedirs(root, exist_ok=True)
  cmd_path = os.path.join(root, "commands.txt")
  with open(cmd_path, "w") as f:
    f.writelines(shlex.join(c) + "\n" for c in commands)
  paths = [cmd_path]
  if slurm and commands:
    script = os.path.join(root, "sweep.sbatch")
    abs_cmds = os.path.abspath(cmd_path)
    with open(script, "w") as f:
      f.write("\n".join([
          "#!/usr/bin/env bash",
          f"#SBATCH --job-name={job_name}",
          f"#SBATCH --array=0-{len(commands) - 1}",
          f"#SBATCH --output={os.path.abspath(root)}/slurm-%A_%a.out",
          *sbatch_lines,
          "set -euo pipefail",
          f"cd {shlex.quote(os.getcwd())}",
          "export HF_HUB_OFFLINE=1",
          f'line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(abs_cmds)})',
          'eval "$line"', ""]))
    paths.append(script)
  return paths


def chain_metrics(path: str) -> dict[str, dict[str, dict]]:
  """{model: {split: {accuracy, macro_f1, ece}}} of a chain's results.json."""
  with open(path) as f:
    data = json.load(f)
  out: dict[str, dict[str, dict]] = {}
  for row in data["rows"]:
    out[row["model"]] = {data[f"{side}_split"]: {
        m: row.get(f"{side}_{m}") for m in ("accuracy", "macro_f1", "ece")
        if row.get(f"{side}_{m}") is not None} for side in ("close", "open")}
  return out


def final_metrics(workdir: str) -> dict[str, dict[str, dict]] | None:
  """{model: {split: metrics}} of a run: a chain's results.json, else its eval_report.json,
  else the last eval row of each split in metrics.jsonl (model "model"); None when it has
  none of them."""
  chain = os.path.join(workdir, CHAIN_RESULTS)
  if os.path.exists(chain):
    return chain_metrics(chain)
  try:
    return report_lib.read_report(workdir)["models"]
  except FileNotFoundError:
    pass
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  splits: dict[str, dict] = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line) if line.strip() else {}
      if isinstance(row.get("split"), str):
        splits[row["split"]] = row
  return {"model": splits} if splits else None


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  m = sum(values) / len(values)
  if len(values) < 2:
    return m, None
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def collect(runs: Sequence[Run], metrics: Sequence[str] = DEFAULT_METRICS
            ) -> tuple[list[str], list[str], list[dict]]:
  """(varying axis keys, metric columns, rows): one row per grid point, with "point" {key: value},
  "seeds" (runs with metrics / runs), and per column (mean, std or None) or None."""
  keys = [k for k, _ in runs[0].point if len({dict(r.point)[k] for r in runs}) > 1] \
      if runs else []  # the axes that vary (fixed overrides are the same in every row)
  groups: dict[tuple, list[Run]] = {}
  for r in runs:
    groups.setdefault(r.point, []).append(r)
  found = {r.name: final_metrics(r.workdir) for r in runs}
  single = len({m for res in found.values() if res for m in res}) == 1

  def cells(res):  # (column, value) of one run; the model is named when there are several
    for model, splits in res.items():
      for split, m in splits.items():
        for metric in metrics:
          v = m.get(metric)
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield (f"{split}/{metric}" if single else f"{model}/{split}/{metric}"), float(v)

  columns: list[str] = []
  for res in found.values():
    for col, _ in cells(res or {}):
      if col not in columns:
        columns.append(col)
  rows = []
  for point, members in groups.items():
    values: dict[str, list[float]] = {c: [] for c in columns}
    have = 0
    for r in members:
      res = found[r.name]
      if not res:
        continue
      have += 1
      for col, v in cells(res):
        values[col].append(v)
    rows.append({"point": dict(point), "seeds": f"{have}/{len(members)}",
                 **{c: (_mean_std(v) if v else None) for c, v in values.items()}})
  return keys, columns, rows


def _cell(v: tuple[float, float | None] | None) -> str:
  """"mean ± std" (sample std over seeds; the mean alone for one seed; "-" for none)."""
  if v is None:
    return "-"
  return f"{v[0]:.3f}" if v[1] is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def table_markdown(keys: Sequence[str], columns: Sequence[str], rows: Sequence[dict]) -> str:
  """Cells "mean ± std" (sample std over seeds; the mean alone for one seed)."""
  head = list(keys) + ["seeds"] + list(columns)
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    lines.append("| " + " | ".join([str(r["point"][k]) for k in keys] + [r["seeds"]]
                                   + [_cell(r[c]) for c in columns]) + " |")
  return "\n".join(lines) + "\n"


def models_markdown(keys: Sequence[str], columns: Sequence[str], rows: Sequence[dict]) -> str:
  """The table with one line per (grid point, model) when runs hold several models (columns
  `model/split/metric`, e.g. the chain's): cells "mean ± std" over the seeds."""
  models: list[str] = []
  metrics: list[str] = []
  for c in columns:
    parts = c.split("/")
    if len(parts) < 3:
      return ""
    model, rest = "/".join(parts[:-2]), "/".join(parts[-2:])
    if model not in models:
      models.append(model)
    if rest not in metrics:
      metrics.append(rest)
  head = list(keys) + ["model", "seeds"] + metrics
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    for model in models:
      lines.append("| " + " | ".join(
          [str(r["point"][k]) for k in keys] + [model, r["seeds"]]
          + [_cell(r.get(f"{model}/{m}")) for m in metrics]) + " |")
  return "\n".join(lines) + "\n"


def table_csv(keys: Sequence[str], columns: Sequence[str], rows: Sequence[dict]) -> str:
  """One column per axis, "seeds", then `<column>/mean` and `<column>/std` (empty if n/a)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(list(keys) + ["seeds"] + [f"{c}/{s}" for c in columns for s in ("mean", "std")])
  for r in rows:
    cells = []
    for c in columns:
      v = r[c]
      cells += ["", ""] if v is None else [repr(v[0]), "" if v[1] is None else repr(v[1])]
    w.writerow([r["point"][k] for k in keys] + [r["seeds"]] + cells)
  return buf.getvalue()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[tuple[str, list[str]]]]:
  """Sweep flags and the grid axes (`--config.x=a,b` in the order given)."""
  axes, rest = [], []
  for a in argv:
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq or not key:
        raise SystemExit(f"sweep: {a!r}: expected --config.key=value[,value...]")
      axes.append((key, split_values(value)))
    else:
      rest.append(a)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="the config file [:arg], as for main")
  p.add_argument("--root", required=True, help="the sweep's folder (one workdir per run)")
  p.add_argument("--seeds", default="", help="comma-separated seeds ('' = the config's)")
  p.add_argument("--mode", default="run", choices=MODES)
  p.add_argument("--pass", dest="passthrough", action="append", default=[],
                 help="an argument handed unchanged to every run (repeatable)")
  p.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
  p.add_argument("--python", default=sys.executable)
  p.add_argument("--sbatch", action="append", default=[], help="a header line (repeatable)")
  return p.parse_args(rest), axes


def main(argv: Sequence[str] | None = None, *,
         runner: Callable[[Sequence[str], str], int] = subprocess_runner) -> int:
  args, axes = parse_args(sys.argv[1:] if argv is None else argv)
  seeds = split_values(args.seeds) if args.seeds else None
  runs = expand_grid(axes, seeds, args.root)
  cmds = [command(r, args.config, python=args.python, passthrough=args.passthrough)
          for r in runs]
  print(f"sweep: {len(runs)} runs under {args.root}", flush=True)
  failed = []
  if args.mode in ("list", "slurm"):
    todo = [c for r, c in zip(runs, cmds) if not is_finished(r.workdir)]
    for path in write_commands(args.root, todo, slurm=args.mode == "slurm",
                               sbatch_lines=args.sbatch):
      print(f"wrote {path} ({len(todo)} unfinished runs)")
    return 0
  if args.mode == "run":
    failed = run_all(runs, cmds, runner=runner)["failed"]
  keys, columns, rows = collect(runs, [m for m in args.metrics.split(",") if m])
  md = models_markdown(keys, columns, rows) or table_markdown(keys, columns, rows)
  table = table_csv(keys, columns, rows)
  os.makedirs(args.root, exist_ok=True)
  for ext, text in (("md", md), ("csv", table)):
    with open(os.path.join(args.root, f"sweep_results.{ext}"), "w") as f:
      f.write(text)
  print(md, end="")
  if failed:
    print(f"sweep: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
