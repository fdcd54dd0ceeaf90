"""Does the export answer in transformers and vLLM as it did here? (docs/serving.md)

  python scripts/serve_check.py EXPORT SPLIT [--max_items 32] [--out DIR]
      [--engines project,transformers,vllm] [--vllm_python /path/to/venv/bin/python]

EXPORT: an HF directory written by a stage (`<workdir>/hf`). SPLIT: a release-format JSON
file (videos looked up under `--video_root`, default the file's directory). Each engine
answers the first `--max_items` clips greedily, with the frames training samples, the
export's processor settings and its rope rule:
* project: this framework's evaluation (`evals.generation`, fp32);
* transformers: `generate` in fp32, with its own processor where torchvision is installed,
  else (`--transformers_input=pixels`) with this framework's pixel values, which equal the
  processor's (tests/parity/test_video_golden.py); its rope rule patched to the export's
  (`serving.patch_transformers_rope`) unless `--no_rope_patch`;
* vllm: `LLM.generate` in fp32 when vllm is importable here, or in `--vllm_python` (a
  separate environment: this script re-runs itself there with `--engines=vllm`); skipped
  with a note when neither.
Every engine's token ids are decoded the same way (special tokens kept, up to the first end
token). Writes `<out>/<engine>.jsonl` (an engine whose file exists is not run again unless
`--rerun`) and prints, per engine, the clips whose text and whose parsed answer equal the
project's, and its accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from deepintuit_jax import serving  # noqa: E402
from deepintuit_jax.core.errors import UserError  # noqa: E402
from deepintuit_jax.data import annotations, chat, prompts  # noqa: E402

ENGINES = ("project", "transformers", "vllm")


def _options(settings: dict, video_root: str):
  from deepintuit_jax.data.examples import PipelineOptions
  return PipelineOptions(video_root=video_root, sampling=settings["sampling"],
                         max_frames=settings["max_frames"], fps=settings["fps"],
                         min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"],
                         shuffle=False)


def run_project(export, records, settings, args) -> dict[str, str]:
  import jax.numpy as jnp

  from deepintuit_jax.evals import generation, two_stage
  labels = annotations.labels_from_records(records)
  model, tok = two_stage.load_model(export, labels, dtype=jnp.float32)
  cfg = generation.EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              temperature=0.0)
  out = {}
  for _, rows in generation.generate_responses(model, tok, records, cfg=cfg,
                                               options=_options(settings, args.video_root)):
    out.update({item_id: texts[0] for item_id, _, texts in rows})
  return out


def _transformers_input(args) -> str:
  if args.transformers_input != "auto":
    return args.transformers_input
  try:
    import torchvision  # noqa: F401  (transformers' Qwen2-VL video processor needs it)
    return "processor"
  except ImportError:
    return "pixels"


def run_transformers(export, records, settings, args) -> dict[str, str]:
  try:
    import torch
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
  except ImportError as e:
    raise UserError(f"the transformers engine needs torch and transformers ({e})") from None
  serving.patch_transformers_rope(None if args.no_rope_patch else settings["rope_convention"])
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
  tok = AutoTokenizer.from_pretrained(export)
  stops, pad, video_id = chat.stop_ids(tok), chat.pad_id(tok), chat.token_id(tok, chat.VIDEO_PAD)
  mode = _transformers_input(args)
  print(f"transformers: inputs from {'its processor' if mode == 'processor' else 'our pixels'}"
        f", rope {'as installed' if args.no_rope_patch else settings['rope_convention']}",
        flush=True)
  processor = AutoProcessor.from_pretrained(export) if mode == "processor" else None
  options = _options(settings, args.video_root)
  out = {}
  for rec in records:
    if processor is not None:
      path = annotations.resolve_video_path(rec.video, args.video_root, item_id=rec.item_id)
      frames, meta = serving.video_inputs(path, export, item_id=rec.item_id)
      inputs = processor(text=[chat.generation_prompt(tok, rec.prompt)], videos=[frames],
                         video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    else:
      from deepintuit_jax.data.examples import ExampleBuilder
      ex = ExampleBuilder([rec], tok, options, for_generation=True).build(rec)
      ids = torch.tensor(ex["input_ids"][None].astype("int64"))
      inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == video_id).int() * 2,
                "pixel_values_videos": torch.tensor(ex["pixel_values_videos"]),
                "video_grid_thw": torch.tensor(ex["video_grid_thw"].astype("int64")),
                "second_per_grid_ts": torch.tensor(ex["second_per_grid_ts"])}
    with torch.no_grad():
      gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                           eos_token_id=stops, pad_token_id=pad)
    out[rec.item_id] = chat.decode_response(tok, gen[0, inputs["input_ids"].shape[1]:].numpy())
  return out


def run_vllm(export, records, settings, args) -> dict[str, str]:
  try:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
  except ImportError as e:
    raise UserError(f"vllm is not importable here ({e}); install it in its own environment "
                    "and pass --vllm_python=<that env>/bin/python") from None
  if settings["rope_convention"] != "qwen":
    print(f"warning: the export was trained with rope convention "
          f"{settings['rope_convention']!r}; vLLM serves 'qwen'", flush=True)
  tok = AutoTokenizer.from_pretrained(export)
  requests = []
  for rec in records:
    path = annotations.resolve_video_path(rec.video, args.video_root, item_id=rec.item_id)
    frames, meta = serving.video_inputs(path, export, item_id=rec.item_id)
    requests.append({"prompt": chat.generation_prompt(tok, rec.prompt),
                     "multi_modal_data": {"video": [(frames, meta)]},
                     "mm_processor_kwargs": {"do_sample_frames": False}})
  llm = LLM(model=export, dtype="float32", seed=0, limit_mm_per_prompt={"video": 1},
            max_model_len=args.max_model_len, gpu_memory_utilization=args.vllm_memory)
  params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens,
                          stop_token_ids=chat.stop_ids(tok), skip_special_tokens=False)
  outs = llm.generate(requests, params)
  return {rec.item_id: chat.decode_response(tok, o.outputs[0].token_ids)
          for rec, o in zip(records, outs)}


RUNNERS = {"project": run_project, "transformers": run_transformers, "vllm": run_vllm}


def _vllm_here() -> bool:
  try:
    import vllm  # noqa: F401
    return True
  except ImportError:
    return False


def _write(path, records, texts):
  with open(path + ".tmp", "w") as f:
    for rec in records:
      text = texts[rec.item_id]
      f.write(json.dumps({"item_id": rec.item_id, "label": rec.label, "response": text,
                          "answer": prompts.extract_answer(text)}) + "\n")
  os.replace(path + ".tmp", path)


def _read(path) -> dict[str, dict]:
  with open(path) as f:
    return {r["item_id"]: r for r in map(json.loads, f)}


def agreement(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
  """Per engine: clips, identical text / identical answer to the project's, correct."""
  base = results.get("project", {})
  table = {}
  for name, rows in results.items():
    keys = [k for k in rows if k in base] if base else list(rows)
    table[name] = {
        "clips": len(keys),
        "same_text": sum(rows[k]["response"] == base[k]["response"] for k in keys) if base else None,
        "same_answer": sum(rows[k]["answer"] == base[k]["answer"] for k in keys) if base else None,
        "correct": sum(prompts.answer_matches(rows[k]["response"], rows[k]["label"] or "")
                       for k in keys)}
  return table


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("export")
  ap.add_argument("split")
  ap.add_argument("--video_root", default="")
  ap.add_argument("--max_items", type=int, default=32)
  ap.add_argument("--max_new_tokens", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--engines", default="project,transformers,vllm")
  ap.add_argument("--out", default="", help="default: <export>/../serve_check")
  ap.add_argument("--vllm_python", default="", help="python of an environment with vllm")
  ap.add_argument("--transformers_input", choices=("auto", "processor", "pixels"),
                  default="auto")
  ap.add_argument("--no_rope_patch", action="store_true",
                  help="run transformers with its own rope rule (to measure it)")
  ap.add_argument("--max_model_len", type=int, default=16384)
  ap.add_argument("--vllm_memory", type=float, default=0.9,
                  help="vLLM's gpu_memory_utilization (on CPU: the share of host memory)")
  ap.add_argument("--rerun", action="store_true")
  args = ap.parse_args(argv)
  try:
    return _main(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _main(args) -> int:
  export = os.path.abspath(args.export)
  if not os.path.isfile(os.path.join(export, "config.json")):
    raise UserError(f"{args.export}: not an HF export directory (no config.json)")
  engines = [e for e in args.engines.split(",") if e]
  bad = [e for e in engines if e not in ENGINES]
  if bad:
    raise UserError(f"--engines: unknown {bad}; known: {list(ENGINES)}")
  args.video_root = args.video_root or os.path.dirname(os.path.abspath(args.split))
  out = args.out or os.path.join(os.path.dirname(export), "serve_check")
  os.makedirs(out, exist_ok=True)
  records = annotations.load_records(args.split)[:args.max_items or None]
  settings = serving.export_settings(export)
  print(f"{len(records)} clips of {args.split}; export {export}: {settings}", flush=True)
  for name in engines:
    path = os.path.join(out, f"{name}.jsonl")
    if os.path.isfile(path) and not args.rerun:
      print(f"{name}: kept {path}", flush=True)
      continue
    if name == "vllm" and not args.vllm_python and not _vllm_here():
      print("vllm: not importable here, skipped (pass --vllm_python=<an environment with "
            "vllm>/bin/python)", flush=True)
      continue
    if name == "vllm" and args.vllm_python and not _vllm_here():
      cmd = [args.vllm_python, os.path.abspath(__file__), args.export, args.split,
             "--engines=vllm", f"--out={out}", f"--video_root={args.video_root}",
             f"--max_items={args.max_items}", f"--max_new_tokens={args.max_new_tokens}",
             f"--max_model_len={args.max_model_len}", f"--vllm_memory={args.vllm_memory}",
             "--rerun"]
      print("vllm: " + " ".join(cmd), flush=True)
      if subprocess.run(cmd).returncode:
        raise UserError(f"the vllm run in {args.vllm_python} failed (its output is above)")
      continue
    start = time.time()
    texts = RUNNERS[name](export, records, settings, args)
    _write(path, records, texts)
    print(f"{name}: {len(texts)} clips in {time.time() - start:.0f} s -> {path}", flush=True)
  results = {n: _read(os.path.join(out, f"{n}.jsonl")) for n in ENGINES
             if os.path.isfile(os.path.join(out, f"{n}.jsonl"))}
  table = agreement(results)
  with open(os.path.join(out, "agreement.json"), "w") as f:
    json.dump(table, f, indent=2)
  print("| engine | clips | same text as project | same answer | correct |")
  print("|---|---|---|---|---|")
  for name, r in table.items():
    same = (lambda k: "-" if r[k] is None or name == "project" else f"{r[k]}/{r['clips']}")  # noqa
    print(f"| {name} | {r['clips']} | {same('same_text')} | {same('same_answer')} | "
          f"{r['correct']}/{r['clips']} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
