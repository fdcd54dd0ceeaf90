"""loop.Prefetcher: order, consumed (not read-ahead) data state, errors at their item."""
import threading
import time

import pytest

from deepintuit_jax.engine import loop


def _items(n, fail_at=None, log=None):
  for i in range(n):
    if i == fail_at:
      raise ValueError(f"bad sample at item {i}")
    if log is not None:
      log.append(i)
    yield (f"micro{i}",), 10 * i, {"pos": i + 1}


@pytest.mark.parametrize("size", [0, 1, 3])
def test_order_and_consumed_state(size):
  log = []
  p = loop.Prefetcher(_items(6, log=log), size=size, initial_state={"pos": 0})
  assert p.data_state == {"pos": 0}
  first = next(p)
  assert first == (("micro0",), 0, {"pos": 1})
  if size:
    deadline = time.time() + 5
    while len(log) < min(6, 1 + size + 1) and time.time() < deadline:
      time.sleep(0.01)
    assert len(log) > 1  # read ahead ...
  assert p.data_state == {"pos": 1}  # ... but the state is the consumed item's
  rest = list(p)
  assert [r[2]["pos"] for r in rest] == [2, 3, 4, 5, 6]
  assert p.data_state == {"pos": 6}
  with pytest.raises(StopIteration):
    next(p)
  p.close()


@pytest.mark.parametrize("size", [0, 2])
def test_error_surfaces_at_its_item(size):
  p = loop.Prefetcher(_items(5, fail_at=3), size=size)
  assert [next(p)[1] for _ in range(3)] == [0, 10, 20]
  with pytest.raises(ValueError, match="bad sample at item 3"):
    next(p)
  assert p.data_state == {"pos": 3}
  p.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
  def endless():
    i = 0
    while True:
      i += 1
      yield (), 0, {"pos": i}
  p = loop.Prefetcher(endless(), size=2)
  next(p)
  time.sleep(0.05)
  p.close()
  assert not p._thread.is_alive()
  assert p.data_state == {"pos": 1}
  assert not [t for t in threading.enumerate() if t.name == "batch-prefetch" and t.is_alive()]
