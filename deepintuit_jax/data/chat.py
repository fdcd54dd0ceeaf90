"""Chat formatting, tokenisation and loss masks for Qwen2.5-VL video conversations.

One example is the release's conversation: a user turn holding the video(s) then the text
prompt, and an assistant turn holding the response. It is rendered by the tokenizer's own
chat template (Qwen's default system turn is added by the template), tokenised once, and
each video placeholder `<|video_pad|>` is expanded to one pad token per merged vision token
(`t * h * w / merge**2` of the video's grid), between `<|vision_start|>` and `<|vision_end|>`
as the template writes them.

Loss mask alignment (docs/ARCHITECTURE.md, "Data contract"): `loss_mask[t] = 1` when the
*next* token `input_ids[t + 1]` is a target, i.e. the mask is aligned with the logits and
with `targets = input_ids[1:]`; the last position is always 0. Targets are the assistant
span: the response tokens, its `<|im_end|>` and the newline after it (the template writes
`<|im_end|>\\n` after every turn and the release trains on both; RECIPE "Stage 0").
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
NO_POLICY_TOKEN = "<NO_POLICY>"
VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IM_END, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"


TOKEN_MODES = ("added", "special", "none")


def add_label_tokens(tokenizer, labels: Sequence[str], *, special: bool, tags: bool = True,
                     extra: Sequence[str] = (NO_POLICY_TOKEN,)) -> list[str]:
  """Adds the class labels, the reasoning tags and `extra` as atomic added tokens.

  special=True registers them as special tokens, as the release does: decoding with
  `skip_special_tokens=True` (vLLM's and transformers' pipelines' default) then drops them
  from the text. special=False registers them as plain added tokens (`AddedToken(special=
  False, normalized=False)`): the same ids and the same tokenisation (each is matched whole,
  before the pre-tokenizer, also inside words), but they stay visible in decoded text.
  A token that is already a vocabulary token (e.g. `normal`) keeps its id either way; one
  that is already an added token is left as it is. Order of the new ids: labels in the given
  order, then `TAG_TOKENS`, then `extra`. The model's vocabulary must then hold at least
  `required_vocab_size(tokenizer)` rows (new rows initialised by the caller).
  Returns the tokens registered by this call.
  """
  from tokenizers import AddedToken

  wanted: list[str] = []
  for tok in list(labels) + (list(TAG_TOKENS) if tags else []) + list(extra):
    if not isinstance(tok, str) or not tok or tok != tok.strip():
      raise ValueError(f"add_label_tokens: {tok!r} is not a usable token (a non-empty "
                       "string without surrounding whitespace)")
    if tok not in wanted:
      wanted.append(tok)
  already = {t.content for t in tokenizer.added_tokens_decoder.values()
             if t.special or not special}
  new = [t for t in wanted if t not in already]
  if new:
    tokenizer.add_tokens([AddedToken(t, special=special, normalized=False) for t in new],
                         special_tokens=special)
  label_token_ids(tokenizer, wanted)  # each must now be a single token
  return new


def add_special_tokens(tokenizer, labels: Sequence[str], **kwargs) -> list[str]:
  """`add_label_tokens(..., special=True)`: the release's registration."""
  return add_label_tokens(tokenizer, labels, special=True, **kwargs)


def add_tokens_for_mode(tokenizer, labels: Sequence[str], mode: str) -> list[str]:
  """`data.special_tokens`: "added" (plain added tokens, visible after decoding), "special"
  (the release: special tokens) or "none" (the tokenizer is left unchanged)."""
  if mode not in TOKEN_MODES:
    from deepintuit_jax.core.errors import ConfigError
    raise ConfigError(f"data.special_tokens={mode!r}: must be one of {', '.join(TOKEN_MODES)}")
  if mode == "none":
    return []
  return add_label_tokens(tokenizer, labels, special=mode == "special")


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
  """The single token id of each label (the calibrator reads their logits)."""
  out = []
  for t in labels:
    ids = tokenizer.encode(t, add_special_tokens=False)
    if len(ids) != 1:
      raise ValueError(f"label {t!r} is not a single token (ids {ids}); call "
                       "add_special_tokens(tokenizer, labels) first")
    out.append(int(ids[0]))
  return out


def required_vocab_size(tokenizer) -> int:
  """Rows the model's embedding (and lm head) must have for every id of `tokenizer`."""
  return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def token_id(tokenizer, token: str) -> int:
  """The id of a single special token; a clear error when the tokenizer lacks it."""
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or tid == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
    raise ValueError(f"the tokenizer has no token {token!r}")
  return int(tid)


def pad_id(tokenizer) -> int:
  """The pad id: the tokenizer's pad token, else `<|endoftext|>` (Qwen's)."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  return token_id(tokenizer, END_OF_TEXT)


def stop_ids(tokenizer) -> list[int]:
  """Ids that end a response: `<|im_end|>`, `<|endoftext|>` (and the pad id)."""
  out = [token_id(tokenizer, IM_END)]
  for t in (END_OF_TEXT,):
    if t in tokenizer.get_vocab():
      out.append(token_id(tokenizer, t))
  p = pad_id(tokenizer)
  return out + ([p] if p not in out else [])


def build_messages(prompt: str, response: str | None, *, num_videos: int,
                   system: str | None = DEFAULT_SYSTEM) -> list[dict]:
  """The release's conversation: [system], user = videos then text, [assistant]."""
  msgs = []
  if system is not None and system != DEFAULT_SYSTEM:
    msgs.append({"role": "system", "content": system})
  content = [{"type": "video", "video": f"video_{i}"} for i in range(num_videos)]
  content.append({"type": "text", "text": prompt})
  msgs.append({"role": "user", "content": content})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def _render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError("the tokenizer has no chat template (Qwen2.5-VL's is expected)")
  return tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def generation_prompt(tokenizer, prompt: str, *, num_videos: int = 1,
                      system: str | None = DEFAULT_SYSTEM) -> str:
  """The text of a generation prompt as training renders it (chat template, one
  `<|vision_start|><|video_pad|><|vision_end|>` per video, ending with the assistant turn's
  start): what transformers' processor and vLLM take, each expanding the video pad."""
  return _render(tokenizer, build_messages(prompt, None, num_videos=num_videos, system=system),
                 add_generation_prompt=True)


def _expand_video_pads(ids: list[int], video_id: int, counts: Sequence[int]) -> np.ndarray:
  where = [i for i, t in enumerate(ids) if t == video_id]
  if len(where) != len(counts):
    raise ValueError(f"the rendered prompt holds {len(where)} {VIDEO_PAD} placeholders for "
                     f"{len(counts)} videos")
  out, prev = [], 0
  for i, n in zip(where, counts):
    out.extend(ids[prev:i])
    out.extend([video_id] * int(n))
    prev = i + 1
  out.extend(ids[prev:])
  return np.asarray(out, np.int32)


def encode_example(tokenizer, prompt: str, response: str | None = None, *,
                   num_video_tokens: Sequence[int], system: str | None = DEFAULT_SYSTEM,
                   for_generation: bool = False, train_end_of_turn: bool = True
                   ) -> dict[str, np.ndarray]:
  """Tokenises one conversation.

  Args:
    tokenizer: a Hugging Face tokenizer with Qwen's special tokens and chat template.
    prompt: the user text (after the video items).
    response: the assistant text (required unless `for_generation`).
    num_video_tokens: merged vision tokens of each video (`t*h*w // merge**2` of its grid),
      one entry per video, in order; 0 videos is allowed.
    system: the system text; `DEFAULT_SYSTEM` lets the template write Qwen's default turn,
      None likewise (the template always writes one).
    for_generation: the prompt only, ending with `<|im_start|>assistant\\n`.
    train_end_of_turn: the `<|im_end|>` and newline after the response are targets too (SFT,
      as the release); False = the response tokens only (the calibrator's label readout).
  Returns:
    input_ids [T] int32 and loss_mask [T] int32 (`loss_mask[t] = 1` iff `input_ids[t+1]` is
    an assistant-span target; all zero for generation).
  """
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
  counts = [int(n) for n in num_video_tokens]
  if any(n <= 0 for n in counts):
    raise ValueError(f"num_video_tokens must be positive, got {counts}")
  video_id = token_id(tokenizer, VIDEO_PAD)
  prompt_text = generation_prompt(tokenizer, prompt, num_videos=len(counts), system=system)
  if for_generation:
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    input_ids = _expand_video_pads(list(ids), video_id, counts)
    return {"input_ids": input_ids, "loss_mask": np.zeros_like(input_ids)}
  if not isinstance(response, str):
    raise ValueError("response must be a string unless for_generation=True")
  full_text = _render(tokenizer, build_messages(prompt, response, num_videos=len(counts),
                                                system=system), add_generation_prompt=False)
  if not full_text.startswith(prompt_text):
    raise ValueError("the chat template renders the assistant turn so that the prompt is not "
                     "a prefix of the conversation; cannot locate the assistant span")
  enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
  ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
  # Assistant-span tokens are those that start at or after the end of the prompt text.
  # (The prompt ends with "assistant\n", a pre-tokenizer boundary, so no token straddles it.)
  start_char = len(prompt_text)
  end_char = len(full_text)
  if not train_end_of_turn:
    if full_text[start_char:start_char + len(response)] != response:
      raise ValueError("the chat template altered the response text; cannot locate its end")
    end_char = start_char + len(response)
  is_target = np.array([s >= start_char and e <= end_char for s, e in offsets], bool)
  straddle = [i for i, (s, e) in enumerate(offsets) if s < start_char < e]
  if straddle:
    raise ValueError("a token straddles the prompt / response boundary; cannot mask exactly")
  expanded = _expand_video_pads(ids, video_id, counts)  # pads all lie in the prompt
  n_extra = len(expanded) - len(ids)
  target = np.concatenate([np.zeros(n_extra, bool), is_target])
  loss_mask = np.zeros(len(expanded), np.int32)
  loss_mask[:-1] = target[1:]
  return {"input_ids": expanded, "loss_mask": loss_mask}


def shift_targets(input_ids: np.ndarray, pad: int) -> np.ndarray:
  """targets[..., t] = input_ids[..., t + 1] (the last position gets `pad`); pairs with
  loss_mask: loss = sum(loss_mask * CE(logits, targets)) / sum(loss_mask)."""
  ids = np.asarray(input_ids)
  out = np.full_like(ids, pad)
  out[..., :-1] = ids[..., 1:]
  return out


def decode_response(tokenizer, ids) -> str:
  """Text of generated ids, keeping tags and label tokens (special tokens are not skipped).

  Decoding stops at the first end token (`<|im_end|>`, `<|endoftext|>` or pad): what follows
  it is not part of the response.
  """
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  stops = set(stop_ids(tokenizer))
  for i, t in enumerate(ids):
    if t in stops:
      ids = ids[:i]
      break
  return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
