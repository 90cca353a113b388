"""Components picked by name: one `Registry` per kind (informativeness metrics, selection methods,
scorers, evolvers, prompt sources). Config validation reads `names()`, never a copied list.
"""
from __future__ import annotations

from typing import Any, Callable, Optional


class Registry:
  """Name -> component, in registration order."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str, value: Optional[Any] = None) -> Callable:
    """`register(name, value)`, or `@register(name)` as a decorator; returns the value."""
    def add(value):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = value
      return value
    return add if value is None else add(value)

  def get(self, name: str) -> Any:
    if name not in self._entries:
      raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries
