"""The operator command line's errors, split by whose fault it is and what the exit code is.

Rules:
- :class:`UsageError` (exit 2): the operator's input cannot be used as given (a
  missing file, a document that breaks the schema, two documents with one name,
  stdin not a terminal without ``--yes``). Nothing was sent to the hub.
- :class:`ApiError` (exit 1): the hub refused (an RFC 9457 problem: its title,
  detail and field errors are kept, typed, for the message).
- :class:`HubUnreachable` (exit 1): no answer from the hub (connection refused,
  timeout, TLS) or an answer that is not the API's (not JSON, wrong shape).
- Every message names what to fix; none carries the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class CtlError(Exception):
    """Root of the command line's errors."""


class UsageError(CtlError):
    """The operator's input cannot be used as given; nothing was sent."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One place where a document cannot be read or breaks the schema."""

    source: str
    """The file (``-`` for stdin)."""
    index: int | None
    """The document's number in its file, from 1 (None: the file as a whole)."""
    json_path: str
    """Where, as ``$.spec.workloads[0].bundle``."""
    message: str
    line: int | None = None
    """1-based line in the file, when the file is YAML and the place is found in it."""

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.index is not None:
            where += f": document {self.index}"
        return f"{where}: {self.json_path}: {self.message}"


class DocumentError(UsageError):
    """Documents that cannot be read or break the published schema: every violation found."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("\n".join(str(violation) for violation in self.violations))


class ApiError(CtlError):
    """The hub refused a request (its problem details, kept as given)."""

    def __init__(
        self,
        *,
        method: str,
        path: str,
        status: int,
        title: str,
        detail: str,
        errors: Sequence[str] = (),
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = tuple(errors)
        text = f"{method} {path}: {status} {title}: {detail}"
        if self.errors:
            text += "".join(f"\n  {error}" for error in self.errors)
        super().__init__(text)


class HubUnreachable(CtlError):
    """No usable answer from the hub: connection, timeout, TLS, or not the API's shape."""
