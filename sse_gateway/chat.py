"""Validation of chat completion requests (DESIGN.md §4.1).

The gateway checks what it relies on and what a client most often gets wrong, with messages in
the style of OpenAI's own (`param` names the field), and passes every other field through to the
upstream untouched: new API fields keep working without a gateway release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, bad_request, load_json_body

__all__ = ["ChatRequest", "parse_chat_request"]

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def invalid_type(param: str, expected: str, value: Any) -> GatewayError:
    return bad_request(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def check_name(param: str, value: Any) -> None:
    """A required name (a model, a role): a string with something in it. An empty one is told
    as empty, not as a type mismatch ("expected a string, but got a string")."""
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if not value.strip():
        raise bad_request(f"'{param}' must not be empty.", param=param, code="empty_string")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChatRequest:
    payload: dict[str, Any]  # the client's body, as it goes to the upstream
    model: str
    stream: bool


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise bad_request("'messages' must contain at least one message.", param="messages", code="empty_array")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_type(param, "an object", message)
        role = message.get("role")
        if role is None:
            raise bad_request(
                f"Missing required parameter: '{param}.role'.", param=f"{param}.role", code="missing_required_parameter"
            )
        check_name(f"{param}.role", role)
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise invalid_type(f"{param}.content", "a string or an array of content parts", content)
        if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
            raise invalid_type(f"{param}.content", "an array of content part objects", content)


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# Optional fields the gateway reads or that are cheap to check: name -> (type test, expected).
_OPTIONAL_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "max_tokens": (is_int, "an integer"),
    "max_completion_tokens": (is_int, "an integer"),
    "n": (is_int, "an integer"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "presence_penalty": (_is_number, "a number"),
    "frequency_penalty": (_is_number, "a number"),
    "stop": (lambda v: isinstance(v, str) or _is_string_list(v), "a string or an array of strings"),
    "user": (lambda v: isinstance(v, str), "a string"),
}
_POSITIVE = ("max_tokens", "max_completion_tokens", "n")


@dataclass(frozen=True)
class RequestCaps:
    """Global caps on what one request may ask (0 for max_tokens: no cap)."""

    max_messages: int = 1000
    max_message_size: int = 1_000_000
    max_tokens: int = 0


def _check_caps(payload: dict[str, Any], caps: RequestCaps) -> None:
    check_caps(payload["messages"], {name: payload.get(name) for name in ("max_tokens", "max_completion_tokens")}, caps)


def check_caps(messages: list[Any], limits: dict[str, Any], caps: RequestCaps, *, param: str = "messages") -> None:
    """The caps on a request's messages (`param`: what the request calls them: chat's
    `messages`, the Responses API's `input` items) and on the tokens it asks for (`limits`)."""
    if len(messages) > caps.max_messages:
        raise bad_request(f"Too many {param}: {len(messages)}; at most {caps.max_messages}.", param=param,
                          code="too_many_messages")
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        size = len(content) if isinstance(content, str) else sum(
            len(part.get("text", "")) for part in content or [] if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
        if size > caps.max_message_size:
            raise bad_request(f"{param}[{index}] is {size} characters long; at most {caps.max_message_size}.",
                              param=f"{param}[{index}].content", code="message_too_long")
    for name, value in limits.items():
        if caps.max_tokens and value is not None and value > caps.max_tokens:
            raise bad_request(f"'{name}' is {value}; this gateway allows at most {caps.max_tokens}.", param=name,
                              code="max_tokens_too_large")


def with_system_prompt(payload: dict[str, Any], prompt: str | None) -> dict[str, Any]:
    """The server's preset system message first: the operator sets the model up before any
    client speaks. Without a preset, the request is unchanged."""
    if not prompt:
        return payload
    return {**payload, "messages": [{"role": "system", "content": prompt}, *payload["messages"]]}


def parse_chat_request(body: bytes, *, force_stream: bool = False, caps: RequestCaps | None = None) -> ChatRequest:
    """Parse and check a request body; raises a 400 GatewayError naming the offending field.

    `force_stream` is for routes that always stream (`POST /v1/streams`): `stream` is set true.
    """
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    payload = load_json_body(body)
    if not isinstance(payload, dict):
        raise bad_request(f"The request body must be a JSON object, not {_type_name(payload)}.", code="invalid_json")
    if force_stream:
        payload["stream"] = True
    model = payload.get("model")
    if model is None:
        raise bad_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    check_name("model", model)
    if "messages" not in payload:
        raise bad_request("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    _check_messages(payload["messages"])
    for name, (valid, expected) in _OPTIONAL_TYPES.items():
        value = payload.get(name)
        if value is not None and not valid(value):
            raise invalid_type(name, expected, value)
    for name in _POSITIVE:
        value = payload.get(name)
        if value is not None and value < 1:
            raise bad_request(
                f"Invalid '{name}': expected a value of at least 1, but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
    _check_caps(payload, caps or RequestCaps())
    stream = payload.get("stream") is True
    if payload.get("stream_options") is not None and not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options", code="invalid_value"
        )
    return ChatRequest(payload=payload, model=model, stream=stream)
