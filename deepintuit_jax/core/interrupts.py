"""Ctrl-C during training: stop between steps with a checkpoint, or at once when pressed twice.

Inside `train_loop` the first SIGINT only sets a flag; the loop sees it between two steps
(the state is then consistent: the last step's update is complete and its data position
known), saves a checkpoint of that step, waits for it, and raises `Interrupted`, which
`main` prints as one line naming the step a rerun resumes from. A second SIGINT exits the
process at once (exit code 130); an unfinished save is never listed, so the rerun resumes
from the previous complete checkpoint.

Only a single process defers SIGINT: with several, each would stop at a different step and
the collective save would hang, so there Ctrl-C keeps its default behaviour.

`kill_point` is a test hook: the SIGKILL tests set `DEEPINTUIT_TEST_KILL_AFTER` to make a run
kill itself at a chosen point (after a batch of rows is written, a step is done, a checkpoint
save started); unset, as in every real run, it does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any


class Interrupted(Exception):
  """Training stopped by Ctrl-C. `step`: the checkpoint a rerun resumes from (None: none)."""

  def __init__(self, step: int | None, saved: bool):
    self.step, self.saved = step, saved
    if step is None:
      msg = "interrupted before the first checkpoint; a rerun starts from the beginning"
    elif saved:
      msg = f"interrupted at step {step} (checkpoint saved); a rerun resumes from step {step}"
    else:
      msg = f"interrupted; a rerun resumes from step {step} (the latest complete checkpoint)"
    super().__init__(msg)


class StopRequest:
  """Installs the deferred SIGINT handler (`install`), which `requested` reports."""

  def __init__(self):
    self.requested = False
    self._previous: Any = None
    self._installed = False

  def install(self, *, processes: int = 1) -> "StopRequest":
    if processes == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._on_sigint)
      self._installed = True
    return self

  def uninstall(self) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, self._previous)
      self._installed = False

  def _on_sigint(self, signum, frame) -> None:
    if self.requested:
      sys.stderr.write("\nsecond Ctrl-C: exiting now; a rerun resumes from the latest "
                       "complete checkpoint\n")
      sys.stderr.flush()
      os._exit(130)
    self.requested = True
    sys.stderr.write("\nCtrl-C: stopping after the current step and saving a checkpoint "
                     "(Ctrl-C again to exit at once)\n")
    sys.stderr.flush()

  def stop(self, state: Any, data_state: Any, checkpointer=None) -> None:
    """Called between steps once `requested`: checkpoints `state` (the last completed step,
    with the data position after it) when a checkpointer is given, waits, and raises
    `Interrupted`."""
    step = int(state.step)
    if checkpointer is None:
      raise Interrupted(None, False)
    if step > 0:
      checkpointer.save(state, data_state, force=True)  # a no-op when it exists already
    checkpointer.wait()
    latest = checkpointer.latest_step()
    raise Interrupted(latest, latest == step and step > 0)


# Test hook (tests/integration/test_chain.py): "<n>:<text>" = SIGKILL this process at the n-th
# `kill_point` whose label contains <text>.
KILL_AFTER = "DEEPINTUIT_TEST_KILL_AFTER"
_kill_hits = 0


def kill_point(label: str) -> None:
  """Test hook: SIGKILLs the process here when `KILL_AFTER` asks for it (see above), so a
  kill test stops a run at a known point rather than at a polled moment; otherwise nothing."""
  spec = os.environ.get(KILL_AFTER)
  if not spec:
    return
  count, _, text = spec.partition(":")
  if text not in label:
    return
  global _kill_hits
  _kill_hits += 1
  if _kill_hits == int(count):
    print(f"[test hook {KILL_AFTER}] SIGKILL after: {label}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
