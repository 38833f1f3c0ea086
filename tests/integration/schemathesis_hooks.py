"""Schemathesis hooks for the API property tests (``SCHEMATHESIS_HOOKS``); no tests here.

``guarded_operations_answer_401``: for the pass without a token, every operation the
schema marks with a security requirement must answer 401, whatever was generated for
its parameters and body (the token is checked before the body is read).
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def guarded_operations_answer_401(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if case.method.upper() != case.operation.method.upper():
        return None  # a method the path does not serve (coverage phase): 405 is right
    definition: Any = case.operation.definition
    raw = definition.raw if hasattr(definition, "raw") else definition
    if raw.get("security") and response.status_code != 401:
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code} without a token, not 401"
        )
    return None
