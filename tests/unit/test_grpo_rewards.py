"""GRPO rewards: RECIPE's r_format / r_accuracy on tricky responses, an independent
transcription of the rule checked against the code on generated responses, and the registry."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from deepintuit_jax.algorithms.grpo import rewards

GOOD = "<think>The ball moves left.</think><answer>normal</answer>"

# (response, r_format, r_accuracy against label "Normal"), each worked by hand from RECIPE.
CASES = [
    (GOOD, 1, 1),
    ("  \n<think>a</think>\n\n<answer> NORMAL \n</answer>\n", 1, 1),    # whitespace around
    (GOOD + "<|im_end|>", 1, 1),                                         # end token at the end
    (GOOD + " \n<|endoftext|>\n", 1, 1),
    (GOOD + "<|im_end|><|im_end|>", 0, 1),                               # only one end token
    (GOOD + "<|im_end|><|endoftext|>", 0, 1),
    ("<|im_end|>" + GOOD, 0, 1),                                         # end token not at the end
    (GOOD + " trailing", 0, 1),                                          # trailing text
    ("lead " + GOOD, 0, 1),                                              # leading text
    ("<think>a</think> and <answer>normal</answer>", 0, 1),              # text between blocks
    ("<think>a<think>b</think><answer>normal</answer>", 0, 1),           # nested think
    ("<think>a</think><answer>normal</answer><answer>abnormal</answer>", 0, 1),  # two answers
    ("<think>a</think><answer>abnormal</answer><answer>normal</answer>", 0, 0),  # first counts
    ("<think>a <answer>x</answer></think><answer>normal</answer>", 0, 0),  # answer inside think
    ("<think>a</think><answer>nor<|im_end|>mal</answer>", 0, 0),         # special token inside
    ("<think>a <|vision_start|> b</think><answer>normal</answer>", 0, 1),
    ("<think>a <|anything_else|> b</think><answer>normal</answer>", 0, 1),  # any <|...|>
    ("<think>a</think><answer>normal</think></answer>", 0, 0),           # tag inside answer
    ("<answer>normal</answer><think>a</think>", 0, 1),                   # wrong order
    ("<answer>normal</answer>", 0, 1),                                   # no think
    ("<think>a</think>", 0, 0),                                          # no answer
    ("<think>a</think><answer>normal", 0, 0),                            # unclosed answer
    ("<Think>a</Think><answer>normal</answer>", 0, 1),                   # tags are case-sensitive
    ("<think></think><answer></answer>", 1, 0),                          # empty parts are allowed
    ("<think>a</think><answer>normal.</answer>", 1, 0),                  # exact match only
    ("<think>a</think><answer>not normal</answer>", 1, 0),
    ("", 0, 0),
]


@pytest.mark.parametrize("response,fmt,acc", CASES)
def test_tricky_responses(response, fmt, acc):
  assert rewards.format_reward(response) == fmt
  assert rewards.accuracy_reward(response, "Normal") == acc
  assert rewards.accuracy_reward(response, " normal ") == acc  # label case/space ignored


# An independent transcription of RECIPE's r_format: one full-match regex, then the two
# parts must contain no tag and no special token.
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FULL = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*)</answer>\s*"
                   r"(?:(?:<\|im_end\|>|<\|endoftext\|>)\s*)?", re.DOTALL)


def _reference_format(text: str) -> int:
  m = _FULL.fullmatch(text)
  if m is None:
    return 0
  for part in m.groups():
    if any(t in part for t in _TAGS) or re.search(r"<\|[^<>|\s]*\|>", part):
      return 0
  return 1


def _reference_accuracy(text: str, label: str) -> int:
  start = text.find("<answer>")
  if start < 0:
    return 0
  end = text.find("</answer>", start + len("<answer>"))
  if end < 0:
    return 0
  return int(text[start + len("<answer>"):end].strip().lower() == label.lower())


def test_against_independent_transcription():
  pieces = ["<think>", "</think>", "<answer>", "</answer>", "<|im_end|>", "<|endoftext|>",
            "<|video_pad|>", "normal", "Abnormal", " ", "\n", "x", "<", "|>", "think"]
  rng = random.Random(0)
  texts = [c[0] for c in CASES]
  for _ in range(3000):
    # Mostly near-well-formed strings, so both outcomes occur often.
    body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
    ans = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))
    tail = rng.choice(["", "<|im_end|>", " <|endoftext|> ", "x", "<|im_end|>\n"])
    texts.append(rng.choice(["", " "]) + f"<think>{body}</think>" + rng.choice(["", "\n"])
                 + f"<answer>{ans}</answer>" + tail)
    texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))))
  fmt = np.array([rewards.format_reward(t) for t in texts])
  ref = np.array([_reference_format(t) for t in texts])
  assert fmt.sum() > 300 and (1 - fmt).sum() > 300  # both outcomes exercised
  bad = [t for t, a, b in zip(texts, fmt, ref) if a != b]
  assert not bad, bad[:5]
  for label in ("normal", "abnormal"):
    acc = [rewards.accuracy_reward(t, label) for t in texts]
    assert acc == [_reference_accuracy(t, label) for t in texts]


def test_batched_rewards_and_combine():
  responses = [GOOD, GOOD + " junk", "<think>a</think><answer>abnormal</answer>"]
  examples = [{"label": "normal"}, {"label": "normal"}, {"label": "normal"}]
  np.testing.assert_array_equal(rewards.get("format")(responses, examples), [1, 0, 1])
  np.testing.assert_array_equal(rewards.get("accuracy")(responses, examples), [1, 1, 0])
  total, parts = rewards.combine({"format": 1.0, "accuracy": 1.0}, responses, examples)
  assert total.dtype == np.float32
  np.testing.assert_array_equal(total, [2, 1, 1])
  np.testing.assert_array_equal(parts["format"], [1, 0, 1])
  total, _ = rewards.combine({"format": 0.5, "accuracy": 2.0}, responses, examples)
  np.testing.assert_allclose(total, [2.5, 2.0, 0.5])


def test_user_reward_registered_by_decorator():
  name = "test_length_penalty"
  if name not in rewards.names():
    @rewards.register(name)
    def _length(responses, examples):
      return np.asarray([-len(r) / 100.0 for r in responses], np.float32)
  total, parts = rewards.combine({"format": 1.0, name: 1.0}, [GOOD], [{"label": "x"}])
  np.testing.assert_allclose(total, [1.0 - len(GOOD) / 100.0], rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    rewards.register(name)(lambda r, e: np.zeros(len(r), np.float32))


def test_registry_and_input_errors():
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("format")(lambda r, e: np.zeros(len(r), np.float32))
  with pytest.raises(ValueError, match=r"unknown reward 'acuracy'; known: .*accuracy.*format"):
    rewards.combine({"acuracy": 1.0}, [GOOD], [{"label": "x"}])
  with pytest.raises(ValueError, match="example 1 has no 'label'"):
    rewards.combine({"accuracy": 1.0}, [GOOD, GOOD], [{"label": "x"}, {"reward_label": "x"}])
  with pytest.raises(ValueError, match="2 responses but 1 examples"):
    rewards.combine({"format": 1.0}, [GOOD, GOOD], [{"label": "x"}])
  with pytest.raises(TypeError, match="response 1 must be a string"):
    rewards.combine({"format": 1.0}, [GOOD, b"x"], [{}, {}])
  with pytest.raises(ValueError, match="finite number"):
    rewards.combine({"format": float("nan")}, [GOOD], [{}])
  name = "test_bad_shape"
  if name not in rewards.names():
    rewards.register(name)(lambda r, e: np.zeros((len(r), 2), np.float32))
  with pytest.raises(ValueError, match="returned shape"):
    rewards.combine({name: 1.0}, [GOOD], [{}])
