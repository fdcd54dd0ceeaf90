"""Annotation readers for the DeepIntuit release's data files and class files.

Record files are a JSON list (or JSONL, one record per line) in the release's schema:

  {"item_id": "x", "conversations": [
      {"role": "user", "content": [{"type": "video", "video": PATH},
                                   {"type": "text", "text": PROMPT}]},
      {"role": "assistant", "content": TEXT or [{"type": "text", "text": TEXT}, ...]}],
   "policy_title": LABEL, "anno_label": INDEX, "reward_label": LABEL, ...flat fields...}

Every problem with one record is a `BadSample` naming the item, the file and the reason;
with `on_bad_sample="skip"` it is counted in a `SkipLedger` and the record is dropped.
Problems with the whole file (unreadable, not JSON, not a list) are plain errors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from deepintuit_jax.core import paths
from deepintuit_jax.core.errors import InputError, InputNotFound
from deepintuit_jax.data import errors
from deepintuit_jax.data.errors import BadSample, SkipLedger

AMBIGUOUS_FILE = "ambiguous_file"
# Fields consumed into the Record's own attributes; everything else goes to `extra`.
_CORE_FIELDS = ("item_id", "conversations")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclasses.dataclass(frozen=True)
class Record:
  """One annotated video.

  Attributes:
    item_id: the record's id (unique within a file).
    video: the video path as written in the file (see `resolve_video_path`).
    prompt: the user text.
    response: the assistant text ('' for generation inputs).
    label: `reward_label`, else `policy_title`; None when the record has neither.
    label_index: `anno_label`, or None.
    extra: every other top-level field (policy_title, reward_label, title, asr_text,
      sticker, image, ...), as read.
    source: where the record came from, "path:#12" (list index) or "path:line 13" (JSONL).
  """
  item_id: str
  video: str
  prompt: str
  response: str
  label: str | None
  label_index: int | None
  extra: Mapping[str, Any]
  source: str


def _read_text(path: str, what: str) -> str:
  """The file's text; a missing file or one that is not UTF-8 is a one-line error."""
  try:
    text = paths.as_path(path).read_bytes().decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as open()'s universal newlines
  except FileNotFoundError:
    raise InputNotFound(f"{what} {path!r} does not exist") from None
  except UnicodeDecodeError as e:
    raise InputError(f"{what} {path!r} is not UTF-8 text: {e}") from None


_TOO_DEEP = "nests JSON too deeply to read (thousands of levels)"


