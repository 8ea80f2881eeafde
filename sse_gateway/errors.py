"""Errors that reach clients, in OpenAI's JSON error shape (DESIGN.md §4.4).

Every failure a client can see is a `GatewayError`: handlers turn it into a status with a JSON
body before the stream starts, and the stream producer turns it into an error frame after.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """A failure with the HTTP status and OpenAI-style body a client should get."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` object, as OpenAI's API and SDKs expect it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def server_error() -> GatewayError:
    """What a client sees for a bug of ours: no details, no traceback."""
    return GatewayError(500, "The gateway failed to handle the request.", type="server_error", code="internal_error")
