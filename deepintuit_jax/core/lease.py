"""One run per workdir: a lease file, `<workdir>/lease.json`, held while a run lives.

The holder writes who it is (host, pid, start time, a random token) and a heartbeat
timestamp, which a daemon thread renews every `interval` seconds. A second run finds the
lease and refuses with one line naming the holder (`WorkdirBusy`, exit code 2) before it
touches any file. A lease is *stale*, and taken over with a note, when its heartbeat is
older than `timeout` (a lost machine, a SIGKILL on another host) or, on the same host, when
its pid is not running (or is this process's pid, which holds no such lease: a container
restarted with the same pid).

Why a lease and not `fcntl.flock`: the workdir may be a `gs://` bucket, which has no locks;
a heartbeat that expires works on both. Creation is atomic on a local disk (the holder is
written to a temporary file that `os.link` puts in place, failing if a lease exists, so a
reader never sees a half-written one; `O_CREAT | O_EXCL` where hard links are missing). On a bucket it is best effort: the object is written,
then read back after `settle` seconds, and the run keeps it only if it still holds its own
token (two runs starting within the same second may both see their own write; the later
upload wins, and the other finds out at its next heartbeat and prints a warning). Clocks
of different hosts are compared through the heartbeat, so they must agree to well within
`timeout`.

Multi-process runs hold the lease once, from process 0 (`enabled=False` elsewhere). The
chain (configs/deepintuit.py) holds its root's lease and each step's workdir's in turn:
different files, so no step waits for its own chain.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from deepintuit_jax.core import paths
from deepintuit_jax.core.errors import WorkdirBusy

LEASE = "lease.json"
INTERVAL_S, TIMEOUT_S, SETTLE_S = 30.0, 300.0, 2.0
_HELD: set[str] = set()  # tokens of the leases this process holds now


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _read(path: str) -> dict | None:
  """The holder in `path`; None when there is none; {} when it is unreadable."""
  try:
    holder = json.loads(paths.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _ago(seconds: float) -> str:
  if seconds == float("inf"):
    return "unknown"
  return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def describe(holder: dict) -> str:
  """"host h, pid 12, since 2025-01-31 12:00:00, heartbeat 3 s ago"."""
  try:
    beat = time.time() - float(holder.get("heartbeat", 0))
  except (TypeError, ValueError):
    beat = float("inf")
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
          f"{holder.get('started', '?')}, heartbeat {_ago(beat)}")


class Lease:
  """Holds `<workdir>/lease.json` between `acquire()` and `release()` (or as a context
  manager). `enabled=False` (processes other than 0) does nothing."""

  def __init__(self, workdir: str, *, enabled: bool = True, interval: float = INTERVAL_S,
               timeout: float = TIMEOUT_S, settle: float = SETTLE_S):
    self.workdir = os.fspath(paths.as_path(workdir))
    self.path = paths.join(self.workdir, LEASE)
    self.enabled, self.interval, self.timeout, self.settle = enabled, interval, timeout, settle
    self.token = uuid.uuid4().hex
    self.created_workdir = False
    self.note = ""            # what a takeover replaced, for the run's printout
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._started = time.strftime("%Y-%m-%d %H:%M:%S")

  def _holder(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
            "heartbeat": time.time(), "token": self.token}

  def stale_reason(self, holder: dict) -> str | None:
    """Why `holder` is no longer alive, or None when it may be."""
    try:
      age = time.time() - float(holder["heartbeat"])
      pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
      return "the lease file is unreadable"
    if age > self.timeout:
      return f"no heartbeat for {age:.0f} s (> {self.timeout:.0f} s)"
    if holder.get("host") == socket.gethostname():
      if pid == os.getpid() and holder.get("token") not in _HELD:
        return f"pid {pid} is this process, which does not hold it (a restarted container)"
      if not _pid_running(pid):
        return f"pid {pid} is not running on this host"
    return None

  # Creation: atomic locally (link), best effort on a bucket (write, settle, read back).
  def _create_local(self) -> bool:
    tmp, text = f"{self.path}.{self.token}", json.dumps(self._holder())
    with open(tmp, "w") as f:
      f.write(text)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError:  # no hard links here (some FUSE mounts): O_EXCL, then the content
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    finally:
      os.remove(tmp)

  def _create_remote(self) -> bool:
    if paths.as_path(self.path).exists():
      return False
    paths.write_text(self.path, json.dumps(self._holder()))
    time.sleep(self.settle)
    return (_read(self.path) or {}).get("token") == self.token

  def _take_over(self, holder: dict) -> None:
    """Removes the stale lease `holder` (locally by renaming it aside first, so that of two
    runs taking over at once only one removes it)."""
    if paths.is_remote(self.path):
      paths.remove(self.path)
      return
    aside = f"{self.path}.stale-{self.token}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if (_read(aside) or {}).get("token") != holder.get("token"):  # a fresh lease: put back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    os.remove(aside)

  def acquire(self) -> "Lease":
    """Takes the lease, creating the workdir when missing.

    Raises:
      WorkdirBusy: a live run holds the workdir (the message names it).
    """
    if not self.enabled:
      return self
    root = paths.as_path(self.workdir)
    if not root.exists():
      root.parent.mkdir(parents=True, exist_ok=True)
      try:
        root.mkdir()
        self.created_workdir = True
      except FileExistsError:
        pass
    create = self._create_remote if paths.is_remote(self.path) else self._create_local
    for _ in range(3):
      if create():
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease")
        self._thread.start()
        return self
      holder = _read(self.path)
      if holder is None:  # released meanwhile
        continue
      why = self.stale_reason(holder)
      if why is None:
        raise WorkdirBusy(
            f"workdir {self.workdir} is in use by another run ({describe(holder)}); wait for "
            f"it to end or stop it, or use another --workdir (a lease not renewed for "
            f"{self.timeout:.0f} s is taken over: {self.path})")
      self.note = (f"note: took over the lease of a run that is gone ({describe(holder)}: "
                   f"{why})" if holder else f"note: replaced an unreadable {self.path}")
      self._take_over(holder)
    raise WorkdirBusy(f"workdir {self.workdir}: could not take {self.path} (other runs are "
                      "starting there at the same time)")

  def _beat(self) -> None:
    while not self._stop.wait(self.interval):
      holder = _read(self.path)
      if (holder or {}).get("token") != self.token:
        print(f"warning: {self.path} is no longer this run's (now: "
              f"{describe(holder) if holder else 'none'}); two runs may share {self.workdir}",
              flush=True)
        return
      try:
        paths.write_text(self.path, json.dumps({**holder, "heartbeat": time.time()}))
      except OSError as e:  # a full disk or a lost bucket: retried at the next beat
        print(f"warning: could not renew {self.path} ({e})", flush=True)

  def release(self) -> None:
    """Removes the lease if it is still this run's; removes the workdir too when this lease
    created it and nothing else is left in it."""
    if not self.enabled or self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    self._thread = None
    _HELD.discard(self.token)
    if (_read(self.path) or {}).get("token") == self.token:
      paths.remove(self.path)
    root = paths.as_path(self.workdir)
    if self.created_workdir and root.is_dir() and not any(root.iterdir()):
      paths.remove(root)

  def __enter__(self) -> "Lease":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False

