"""An `ExampleBuilder` that fails on one item, as a data worker does when it is killed (the
out-of-memory killer) or runs out of memory. Its own module, light to import, because Grain's
spawned worker processes import it to unpickle the builder."""
from __future__ import annotations

import os
import signal

from deepintuit_jax.data.examples import ExampleBuilder


class FaultyBuilder(ExampleBuilder):
  """fault: "kill" (the process SIGKILLs itself: only in a worker!) or "oom" (MemoryError)
  when building the record `victim`."""

  @classmethod
  def of(cls, builder: ExampleBuilder, *, victim: str, fault: str) -> "FaultyBuilder":
    out = cls.__new__(cls)
    out.__dict__.update(builder.__dict__, victim=victim, fault=fault)
    return out

  def build(self, rec):
    if rec.item_id == self.victim:
      if self.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
      raise MemoryError("test: cannot allocate")
    return super().build(rec)
