"""Prompts, teacher traces and the reward parsers (r_format, r_accuracy), by hand-written cases."""
from __future__ import annotations

import pytest

from deepintuit_jax.data import prompts

CLASSES = {"normal": "Everyday activity.", "abnormal": "Threats or accidents."}


# ----------------------------------------------------------------------------- prompt
@pytest.mark.parametrize("compact", [False, True])
def test_prompt_structure(compact):
  p = prompts.classification_prompt(CLASSES, title="a clip", transcript="someone walks",
                                    sticker="", compact=compact)
  # Format, definitions, the three steps, then the materials, in that order.
  order = [p.index("<think>"), p.index("<answer>"), p.index("Everyday activity."),
           p.index("Threats or accidents."), p.index("Title: a clip")]
  assert order == sorted(order)
  assert p.index("Threats or accidents.") < p.index("Title: a clip")
  assert "someone walks" in p
  assert p.rstrip().endswith("None")  # empty sticker text is written as None
  for label in CLASSES:
    assert label in p
  assert "Yes/No" in p or "Yes or No" in p
  assert p.index("normal") < p.index("abnormal")  # class-file order kept


def test_compact_is_much_shorter():
  full = prompts.classification_prompt(CLASSES)
  short = prompts.classification_prompt(CLASSES, compact=True)
  assert len(short) < 0.5 * len(full)


def test_prompt_needs_classes():
  with pytest.raises(ValueError):
    prompts.classification_prompt({})


# ----------------------------------------------------------------------------- trace
def test_teacher_trace_exact_text():
  t = prompts.teacher_trace("A red ball rolls.", [("normal", True, "nothing unusual"),
                                                  ("abnormal", False, "no risk")],
                            "The checks agree on normal.", "normal")
  assert t == ("<think>\nStep 1: A red ball rolls.\n\nStep 2:\nnormal: Yes, nothing unusual\n"
               "abnormal: No, no risk\n\nStep 3: The checks agree on normal.\n</think>\n"
               "<answer>normal</answer>")
  assert prompts.is_well_formatted(t)
  assert prompts.extract_answer(t) == "normal"


def test_teacher_trace_refuses_tags():
  with pytest.raises(ValueError, match="tag"):
    prompts.teacher_trace("sum </think>", [("a", True, "e")], "v", "a")
  with pytest.raises(ValueError, match="special"):
    prompts.teacher_trace("sum", [("a", True, "e <|im_end|>")], "v", "a")
  with pytest.raises(ValueError):
    prompts.teacher_trace("sum", [("a", True, "e")], "v", "  ")


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text,want", [
    ("<think>x</think><answer>normal</answer>", "normal"),
    ("<think>x</think><answer>  Normal \n</answer>", "Normal"),
    ("<answer>a</answer> then <answer>b</answer>", "a"),
    ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
    ("<answer></answer>", ""),
    ("no tags at all", None),
    ("<answer>unterminated", None),
    ("</answer>normal<answer>", None),
    ("<ANSWER>normal</ANSWER>", None),
])
def test_extract_answer(text, want):
  assert prompts.extract_answer(text) == want


GOOD = [
    "<think>reason</think><answer>normal</answer>",
    "<think>\nStep 1: x\n</think>\n<answer>normal</answer>",
    "  \n<think>r</think>  \n\n <answer> normal </answer>\n",
    "<think>r</think><answer>normal</answer><|im_end|>",
    "<think>r</think><answer>normal</answer>\n<|im_end|>\n",
    "<think>r</think><answer>normal</answer><|endoftext|>",
    "<think></think><answer></answer>",
    "<think>a < b and c > d, <tag></think><answer>x</answer>",
]
BAD = [
    "",
    "normal",
    "<answer>normal</answer>",
    "<think>r</think>",
    "<think>r</think>normal",
    "prefix <think>r</think><answer>normal</answer>",
    "<think>r</think><answer>normal</answer> trailing",
    "<think>r</think> middle <answer>normal</answer>",
    "<answer>normal</answer><think>r</think>",
    "<think>r<think>r</think><answer>normal</answer>",
    "<think>r</think></think><answer>normal</answer>",
    "<think>r</think><answer>normal</answer><answer>x</answer>",
    "<think>r <answer>x</answer></think><answer>normal</answer>",
    "<think>r</think><answer>nor<think>mal</answer>",
    "<think>r<|im_end|></think><answer>normal</answer>",
    "<think>r</think><answer>normal<|endoftext|></answer>",
    "<think>r <|vision_start|></think><answer>normal</answer>",
    "<think>r <|some_new_token|></think><answer>normal</answer>",
    "<think>r</think><answer>normal</answer><|im_end|><|im_end|>",
    "<think>r</think><answer>normal</answer><|im_start|>",
    "<think>r</think><answer>normal",
    "<think>r<answer>normal</answer>",
    "<THINK>r</THINK><ANSWER>normal</ANSWER>",
]


