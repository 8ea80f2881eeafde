"""The Responses API relayed (`POST /v1/responses`, DESIGN.md §4.6): its requests, its typed
event stream, how such a stream ends, and what it used.

A Responses stream is SSE with named events (`event: response.output_text.delta`, …), each
`data:` a JSON object with a `sequence_number`. The gateway passes every event through as the
upstream sent it, name and data bytes untouched (names it has never seen included), with an
`id:` of its own, into the same stream log as chat: heartbeats, resume, stop and grace hold as
for chat. The stream ends with the upstream's terminal event (`response.completed`,
`response.failed`, `response.incomplete`, or its own `error` event), and no `[DONE]` follows,
which the SDKs do not expect. What the gateway adds is an `error` event, shaped as the API's
(`{"type": "error", "code", "message", "param", "sequence_number"}`), when the stream is cut
short: the upstream dropped, a timeout, a stop, a shutdown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .chat import RequestCaps, check_caps, check_name, invalid_type, is_int
from .errors import GatewayError, bad_request, load_json_body
from .frames import encode_event
from .upstream import (
    ChatStream,
    Chunk,
    UpstreamClient,
    UpstreamError,
    error_from_chunk,
    parse_chunk,
    redact,
)
from .usage import UsageMeter, estimate_tokens

PATH = "/responses"
TERMINAL = frozenset({b"response.completed", b"response.failed", b"response.incomplete", b"error"})
_PARSED = TERMINAL | {b"response.created"}  # events the gateway reads (usage, the response's id)
_DELTA = b".delta"  # events that are a piece of the answer: output text, function arguments, a refusal, …
_FAILED = frozenset({b"error", b"response.failed"})
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


@dataclass(frozen=True)
class ResponsesRequest:
    payload: dict[str, Any]
    model: str
    stream: bool


def parse_responses_request(body: bytes, caps: RequestCaps | None = None) -> ResponsesRequest:
    """A `POST /v1/responses` body, checked for what the gateway relies on and against its caps
    (`input` items as messages, `max_output_tokens` as max_tokens); the rest goes upstream
    untouched."""
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    payload = load_json_body(body)
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = payload.get("model")
    if model is None:
        raise bad_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    check_name("model", model)
    value = payload.get("input")
    if value is not None and not isinstance(value, (str, list)):
        raise invalid_type("input", "a string or an array of input items", value)
    if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
        raise invalid_type("input", "an array of input item objects", value)
    for name, valid, expected in (
        ("stream", lambda v: isinstance(v, bool), "a boolean"),
        ("instructions", lambda v: isinstance(v, str), "a string"),
        ("previous_response_id", lambda v: isinstance(v, str) and 0 < len(v) <= 256, "a response id"),
        ("tools", lambda v: isinstance(v, list), "an array"),
        ("max_output_tokens", lambda v: is_int(v) and v >= 1, "a positive integer"),
        ("store", lambda v: isinstance(v, bool), "a boolean"),
    ):
        if payload.get(name) is not None and not valid(payload[name]):
            raise invalid_type(name, expected, payload[name])
    if caps is not None:
        _check_caps(payload, caps)
    return ResponsesRequest(payload, model, payload.get("stream") is True)


def _check_caps(payload: dict[str, Any], caps: RequestCaps) -> None:
    value = payload.get("input")
    items = [{"content": value}] if isinstance(value, str) else value or []
    check_caps(items, {"max_output_tokens": payload.get("max_output_tokens")}, caps, param="input")


def with_instructions(payload: dict[str, Any], prompt: str | None) -> dict[str, Any]:
    """The server's preset system prompt ahead of the caller's own `instructions`."""
    if not prompt:
        return payload
    own = payload.get("instructions")
    return {**payload, "instructions": f"{prompt}\n\n{own}" if own else prompt}


def input_text(payload: dict[str, Any]) -> str:
    """The text of `input` (a string, or the text parts of its items): the prompt's estimate."""
    value = payload.get("input")
    if isinstance(value, str):
        return value
    parts: list[str] = []
    for item in value if isinstance(value, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def is_delta(event: bytes) -> bool:
    """Whether an event (`event: <name>` first) is a piece of the answer, by its name."""
    end = event.find(b"\n")
    return event[end - 6:end] == _DELTA


class ResponsesStream(ChatStream):
    """The upstream's Responses event stream: each event kept whole (`event:` and `data:` lines,
    as the payload of its chunk); it ends with the first terminal event."""

    __slots__ = ("_last", "_end")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last = b""  # the data of the last event: its sequence number, read at the end
        self._end: tuple[bytes, dict[str, Any] | None] | None = None  # the terminal event

    def _decode(self, data: bytes, chunks: list[Chunk]) -> bool:
        secret = self._secret
        for event, payload in self._events.feed(data):
            name = event or b"message"
            if secret is not None and secret in payload:
                payload = redact(payload, secret)
            obj = parse_chunk(payload) if name in _PARSED else None
            self._last = payload
            lines = payload.split(b"\n") if b"\n" in payload else (payload,)
            chunks.append((b"event: " + name + b"\n" + b"\n".join(b"data: " + line for line in lines), obj))
            if name in TERMINAL:
                self._end = (name, obj)
                return True
        return False

    def refusal(self) -> UpstreamError | None:
        if self._end is None or self._end[0] not in _FAILED:
            return None
        fields = self._end[1] or {}
        if self._end[0] == b"response.failed":
            response = fields.get("response")
            fields = response.get("error") if isinstance(response, dict) else None
        return error_from_chunk(fields if isinstance(fields, dict) else {})

    def _complete_without_end(self) -> bool:
        return False  # the body ended before a terminal event: cut short

    @property
    def last_sequence(self) -> int:
        found = _SEQUENCE.search(self._last)
        return int(found.group(1)) if found else -1


class ResponsesDialect:
    """How a Responses stream opens upstream and ends in its log (see producer.Dialect)."""

    events = True

    def carries_content(self, payload: bytes, obj: dict[str, Any] | None) -> bool:
        return is_delta(payload)

    async def open(self, upstream: UpstreamClient, payload: dict[str, Any]) -> ChatStream:
        return await upstream.open_stream(PATH, payload, ResponsesStream, self.carries_content)

    def final(self, error: GatewayError | None, stopped: bool, body: ChatStream | None, next_id: Any) -> list[bytes]:
        """Nothing after a terminal event; an `error` event when the stream was cut short."""
        if error is None and not stopped:
            return []
        if error is None:
            error = GatewayError(499, "The answer was stopped before it was complete.", type="server_error",
                                 code="stream_stopped")
        sequence = body.last_sequence + 1 if isinstance(body, ResponsesStream) else 0
        data = {"type": "error", "code": error.code or error.type, "message": error.message, "param": error.param,
                "sequence_number": sequence}
        return [encode_event(orjson.dumps(data), event="error", id=next_id())]


RESPONSES = ResponsesDialect()


class ResponsesMeter(UsageMeter):
    """Usage of a Responses answer: `usage` of its terminal event (`input_tokens`,
    `output_tokens`), else an estimate of a delta event a token. It also tells `on_created` the
    response's id, for the owner's record."""

    __slots__ = ("on_created",)

    def __init__(self, *args: Any, on_created: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_created = on_created

    def see(self, payload: bytes, chunk: dict[str, Any] | None) -> bool:
        if chunk is None:
            if is_delta(payload):
                self.content_chunks += 1
            return True
        response = chunk.get("response")
        if isinstance(response, dict):
            if chunk.get("type") == "response.created" and isinstance(response.get("id"), str) and self.on_created:
                self.on_created(response["id"])
            self._note_usage(response.get("usage"))
        return True

    def see_completion(self, completion: dict[str, Any]) -> None:
        if isinstance(completion.get("id"), str) and self.on_created:
            self.on_created(completion["id"])
        self._note_usage(completion.get("usage"))
        self.content_chunks = estimate_tokens(orjson.dumps(completion.get("output") or []).decode())

    def _note_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.reported = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
