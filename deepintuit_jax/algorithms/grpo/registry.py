"""A small string-keyed registry, shared by the GRPO rewards, advantage estimators and losses.

Names are unique: registering a taken name raises, and asking for an unknown name raises
with the list of known ones, so a typo in a config key fails at start-up, not mid-run.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
  """name -> function. `kind` ("reward", "advantage estimator", ...) names it in errors."""

  def __init__(self, kind: str):
    self._kind = kind
    self._items: dict[str, F] = {}

  def register(self, name: str) -> Callable[[F], F]:
    """Decorator: `@REGISTRY.register("name")` adds the function under `name`."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"{self._kind} name must be a non-empty string, got {name!r}")

    def add(fn: F) -> F:
      if name in self._items:
        raise ValueError(f"{self._kind} {name!r} is already registered "
                         f"({self._items[name].__module__}.{self._items[name].__qualname__})")
      if not callable(fn):
        raise TypeError(f"{self._kind} {name!r}: {fn!r} is not callable")
      self._items[name] = fn
      return fn
    return add

  def get(self, name: str) -> F:
    try:
      return self._items[name]
    except (KeyError, TypeError):
      raise ValueError(f"unknown {self._kind} {name!r}; known: {', '.join(self.names())}"
                       ) from None

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._items))

  def __contains__(self, name: object) -> bool:
    return name in self._items
