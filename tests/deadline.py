"""A test that would hang fails instead: `with deadline(60, "what"): ...` (SIGALRM, main
thread only)."""
from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int, what: str = "the test"):
  def boom(*_):
    raise TimeoutError(f"{what} took over {seconds} s (a hang?)")
  old = signal.signal(signal.SIGALRM, boom)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
