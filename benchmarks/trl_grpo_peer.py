"""The peer side of `benchmarks/grpo_step.py --trl_python=...`: TRL's GRPOTrainer on the same
export, prompts, group size and lengths, timed per iteration and per part.

Run by grpo_step.py in a subprocess with a separate Python that has torch, transformers and
trl (never the project's environment; nothing here imports deepintuit_jax, and neither the
package nor its tests import this file):

    /path/to/venv-trl/bin/python benchmarks/trl_grpo_peer.py --workload=DIR/workload.json \\
        --out=DIR/trl.json

The workload (written by grpo_step.py) names the HF export, the settings and, per prompt,
the user text, the label, our prompt token ids and a PNG. TRL's GRPOTrainer feeds images to
Qwen2.5-VL, not videos, so each clip comes as one image holding the same vision patches (the
first frame of each temporal pair, side by side): the same merged vision tokens and prompt
length as our video prompt; the prompt tokens are checked against ours (pads aside).

What is timed (wall clock, `time.perf_counter`), by wrapping the trainer's own methods:
  rollout   `GRPOTrainer._generate` (chat template + processor, `model.generate`, decoding);
  rewards   `GRPOTrainer._calculate_rewards` (the two reward functions below);
  log-probs no-grad calls of `_get_per_token_logps_and_entropies` inside
            `_generate_and_score_completions` (old log-probs; TRL skips them when one
            optimizer step consumes the whole generation batch);
  iteration the time between the ends of optimizer steps (`TrainerCallback.on_step_end`)
            over the steps that consume one generation batch: generation, scoring, the
            loss forward + backward, clipping, AdamW, the Trainer's own loop;
  update    iteration - `_generate_and_score_completions` (forward + backward + optimizer);
  other     `_generate_and_score_completions` - rollout - rewards - log-probs (the
            processor on the images again, padding, advantages, metric gathering).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
SPECIAL = re.compile(r"<\|[^<>|\s]*\|>")
ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)


def _clean(part: str) -> bool:
  return not (any(t in part for t in TAGS) or "<NO_POLICY>" in part or SPECIAL.search(part))


def well_formed(text: str) -> bool:
  """r_format (RECIPE "Stage 1"): `<think>A</think>` then `<answer>B</answer>`, whitespace
  around the blocks, at most one end token last; A and B without tags or special tokens."""
  body = text.strip()
  for end in END_TOKENS:
    if body.endswith(end):
      body = body[:-len(end)].rstrip()
      break
  if not (body.startswith(THINK_OPEN) and body.endswith(ANSWER_CLOSE)):
    return False
  cut = body.find(THINK_CLOSE)
  if cut < 0:
    return False
  rest = body[cut + len(THINK_CLOSE):].lstrip()
  if not rest.startswith(ANSWER_OPEN):
    return False
  return _clean(body[len(THINK_OPEN):cut]) and _clean(rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)])


def correct(text: str, label: str) -> bool:
  """r_accuracy: the first answer block, stripped, equals the label (case-insensitive)."""
  m = ANSWER.search(text)
  return m is not None and m.group(1).strip().lower() == label.strip().lower()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", required=True)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  with open(args.workload) as f:
    w = json.load(f)
  base = os.path.dirname(os.path.abspath(args.workload))

  import datasets
  import numpy as np
  import torch
  import transformers
  import trl
  from PIL import Image
  from transformers import (AutoTokenizer, Qwen2_5_VLForConditionalGeneration,
                            TrainerCallback)
  from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
  from trl import GRPOConfig, GRPOTrainer

  if w.get("threads"):
    torch.set_num_threads(int(w["threads"]))
  ckpt = w["checkpoint"]
  # Left padding and truncation, as GRPOTrainer sets when it loads the processor itself.
  side = dict(padding_side="left", truncation_side="left", local_files_only=True)
  tok = AutoTokenizer.from_pretrained(ckpt, **side)
  try:
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(ckpt, **side)
    processor_note = "AutoProcessor"
  except (ImportError, ModuleNotFoundError, AttributeError):
    # transformers' video processor needs torchvision, and PyPI's torchvision wheels are CUDA
    # builds that do not load against the CPU torch wheel. Images need neither: the
    # processor with the PIL image processor and no video processor.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
      def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
          return None
        return super().check_argument_for_proper_class(name, arg)

    processor = ImageOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(ckpt, local_files_only=True),
        tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    processor_note = "Qwen2_5_VLProcessor(PIL image processor, no video processor)"
  # The tiled clip images are larger than the export's per-frame pixel budget: let them
  # through unresized (each side is already a multiple of 28).
  ip = processor.image_processor
  biggest = max(int(np.prod(q["image_hw"])) for q in w["prompts"])
  ip.size = {"longest_edge": max(biggest, ip.size["longest_edge"]),
             "shortest_edge": ip.size["shortest_edge"]}

  rows, images = [], []
  for q in w["prompts"]:
    img = Image.open(os.path.join(base, q["image"])).convert("RGB")
    images.append(img)
    rows.append({"prompt": [{"role": "user", "content": q["text"]}], "image": img,
                 "label": q["label"]})

  # The prompts TRL will feed, tokenised as TRL does, against ours (image pads vs video pads).
  image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
  video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
  same_prompts = 0
  for q, img in zip(w["prompts"], images):
    msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": q["text"]}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = processor(images=[[img]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    ours = [image_pad if t == video_pad else t for t in q["prompt_ids"]]
    same_prompts += int(ids == ours)

  tokenizer_for_rewards = tok
  stop = set(w["stop_ids"])

  def decode(ids) -> str:
    ids = [int(i) for i in ids]
    for i, t in enumerate(ids):
      if t in stop:
        ids = ids[:i + 1]
        break
    return tokenizer_for_rewards.decode(ids, skip_special_tokens=False)

  def format_reward(prompts, completions, completion_ids, **kw):
    return [float(well_formed(decode(c))) for c in completion_ids]

  def accuracy_reward(prompts, completions, completion_ids, label, **kw):
    return [float(correct(decode(c), y)) for c, y in zip(completion_ids, label)]

  torch.manual_seed(w["seed"])
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
      ckpt, dtype=torch.float32, local_files_only=True)
  g, n_prompts, mini = w["group"], w["prompts_per_iteration"], w["mini_batch_prompts"]
  steps = n_prompts // mini
  cfg = GRPOConfig(
      output_dir=os.path.join(base, "trl_out"), report_to="none", save_strategy="no",
      use_cpu=True, bf16=w["dtype"] == "bfloat16", disable_tqdm=True, seed=w["seed"],
      max_steps=w["iters"] * steps, per_device_train_batch_size=mini * g,
      gradient_accumulation_steps=1, steps_per_generation=steps,
      num_generations=g,
      max_completion_length=w["new"], temperature=w["temperature"], top_p=w["top_p"],
      top_k=0, beta=0.0, num_iterations=1, epsilon=w["clip_low"],
      epsilon_high=w["clip_high"], loss_type="dapo", scale_rewards="group",
      learning_rate=w["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
      weight_decay=w["weight_decay"], adam_beta1=w["b1"], adam_beta2=w["b2"],
      adam_epsilon=w["eps"], max_grad_norm=w["grad_clip"], logging_steps=1,
      dataloader_num_workers=0, remove_unused_columns=False, log_completions=False)

  trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, accuracy_reward], args=cfg,
                        train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=processor)

  # ---------------------------------------------------------------- instrumentation
  clock: dict[str, float] = {}
  in_scoring = [False]

  def timed(name, fn):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
    return wrapper

  gen_score = trainer._generate_and_score_completions
  widths: list[int] = []

  def scoring(*a, **k):
    in_scoring[0] = True
    try:
      out = timed("score", gen_score)(*a, **k)
    finally:
      in_scoring[0] = False
    widths.append(int(out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]))
    return out
  trainer._generate_and_score_completions = scoring
  trainer._generate = timed("rollout", trainer._generate)
  trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)
  logps = trainer._get_per_token_logps_and_entropies

  def logps_timed(*a, **k):
    if in_scoring[0] and not torch.is_grad_enabled():
      return timed("logprobs", logps)(*a, **k)
    return logps(*a, **k)
  trainer._get_per_token_logps_and_entropies = logps_timed

  marks: list[tuple[float, dict]] = []

  class Marks(TrainerCallback):
    def on_train_begin(self, *a, **k):
      marks.append((time.perf_counter(), dict(clock, cpu=time.process_time())))

    def on_step_end(self, *a, **k):
      marks.append((time.perf_counter(), dict(clock, cpu=time.process_time())))
  trainer.add_callback(Marks())

  rewards_seen: list[float] = []
  lengths: list[float] = []
  calc = trainer._calculate_rewards

  def calc_kept(inputs, prompts, completions, completion_ids_list, *a, **k):
    r = calc(inputs, prompts, completions, completion_ids_list, *a, **k)
    rewards_seen.append(float(r.sum(1).mean()))
    lengths.append(float(np.mean([len(c) for c in completion_ids_list])))
    return r
  trainer._calculate_rewards = calc_kept

  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0

  iters = []
  for i in range(w["iters"]):
    (ta, ca), (tb, cb) = marks[i * steps], marks[(i + 1) * steps]
    d = {k: cb.get(k, 0.0) - ca.get(k, 0.0) for k in ("rollout", "rewards", "logprobs", "score")}
    it = dict(iteration=tb - ta, iteration_cpu=cb["cpu"] - ca["cpu"], rollout=d["rollout"],
              rewards=d["rewards"],
              logprobs=d["logprobs"], update=tb - ta - d["score"],
              other=d["score"] - d["rollout"] - d["rewards"] - d["logprobs"])
    iters.append(it)
    print(f"TRL iteration {i}{' (warm-up)' if i == 0 else ''}: {it['iteration']:.2f}s = "
          f"rollout {it['rollout']:.2f}s + rewards {it['rewards']:.3f}s + log-probs "
          f"{it['logprobs']:.2f}s + update {it['update']:.2f}s + other {it['other']:.2f}s",
          flush=True)
  timed_iters = iters[1:] or iters
  median = {k: float(np.median([it[k] for it in timed_iters])) for k in timed_iters[0]}
  mean = {k: float(np.mean([it[k] for it in timed_iters])) for k in timed_iters[0]}
  out = dict(
      median=median, mean=mean, iterations=iters, total_seconds=total,
      response_length_mean=float(np.mean(lengths[1:] or lengths)),
      reward_mean=float(np.mean(rewards_seen[1:] or rewards_seen)),
      same_prompts=f"{same_prompts}/{len(w['prompts'])}", processor=processor_note,
      padded_length=max(widths), attention=str(model.config._attn_implementation),
      old_logprobs_pass=median["logprobs"] > 0, torch_threads=torch.get_num_threads(),
      versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                    transformers=transformers.__version__, trl=trl.__version__,
                    datasets=datasets.__version__))
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
