"""Classification prompts, teacher traces, and answer parsing for the rewards.

The prompt follows the release's shape: a role, a mandatory output format with
`<think></think><answer></answer>`, the label definitions, a three-step analysis procedure
(1 summary; 2 every label checked Yes/No with evidence; 3 self-verification), then the text
materials (title, transcript/description, sticker text). The wording is ours.

Parsing follows RECIPE.md's rewards: `is_well_formatted` is r_format, `answer_matches` is
r_accuracy. Both must see the tags, so responses are decoded with special tokens kept.

`meta_review_prompt` is the calibration stage's user text (RECIPE "Stage 2"): the label
definitions, a priority rule for ties, the text materials and a first reviewer's conclusion
and rationale (from `split_trace`), asking for exactly one label.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Qwen's special tokens that may appear in a decoded response; any `<|...|>` is also refused.
SPECIAL_TOKENS = END_TOKENS + (
    "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>",
    "<|vision_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<NO_POLICY>")
_SPECIAL_RE = re.compile(r"<\|[^<>|\s]*\|>")
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_NONE = "None"


def _material(text: str) -> str:
  text = (text or "").strip()
  return text if text else _NONE


def _check_classes(classes: Mapping[str, str]) -> None:
  if not classes:
    raise ValueError("classification_prompt: no classes given")
  for label in classes:
    if not isinstance(label, str) or not label.strip():
      raise ValueError(f"classification_prompt: bad label {label!r}")


def classification_prompt(classes: Mapping[str, str], *, title: str = "", transcript: str = "",
                          sticker: str = "", compact: bool = False) -> str:
  """The user text asking for one label out of `classes` (label -> definition, in order).

  `compact=True` gives a much shorter prompt of the same structure, for tiny models.
  Empty materials are written as "None", as the release does.
  """
  _check_classes(classes)
  names = ", ".join(classes)
  defs = "\n".join(f"- {label}: {d.strip()}" if d and d.strip() else f"- {label}"
                   for label, d in classes.items())
  if compact:
    return (f"Classify the video as one of: {names}.\n"
            f"Format: {THINK_OPEN}reasoning{THINK_CLOSE}{ANSWER_OPEN}label{ANSWER_CLOSE}\n"
            f"Labels:\n{defs}\n"
            "Steps: 1 summary; 2 each label Yes/No with evidence; 3 verify.\n"
            f"Title: {_material(title)}\n"
            f"Description: {_material(transcript)}\n"
            f"Sticker: {_material(sticker)}")
  return (
      "You are an expert video reviewer. Watch the video, read the materials that come with "
      f"it, and decide which single label fits it best. The possible labels are: {names}.\n\n"
      "OUTPUT FORMAT (mandatory): put all of your reasoning inside "
      f"{THINK_OPEN}{THINK_CLOSE}, then write only the chosen label inside "
      f"{ANSWER_OPEN}{ANSWER_CLOSE}, with nothing after it:\n"
      f"{THINK_OPEN}your analysis{THINK_CLOSE}\n{ANSWER_OPEN}label{ANSWER_CLOSE}\n\n"
      f"LABEL DEFINITIONS\n{defs}\n\n"
      "ANALYSIS PROCEDURE\n"
      "Step 1 (summary): describe what happens in the video from start to end, using the "
      "materials where they help.\n"
      "Step 2 (label checks): go through the labels one by one; for each, answer Yes or No "
      "and give the concrete evidence from the video or the materials.\n"
      "Step 3 (self-verification): re-read the definitions, make sure the chosen label is "
      "the one the evidence supports, and resolve any conflict between the checks.\n\n"
      "MATERIALS\n"
      f"Title: {_material(title)}\n"
      f"Transcript / description: {_material(transcript)}\n"
      f"Sticker text: {_material(sticker)}")


def _check_free_text(text: str, what: str) -> str:
  if not isinstance(text, str):
    raise TypeError(f"teacher_trace: {what} must be a string, got {type(text).__name__}")
  bad = [t for t in TAGS + SPECIAL_TOKENS if t in text] + _SPECIAL_RE.findall(text)
  if bad:
    raise ValueError(f"teacher_trace: {what} contains a tag or special token {bad[0]!r}")
  return text.strip()


def teacher_trace(summary: str, checks: Sequence[tuple[str, bool, str]], verification: str,
                  answer: str) -> str:
  """A reasoning trace in the release's three-step shape.

  Returns "<think>\\nStep 1: {summary}\\n\\nStep 2: {label}: Yes|No, {evidence}\\n...\\n\\n
  Step 3: {verification}\\n</think>\\n<answer>{answer}</answer>"; always well formatted.
  """
  summary = _check_free_text(summary, "summary")
  verification = _check_free_text(verification, "verification")
  answer = _check_free_text(answer, "answer")
  if not answer:
    raise ValueError("teacher_trace: empty answer")
  if not checks:
    raise ValueError("teacher_trace: no label checks")
  lines = []
  for label, yes, evidence in checks:
    label = _check_free_text(label, "check label")
    evidence = _check_free_text(evidence, f"evidence for {label!r}")
    lines.append(f"{label}: {'Yes' if yes else 'No'}" + (f", {evidence}" if evidence else ""))
  step2 = "\n".join(lines)
  return (f"{THINK_OPEN}\nStep 1: {summary}\n\nStep 2:\n{step2}\n\nStep 3: {verification}\n"
          f"{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}")


def extract_answer(text: str) -> str | None:
  """The stripped text of the first `<answer>...</answer>` block, or None when there is none."""
  m = _ANSWER_RE.search(text)
  return None if m is None else m.group(1).strip()


def _has_tag_or_special(part: str, special_tokens: Sequence[str]) -> bool:
  return (any(t in part for t in TAGS) or any(t in part for t in special_tokens)
          or _SPECIAL_RE.search(part) is not None)


def is_well_formatted(text: str, *, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                      end_tokens: Sequence[str] = END_TOKENS) -> bool:
  """r_format: the whole response is `<think>A</think>` then `<answer>B</answer>`.

  Whitespace is allowed before, between and after the two blocks, and one end token (from
  `end_tokens`) may close the response; A and B contain no tag and no special token.
  """
  body = text.strip()
  for end in end_tokens:
    if body.endswith(end):
      body = body[: -len(end)].rstrip()
      break
  if not (body.startswith(THINK_OPEN) and body.endswith(ANSWER_CLOSE)):
    return False
  think_end = body.find(THINK_CLOSE)
  if think_end < 0:
    return False
  think = body[len(THINK_OPEN):think_end]
  rest = body[think_end + len(THINK_CLOSE):].lstrip()
  if not rest.startswith(ANSWER_OPEN):
    return False
  answer = rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
  return not (_has_tag_or_special(think, special_tokens)
              or _has_tag_or_special(answer, special_tokens))


def answer_matches(text: str, label: str) -> bool:
  """r_accuracy: the first answer block, stripped and lower-cased, equals the label."""
  answer = extract_answer(text)
  return answer is not None and answer.lower() == label.strip().lower()


def split_trace(text: str) -> tuple[str, str]:
  """(answer, rationale) of a generated trace, for the calibration stage.

  The rationale is the text of the first `<think>` block (stripped); a trace missing the
  tags becomes the whole rationale with an empty answer, as the release does.
  """
  answer = extract_answer(text)
  m = re.search(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), text, re.DOTALL)
  if answer is None or m is None:
    return "", text.strip()
  return answer, m.group(1).strip()


def _review_text(text: str) -> str:
  """A generated text made safe inside a prompt: special tokens (`<|...|>`, `<NO_POLICY>`)
  are removed, since in a user turn they would be read as chat structure or vision pads."""
  if not isinstance(text, str):
    raise TypeError(f"meta_review_prompt: expected a string, got {type(text).__name__}")
  for t in SPECIAL_TOKENS:
    text = text.replace(t, "")
  return _SPECIAL_RE.sub("", text).strip()


def check_priority(classes: Mapping[str, str] | Sequence[str],
                   priority: Sequence[str] | None) -> list[str]:
  """The tie-break order: `priority` (every class exactly once) or the class order."""
  labels = list(classes)
  if priority is None:
    return labels
  order = list(priority)
  if sorted(order) != sorted(labels) or len(set(order)) != len(order):
    raise ValueError(f"priority {order} must list each of the classes {labels} exactly once")
  return order


def meta_review_prompt(classes: Mapping[str, str], *, conclusion: str, rationale: str,
                       title: str = "", transcript: str = "", sticker: str = "",
                       priority: Sequence[str] | None = None, compact: bool = False) -> str:
  """The calibration ("meta-review") user text: decide the final label of a video given a
  first reviewer's conclusion and rationale, which may be wrong.

  Args:
    classes: label -> definition, in order.
    conclusion / rationale: `split_trace` of the first reviewer's trace; an empty conclusion
      (a trace without the tags) is written as "None" and the rationale carries the text.
    title / transcript / sticker: the text materials ("None" when empty, as the release).
    priority: the labels in tie-break order (default: the class order).
    compact: a much shorter prompt of the same parts, for tiny models.
  The answer asked for is exactly one label, bare (no tags).
  """
  _check_classes(classes)
  order = check_priority(classes, priority)
  names = ", ".join(classes)
  defs = "\n".join(f"- {label}: {d.strip()}" if d and d.strip() else f"- {label}"
                   for label, d in classes.items())
  ties = " > ".join(order)
  conclusion = _review_text(conclusion) or _NONE
  rationale = _review_text(rationale) or _NONE
  if compact:
    return (f"Final review of the video: one of {names}.\n"
            f"Labels:\n{defs}\n"
            f"Tie: prefer {ties}.\n"
            f"Title: {_material(title)}\n"
            f"Description: {_material(transcript)}\n"
            f"Sticker: {_material(sticker)}\n"
            f"First reviewer's conclusion: {conclusion}\n"
            f"First reviewer's rationale: {rationale}\n"
            "Answer with exactly one label.")
  return (
      "You are the senior reviewer who makes the final call on a video. Another reviewer "
      "has already looked at it; their conclusion and rationale are given below. They may be "
      "wrong or incomplete: check them against the video, the materials and the label "
      "definitions, keep their conclusion when the evidence supports it and overrule it when "
      f"it does not. The possible labels are: {names}.\n\n"
      f"LABEL DEFINITIONS\n{defs}\n\n"
      "PRIORITY RULE FOR TIES\n"
      "When the evidence fits more than one label equally well, choose the label that comes "
      f"first in this order: {ties}.\n\n"
      "MATERIALS\n"
      f"Title: {_material(title)}\n"
      f"Transcript / description: {_material(transcript)}\n"
      f"Sticker text: {_material(sticker)}\n\n"
      "FIRST REVIEW\n"
      f"Conclusion: {conclusion}\n"
      f"Rationale: {rationale}\n\n"
      "Reply with exactly one label from the list above and nothing else: no reasoning, no "
      "tags, no punctuation.")
