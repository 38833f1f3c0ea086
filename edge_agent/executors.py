"""One executor table from the core's action types to what carries each out (sans-I/O).

Both drivers (the paho driver on devices, the simulator's virtual devices)
build one :class:`ExecutorTable`: every action type the core can return is
registered once, with a function typed for exactly that type, so the table
needs no casts. An executor may answer at once with the event that follows
(a step done in place, a publish the connection refused); the driver feeds it
back to the core after the batch.

Rules:
- :meth:`ExecutorTable.register` refuses a type registered twice;
  :meth:`ExecutorTable.require_complete` names every action type without an
  executor, and a driver calls it when it starts (a new action type cannot be
  forgotten by one driver).
- Pure: the table holds functions; it runs nothing by itself.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from edge_agent.core import Action

A = TypeVar("A")
R = TypeVar("R")


@functools.cache
def action_types() -> tuple[type, ...]:
    """Pure: every type in the core's ``Action`` union (steps included); computed once."""
    found: list[type] = []
    pending: list[Any] = [Action]
    while pending:
        item = pending.pop()
        if isinstance(item, type) and not isinstance(item, types.UnionType):
            found.append(item)
        else:
            pending.extend(typing.get_args(item))
    return tuple(sorted(set(found), key=lambda t: t.__name__))


class ExecutorTable(Generic[R]):
    """Maps each action type to its executor; ``R`` is what an executor returns."""

    def __init__(self) -> None:
        self._table: dict[type, Callable[[Any], R]] = {}

    def register(self, kind: type[A], run: Callable[[A], R]) -> None:
        """Carry out actions of exactly ``kind`` with ``run``; raises ValueError if taken."""
        if kind in self._table:
            raise ValueError(f"{kind.__name__} already has an executor")
        self._table[kind] = run

    def run(self, action: Action) -> R:
        """The executor's result for ``action``; raises KeyError for an unknown type."""
        return self._table[type(action)](action)

    def missing(self) -> list[str]:
        """Names of the action types that have no executor (empty when complete)."""
        return [t.__name__ for t in action_types() if t not in self._table]

    def require_complete(self) -> None:
        """Raise TypeError naming every action type without an executor (a driver's bug)."""
        missing = self.missing()
        if missing:
            raise TypeError(f"no executor for {', '.join(missing)}")