@pytest.mark.parametrize("text", GOOD)
def test_well_formatted(text):
  assert prompts.is_well_formatted(text)


@pytest.mark.parametrize("text", BAD)
def test_not_well_formatted(text):
  assert not prompts.is_well_formatted(text)


def test_custom_special_tokens():
  text = "<think>r <NO_POLICY></think><answer>normal</answer>"
  assert not prompts.is_well_formatted(text)
  assert prompts.is_well_formatted(text, special_tokens=())
  assert not prompts.is_well_formatted("<think>r [X]</think><answer>a</answer>",
                                       special_tokens=("[X]",))


@pytest.mark.parametrize("text,label,want", [
    ("<think>r</think><answer>normal</answer>", "normal", True),
    ("<think>r</think><answer> NORMAL\n</answer>", "normal", True),
    ("<think>r</think><answer>normal</answer>", " Normal ", True),
    ("<think>r</think><answer>abnormal</answer>", "normal", False),
    ("<think>r</think><answer>normal.</answer>", "normal", False),
    ("<think>r</think><answer>not normal</answer>", "normal", False),
    ("<answer>normal</answer><answer>abnormal</answer>", "abnormal", False),
    ("normal", "normal", False),
    ("<think>the answer is normal</think>", "normal", False),
    ("garbage <answer>normal</answer> garbage", "normal", True),  # accuracy ignores format
])
def test_answer_matches(text, label, want):
  assert prompts.answer_matches(text, label) is want


@pytest.mark.parametrize("text,want", [
    ("<think> why </think>\n<answer> a </answer>", ("a", "why")),
    ("just some words", ("", "just some words")),
    ("<think>why</think> but no answer", ("", "<think>why</think> but no answer")),
])
def test_split_trace(text, want):
  assert prompts.split_trace(text) == want


# ----------------------------------------------------------------------------- meta-review
@pytest.mark.parametrize("compact", [False, True])
def test_meta_review_prompt_parts(compact):
  p = prompts.meta_review_prompt(CLASSES, conclusion="normal", rationale="A cat naps.\nCalm.",
                                 title="a clip", transcript="someone walks", sticker="",
                                 priority=["abnormal", "normal"], compact=compact)
  # Definitions, tie rule, materials, then the first review, in that order.
  parts = ["Everyday activity.", "Threats or accidents.", "abnormal > normal", "a clip",
           "someone walks", "onclusion: normal", "A cat naps.\nCalm."]
  where = [p.index(x) for x in parts]
  assert where == sorted(where), where
  assert "Sticker" in p and "None" in p   # empty material written as None
  assert "exactly one label" in p
  assert "<think>" not in p and "<answer>" not in p  # a bare label is asked for
  assert p.index("normal") < p.index("abnormal")  # class-file order in the label list


def test_meta_review_prompt_defaults_and_checks():
  p = prompts.meta_review_prompt(CLASSES, conclusion="", rationale="no tags <|im_end|> at all")
  assert "Conclusion: None" in p and "Rationale: no tags  at all" in p
  assert "<|" not in p  # special tokens from the generated text are dropped
  assert "normal > abnormal" in p  # default tie order: the class order
  with pytest.raises(ValueError, match="exactly once"):
    prompts.meta_review_prompt(CLASSES, conclusion="", rationale="", priority=["normal"])
  with pytest.raises(ValueError, match="exactly once"):
    prompts.meta_review_prompt(CLASSES, conclusion="", rationale="",
                               priority=["normal", "normal"])
  with pytest.raises(ValueError):
    prompts.meta_review_prompt({}, conclusion="", rationale="")


def test_compact_meta_review_is_much_shorter():
  kw = dict(conclusion="normal", rationale="r")
  assert len(prompts.meta_review_prompt(CLASSES, compact=True, **kw)) < 0.5 * len(
      prompts.meta_review_prompt(CLASSES, **kw))
