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


MAX_JSON_DEPTH = 128  # arrays and objects within each other in a request body (orjson writes 254 at most)


def load_json_body(body: bytes) -> Any:
    """A request body as JSON; a 400 for what is not JSON, or nests deeper than MAX_JSON_DEPTH
    (which the gateway could parse but never write on to the upstream or the store)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
    level: list[Any] = [value]
    for _depth in range(MAX_JSON_DEPTH):
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
                 if isinstance(child, (dict, list))]
        if not level:
            return value
    raise bad_request(f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} deep.",
                      code="invalid_json")


def producer_lost() -> GatewayError:
    """The end of a stream whose producing instance died (written outside the log, with no id,
    so that a resume with Last-Event-ID stays exact)."""
    return GatewayError(502, "The gateway instance producing this answer stopped before it was complete.",
                        type="server_error", code="producer_lost")


def server_error() -> GatewayError:
    """What a client sees for a bug of ours: no details, no traceback."""
    return GatewayError(500, "The gateway failed to handle the request.", type="server_error", code="internal_error")
