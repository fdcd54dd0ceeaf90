"""Errors the user can act on (a wrong config value, a missing or empty input file, a data
worker that ran out of memory).

Library code raises a `UserError` subclass for a mistake in the configuration or the inputs
(never for a bug); `main` prints such an error as one line, `error: <message>`, without a
traceback (`--traceback` shows it). Each message names the key, file or item and the reason.
The subclasses also derive from the built-in type a caller would expect (`ValueError`,
`FileNotFoundError`), so `except ValueError` around library calls keeps working.
Bad data records have their own type, `data.errors.BadSample`, which `main` treats the same.
"""
from __future__ import annotations


MAX_MESSAGE = 1000  # characters of a data error's line (a 100 kB label echoed buries the rest)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
  """`text`, cut in the middle to about `limit` characters when longer: the start (what and
  where) and the end (why) stay."""
  if len(text) <= limit:
    return text
  keep = limit // 2
  return f"{text[:keep]} ...({len(text) - 2 * keep} characters)... {text[-keep:]}"


class UserError(Exception):
  """A mistake in the configuration or inputs; `str(e)` says what and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value that cannot be used (names the key, the value and the reason)."""


class InputNotFound(UserError, FileNotFoundError):
  """A configured path that does not exist or lacks a required file (names the key and path)."""


class InputError(UserError, ValueError):
  """An input file that exists but cannot be used (empty, wrong format; names the file).
  `str(e)` is at most about `MAX_MESSAGE` characters: a value from the file that it echoes
  may be huge."""

  def __str__(self) -> str:
    return shorten(super().__str__())


class WorkdirConflict(UserError):
  """The workdir holds a run made under a different config (see `deepintuit_jax.core.workdir`)."""


class WorkdirBusy(UserError):
  """Another live run holds the workdir (see `deepintuit_jax.core.lease`)."""


class CheckpointError(UserError, OSError):
  """No checkpoint of the workdir can be restored, or a checkpoint save failed (a full disk,
  a failing write); the message names the directory, the step and the error."""


class DataWorkerError(UserError, RuntimeError):
  """A data worker process died (killed, e.g. by the out-of-memory killer) or ran out of
  memory; the message names the worker and the item, and what to lower."""
