"""Chat formatting, loss masks, special tokens and decoding (data/chat.py)."""
import numpy as np
import pytest

from deepintuit_jax.data import chat
from deepintuit_jax.models import tiny

PROMPT = "Is the red ball moving left? Output format: <think>reasoning</think><answer>label</answer>"
RESPONSE = "<think>Step 1 summary: a red ball.\nStep 2 checks: Yes.</think>\n<answer>normal</answer>"


@pytest.fixture(scope="module")
def tok():
  t = tiny.build_tokenizer(seed=0)
  chat.add_special_tokens(t, ["normal", "abnormal"])
  return t


def _template_ids(tok, messages, gen):
  out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
  if isinstance(out, dict) or hasattr(out, "keys"):
    out = out["input_ids"]
  return [int(i) for i in out]


def _expand(ids, pad, counts):
  out, k = [], 0
  for i in ids:
    if i == pad:
      out += [pad] * counts[k]
      k += 1
    else:
      out.append(i)
  assert k == len(counts)
  return out


@pytest.mark.parametrize("counts", [[6], [3, 5], []])
def test_matches_chat_template_and_mask_is_assistant_span(tok, counts):
  msgs = [{"role": "user", "content": [{"type": "video", "video": f"v{i}.mp4"}
                                       for i in range(len(counts))]
           + [{"type": "text", "text": PROMPT}]},
          {"role": "assistant", "content": RESPONSE}]
  pad = tok.convert_tokens_to_ids("<|video_pad|>")
  want = _expand(_template_ids(tok, msgs, False), pad, counts)
  prompt = _expand(_template_ids(tok, msgs[:1], True), pad, counts)
  ex = chat.encode_example(tok, PROMPT, RESPONSE, num_video_tokens=counts)
  assert ex["input_ids"].dtype == np.int32 and ex["loss_mask"].dtype == np.int32
  assert ex["input_ids"].tolist() == want
  assert want[:len(prompt)] == prompt
  # loss_mask[t] = 1 iff token t+1 is a target; targets = everything after the prompt.
  expect = np.zeros(len(want), np.int32)
  expect[len(prompt) - 1:len(want) - 1] = 1
  np.testing.assert_array_equal(ex["loss_mask"], expect)
  targets = np.asarray(want)[1:][ex["loss_mask"][:-1] == 1]
  assert tok.decode(targets.tolist(), skip_special_tokens=False) == RESPONSE + "<|im_end|>\n"
  assert int((ex["input_ids"] == pad).sum()) == sum(counts)


def test_default_system_turn_and_vision_markers(tok):
  ex = chat.encode_example(tok, "hi", "normal", num_video_tokens=[2])
  text = tok.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|><|vision_end|>hi"
                  "<|im_end|>\n<|im_start|>assistant\nnormal<|im_end|>\n")
  # The label is one target token followed by <|im_end|> and "\n": 3 targets.
  assert int(ex["loss_mask"].sum()) == 3


def test_response_only_targets(tok):
  ex = chat.encode_example(tok, "hi", "abnormal", num_video_tokens=[2], train_end_of_turn=False)
  assert int(ex["loss_mask"].sum()) == 1  # the single label token
  t = int(np.flatnonzero(ex["loss_mask"])[0])
  assert ex["input_ids"][t + 1] == chat.label_token_ids(tok, ["abnormal"])[0]
  assert tok.convert_ids_to_tokens(int(ex["input_ids"][t + 2])) == "<|im_end|>"


def test_generation_prompt(tok):
  ex = chat.encode_example(tok, PROMPT, None, num_video_tokens=[4], for_generation=True)
  text = tok.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert not ex["loss_mask"].any()
  full = chat.encode_example(tok, PROMPT, RESPONSE, num_video_tokens=[4])
  n = len(ex["input_ids"])
  assert full["input_ids"][:n].tolist() == ex["input_ids"].tolist()


def test_custom_system(tok):
  ex = chat.encode_example(tok, "hi", "normal", num_video_tokens=[1], system="Be brief.")
  text = tok.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
  assert text.count("<|im_start|>system") == 1


def test_special_tokens_added_single_and_kept_on_decode():
  t = tiny.build_tokenizer(seed=0)
  n0 = len(t)
  added = chat.add_special_tokens(t, ["normal", "abnormal"])
  assert added == ["normal", "abnormal", *chat.TAG_TOKENS, chat.NO_POLICY_TOKEN]
  assert chat.add_special_tokens(t, ["normal", "abnormal"]) == []  # idempotent
  # "normal" is already in the tiny vocabulary: 6 new rows, not 7.
  assert len(t) == n0 + 6 and chat.required_vocab_size(t) == n0 + 6
  ids = chat.label_token_ids(t, ["normal", "abnormal"])
  assert ids[1] == n0 and len(set(ids)) == 2
  for tag in chat.TAG_TOKENS:
    assert len(t.encode(tag, add_special_tokens=False)) == 1
  resp = "<think>a red ball</think>\n<answer>abnormal</answer>"
  ids = t.encode(resp, add_special_tokens=False)
  end = [t.convert_tokens_to_ids("<|im_end|>"), t.pad_token_id, t.pad_token_id, 77]
  assert chat.decode_response(t, ids + end) == resp
  assert chat.decode_response(t, np.asarray(ids, np.int32)[None]) == resp
  with pytest.raises(ValueError, match="not a single token"):
    chat.label_token_ids(tiny.build_tokenizer(seed=0), ["abnormal"])


def test_bad_inputs(tok):
  with pytest.raises(ValueError, match="placeholders"):
    chat._expand_video_pads([1, 2], 7, [3])
  with pytest.raises(ValueError, match="response must be a string"):
    chat.encode_example(tok, "hi", None, num_video_tokens=[1])
  with pytest.raises(ValueError, match="positive"):
    chat.encode_example(tok, "hi", "x", num_video_tokens=[0])
  with pytest.raises(ValueError, match="usable token"):
    chat.add_special_tokens(tok, [" normal"])


def test_shift_targets():
  ids = np.array([[5, 6, 7, 0]])
  np.testing.assert_array_equal(chat.shift_targets(ids, 0), [[6, 7, 0, 0]])