def _unicode_problem(value: Any) -> str | None:
  """Why `value` (decoded JSON) cannot be written out as UTF-8 again, or None: a `\\udXXX`
  escape that is not half of a pair decodes to a lone surrogate, which tokenizers, trace
  files and the terminal refuse."""
  try:
    json.dumps(value, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    return f"holds text that is not valid Unicode (a lone surrogate, {e.reason})"
  return None


def _mark_lone_surrogates(values: list[tuple[str, Any]], text: str,
                          path: str) -> list[tuple[str, Any]]:
  """`values` with each record holding a lone surrogate replaced by its `BadSample`. Only
  text with a surrogate escape can hold one (UTF-8 never decodes to one): others pass as is."""
  if not re.search(r"\\u[dD][89a-fA-F]", text):
    return values
  out = []
  for src, value in values:
    problem = None if isinstance(value, BadSample) else _unicode_problem(value)
    if problem:
      item = value.get("item_id") if isinstance(value, dict) else None
      value = BadSample(f"{problem} (at {src})", kind=errors.BAD_RECORD, path=path,
                        item_id=item if isinstance(item, str) and item.isprintable() else None)
    out.append((src, value))
  return out


def _read_json_values(path: str) -> list[tuple[str, Any]]:
  """[(source, value)] for a JSON list file or a JSONL file.

  A JSONL line that is not JSON is returned as a `BadSample` value so that it can be
  skipped like any other bad record; a JSON list file that does not parse is a file error.
  """
  text = _read_text(path, "annotation file")
  is_jsonl = path.lower().endswith(_JSONL_SUFFIXES)
  if not text.strip():
    return []
  if not is_jsonl:
    try:
      data = json.loads(text)
    except RecursionError:
      raise InputError(f"annotation file {path!r} {_TOO_DEEP}") from None
    except json.JSONDecodeError as e:
      if e.msg != "Extra data":  # several top-level values: treat the file as JSONL
        raise InputError(f"annotation file {path!r} is not valid JSON: {e.msg} at line "
                         f"{e.lineno}, column {e.colno} (char {e.pos})") from None
      is_jsonl = True
    else:
      if isinstance(data, dict) and "conversations" in data:
        data = [data]  # a file holding a single record
      if not isinstance(data, list):
        raise InputError(f"annotation file {path!r}: expected a JSON list of records, got "
                         f"{type(data).__name__}")
      return _mark_lone_surrogates([(f"{path}:#{i}", v) for i, v in enumerate(data)], text,
                                   path)
  out = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    src = f"{path}:line {lineno}"
    try:
      out.append((src, json.loads(line)))
    except json.JSONDecodeError as e:
      out.append((src, BadSample(f"line {lineno} is not valid JSON: {e.msg} at column "
                                 f"{e.colno}", kind=errors.BAD_RECORD, path=path)))
    except RecursionError:
      out.append((src, BadSample(f"line {lineno} {_TOO_DEEP}", kind=errors.BAD_RECORD,
                                 path=path)))
  return _mark_lone_surrogates(out, text, path)


def _text_of(content: Any, what: str) -> str:
  """Text of a turn's content: a string, or the concatenated text items of a list."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    texts = []
    for item in content:
      if not isinstance(item, dict) or item.get("type") != "text":
        continue
      if not isinstance(item.get("text"), str):
        raise ValueError(f"{what}: a text item's 'text' must be a string")
      texts.append(item["text"])
    return "\n".join(texts)
  raise ValueError(f"{what}: content must be a string or a list of items, "
                   f"got {type(content).__name__}")


def _parse_user(content: Any) -> tuple[str, str]:
  if not isinstance(content, list):
    raise ValueError("user turn: content must be a list holding a video item and a text item")
  videos, texts = [], []
  for item in content:
    if not isinstance(item, dict):
      raise ValueError(f"user turn: content item {item!r} is not an object")
    if item.get("type") == "video":
      v = item.get("video")
      if not isinstance(v, str) or not v:
        raise ValueError("user turn: the video item has no 'video' path string")
      videos.append(v)
    elif item.get("type") == "text":
      if not isinstance(item.get("text"), str):
        raise ValueError("user turn: a text item's 'text' must be a string")
      texts.append(item["text"])
  if not videos:
    raise ValueError("user turn has no video item")
  if len(videos) > 1:
    raise ValueError(f"user turn has {len(videos)} video items; one is supported")
  if not texts:
    raise ValueError("user turn has no text item")
  return videos[0], "\n".join(texts)


def _optional_str(rec: dict, key: str) -> str | None:
  v = rec.get(key)
  if v is None or v == "":
    return None
  if not isinstance(v, str):
    raise ValueError(f"{key!r} must be a string, got {type(v).__name__} {v!r}")
  return v


def _parse_record(rec: Any, source: str) -> Record:
  """One record -> Record; raises ValueError (reason) for anything malformed."""
  if not isinstance(rec, dict):
    raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
  item_id = rec.get("item_id")
  if item_id is None:
    raise ValueError("missing 'item_id'")
  if isinstance(item_id, int) and not isinstance(item_id, bool):
    item_id = str(item_id)
  if not isinstance(item_id, str) or not item_id:
    raise ValueError(f"'item_id' must be a non-empty string, got {item_id!r}")
  conv = rec.get("conversations")
  if conv is None:
    raise ValueError("missing 'conversations'")
  if not isinstance(conv, list) or not conv:
    raise ValueError("'conversations' must be a non-empty list of turns")
  video = prompt = None
  response = ""
  for turn in conv:
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
      raise ValueError(f"a turn must be an object with a 'role', got {turn!r:.80}")
    role = turn["role"]
    if role == "user":
      if video is not None:
        raise ValueError("more than one user turn; one is supported")
      video, prompt = _parse_user(turn.get("content"))
    elif role == "assistant":
      response = _text_of(turn.get("content", ""), "assistant turn")
    elif role != "system":
      raise ValueError(f"unknown role {role!r} (expected user / assistant / system)")
  if video is None:
    raise ValueError("no user turn")
  policy, reward = _optional_str(rec, "policy_title"), _optional_str(rec, "reward_label")
  if policy is not None and reward is not None and policy != reward:
    raise ValueError(f"policy_title {policy!r} and reward_label {reward!r} disagree")
  index = rec.get("anno_label")
  if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
    raise ValueError(f"'anno_label' must be a non-negative integer, got {index!r}")
  extra = {k: v for k, v in rec.items() if k not in _CORE_FIELDS and k != "anno_label"}
  return Record(item_id=item_id, video=video, prompt=prompt, response=response,
                label=reward if reward is not None else policy, label_index=index,
                extra=extra, source=source)


def load_records(path: str | os.PathLike, *, on_bad_sample: str = "error",
                 ledger: SkipLedger | None = None,
                 labels: Sequence[str] | None = None) -> list[Record]:
  """Reads a release-format JSON list (or JSONL) file into Records, in file order.

  Args:
    path: the annotation file (`.jsonl`/`.ndjson`, or several top-level values: JSONL).
    on_bad_sample: "error" raises `BadSample` on the first bad record; "skip" drops it and
      counts it in `ledger` by kind (`bad_record`, `unknown_label`).
    ledger: where skipped records are counted (a fresh one is used when None).
    labels: when given, each record's label must be one of these (`unknown_label`).
  Raises:
    BadSample: a bad record in "error" mode.
    InputError / InputNotFound (ValueError / FileNotFoundError): the file is missing, cannot
      be read as JSON or JSONL, holds no records, or none of them is usable.
  """
  errors.check_on_bad_sample(on_bad_sample)
  path = os.fspath(path)
  ledger = ledger if ledger is not None else SkipLedger()
  allowed = None if labels is None else set(labels)
  out: list[Record] = []
  first_seen: dict[str, str] = {}
  values = _read_json_values(path)
  if not values:
    raise InputError(f"annotation file {path!r} holds no records (it is empty)")
  for source, value in values:
    try:
      if isinstance(value, BadSample):
        raise value
      hint = value.get("item_id") if isinstance(value, dict) else None
      hint = hint if isinstance(hint, str) else None
      try:
        rec = _parse_record(value, source)
      except ValueError as e:
        raise BadSample(f"{e} (at {source})", kind=errors.BAD_RECORD, item_id=hint,
                        path=path) from None
      if rec.item_id in first_seen:
        raise BadSample(f"duplicate item_id (at {source}; first at {first_seen[rec.item_id]})",
                        kind=errors.BAD_RECORD, item_id=rec.item_id, path=path)
      if allowed is not None and rec.label is not None and rec.label not in allowed:
        raise BadSample(f"label {rec.label!r} is not in the class list {sorted(allowed)} "
                        f"(at {source})", kind=errors.UNKNOWN_LABEL, item_id=rec.item_id,
                        path=path)
    except BadSample as e:
      if on_bad_sample == "error":
        raise
      ledger.add(e)
      continue
    first_seen[rec.item_id] = source
    out.append(rec)
  if not out:
    raise InputError(f"annotation file {path!r}: none of its {len(values)} record(s) is "
                     "usable (all skipped as bad samples)")
  return out


def labels_from_records(records: Sequence[Record]) -> list[str]:
  """The label set of `records`: ordered by `label_index` where given, then by first use.

  Raises ValueError when one label carries two indices or one index two labels.
  """
  index_of: dict[str, int] = {}
  label_at: dict[int, str] = {}
  order: list[str] = []
  for r in records:
    if r.label is None:
      continue
    if r.label not in order:
      order.append(r.label)
    if r.label_index is None:
      continue
    if index_of.setdefault(r.label, r.label_index) != r.label_index:
      raise InputError(f"label {r.label!r} has anno_label {index_of[r.label]} and "
                       f"{r.label_index} ({r.source})")
    if label_at.setdefault(r.label_index, r.label) != r.label:
      raise InputError(f"anno_label {r.label_index} names both {label_at[r.label_index]!r} "
                       f"and {r.label!r} ({r.source})")
  indexed = sorted(index_of, key=index_of.__getitem__)
  return indexed + [l for l in order if l not in index_of]


def _definition_of(label: str, value: Any, path: str) -> str:
  """A class file entry's definition: a string, or the release's list of policy dicts."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value.strip()
  entries = [value] if isinstance(value, dict) else value
  if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
    parts = []
    for e in entries:
      text = e.get("prompt") or e.get("definition") or e.get("playbook_rule") or ""
      if isinstance(text, list):
        text = " ".join(str(t) for t in text)
      if not isinstance(text, str):
        raise InputError(f"class file {path!r}: label {label!r} has a non-text definition")
      if text.strip() and text.strip() not in parts:
        parts.append(text.strip())
    return " ".join(parts)
  raise InputError(f"class file {path!r}: label {label!r} maps to a {type(value).__name__}; "
                   "expected a definition string or a list of policy objects")


def load_class_file(path: str | os.PathLike) -> dict[str, str]:
  """Reads a class file into {label: definition} in file order.

  Formats: the release's JSON (label -> list of {"prompt", "playbook_rule", "Policy Code",
  ...}); a JSON object label -> definition string; a JSON list of labels (or of
  {"label", "definition"} objects); a text file with one `label` or `label: definition`
  per line (blank lines and lines starting with '#' are ignored).
  """
  path = os.fspath(path)
  text = _read_text(path, "class file")
  out: dict[str, str] = {}

  def add(label: Any, definition: str, where: str) -> None:
    if not isinstance(label, str) or not label.strip():
      raise InputError(f"class file {path!r}: {where}: label must be a non-empty string, "
                       f"got {label!r}")
    label = label.strip()
    if label in out:
      raise InputError(f"class file {path!r}: {where}: duplicate label {label!r}")
    out[label] = definition

  stripped = text.lstrip()
  if path.lower().endswith(".json") or stripped[:1] in ("[", "{"):
    try:
      data = json.loads(text)
    except RecursionError:
      raise InputError(f"class file {path!r} {_TOO_DEEP}") from None
    except json.JSONDecodeError as e:
      raise InputError(f"class file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                       f"column {e.colno}") from None
    if problem := _unicode_problem(data):
      raise InputError(f"class file {path!r} {problem}")
    if isinstance(data, dict):
      for label, value in data.items():
        add(label, _definition_of(label, value, path), f"key {label!r}")
    elif isinstance(data, list):
      for i, item in enumerate(data):
        if isinstance(item, dict):
          add(item.get("label"), _definition_of(str(item.get("label")), item.get("definition"),
                                                path), f"entry #{i}")
        else:
          add(item, "", f"entry #{i}")
    else:
      raise InputError(f"class file {path!r}: expected a JSON object or list, "
                       f"got {type(data).__name__}")
  else:
    for lineno, line in enumerate(text.splitlines(), 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      label, _, definition = line.partition(":")
      add(label, definition.strip(), f"line {lineno}")
  if not out:
    raise InputError(f"class file {path!r} defines no labels")
  return out


# ---------------------------------------------------------------------------------------
# Video paths.

_INDEX_LOCK = threading.Lock()
_NAME_INDEX: dict[str, dict[str, list[str]]] = {}


def _name_index(video_root: str) -> dict[str, list[str]]:
  """{base name: [paths]} of every file and folder under `video_root` (built once)."""
  key = os.path.realpath(video_root)
  with _INDEX_LOCK:
    index = _NAME_INDEX.get(key)
    if index is None:
      index = {}
      for dirpath, dirnames, filenames in os.walk(video_root, followlinks=True):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
          index.setdefault(name, []).append(os.path.join(dirpath, name))
      _NAME_INDEX[key] = index
    return index


def clear_path_index() -> None:
  """Forgets the cached name indices (after files were added under a video root)."""
  with _INDEX_LOCK:
    _NAME_INDEX.clear()


def _common_tail(a: str, b: str) -> int:
  """How many trailing path components `a` and `b` share."""
  pa, pb = a.replace("\\", "/").split("/"), b.replace("\\", "/").split("/")
  n = 0
  while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
    n += 1
  return n


def resolve_video_path(path: str, video_root: str | os.PathLike | None, *,
                       item_id: str | None = None) -> str:
  """The local path of a record's video.

  Relative paths resolve against `video_root` (or the working directory when None).
  Absolute paths that exist are used as they are. Absolute paths that do not exist (the
  release's files carry another cluster's paths) are looked up by file name under
  `video_root`, searched once and cached; when several files share the name, the one
  sharing the most trailing folders with `path` wins, and a tie is an error.

  Raises:
    BadSample(kind="missing_file"): nothing found; (kind="ambiguous_file"): a tie.
  """
  root = None if video_root is None else os.path.expanduser(os.fspath(video_root))
  if not os.path.isabs(path):
    full = path if root is None else os.path.join(root, path)
    if os.path.exists(full):
      return full
    raise BadSample(f"video not found: relative path resolved to {full!r}",
                    kind=errors.MISSING_FILE, item_id=item_id, path=path)
  if os.path.exists(path):
    return path
  if root is None:
    raise BadSample("video not found (absolute path does not exist here; pass a video root "
                    "to look it up by file name)", kind=errors.MISSING_FILE,
                    item_id=item_id, path=path)
  if not os.path.isdir(root):
    raise BadSample(f"video root {root!r} is not a folder", kind=errors.MISSING_FILE,
                    item_id=item_id, path=path)
  candidates = _name_index(root).get(os.path.basename(path.rstrip("/\\")), [])
  if not candidates:
    raise BadSample(f"video not found: no file named {os.path.basename(path)!r} under video "
                    f"root {root!r}", kind=errors.MISSING_FILE, item_id=item_id, path=path)
  if len(candidates) == 1:
    return candidates[0]
  tails = [_common_tail(path, c) for c in candidates]
  best = max(tails)
  winners = [c for c, t in zip(candidates, tails) if t == best]
  if len(winners) == 1:
    return winners[0]
  raise BadSample(f"ambiguous video name: {len(winners)} files under {root!r} match "
                  f"equally well: {winners}", kind=AMBIGUOUS_FILE, item_id=item_id, path=path)
