"""Client for the OpenAI-compatible model API: one shared aiohttp session, typed errors.

`open_chat_stream()` posts with `stream: true` and returns once the upstream's response head
has arrived, so that an upstream refusal can still become our HTTP status (DESIGN.md §4.1);
its errors are `UpstreamError`s that already carry the status, type and code a client should
see (§4.4: upstream 400 -> 400 with its message, 401/403 -> 502, 429 -> 429 with Retry-After,
5xx -> 502, timeout -> 504). The body is then pushed to the producer as it arrives, through
aiohttp's own connection protocol and parser (never `async for line in resp.content`, which
fails on lines over 64 KiB), decoded as SSE, and returned as chunks whose bytes are relayed
untouched. A chunk is parsed only when its bytes say it may carry an error, usage or a finish
reason, or is not shaped like a JSON object.

Timeouts: `--upstream-connect-timeout` bounds the TCP connect; `--upstream-idle-timeout` bounds
the wait for the head (aiohttp's `sock_read`) and, through the producer, every silence after.
The upstream key is sent as a Bearer token and appears in no error message and no log line.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy

from .decoder import DecodeError, RawEventDecoder
from .errors import GatewayError

__all__ = ["Chunk", "ChatStream", "UpstreamClient", "UpstreamError"]

log = logging.getLogger("sse_gateway.upstream")

MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 64 * 1024 * 1024
MAX_MESSAGE = 2000
USER_AGENT = "sse-gateway/0.1"


class UpstreamError(GatewayError):
    """A failure of the upstream, already mapped to what our client should see."""


def unreachable() -> UpstreamError:
    return UpstreamError(502, "The model service could not be reached.", type="upstream_error", code="upstream_unavailable")


def timed_out() -> UpstreamError:
    return UpstreamError(504, "The model service did not answer in time.", type="upstream_error", code="upstream_timeout")


def dropped() -> UpstreamError:
    return UpstreamError(
        502,
        "The model service closed the stream before the answer was complete.",
        type="upstream_error",
        code="upstream_disconnected",
    )


def malformed(detail: str) -> UpstreamError:
    return UpstreamError(502, f"The model service sent {detail}.", type="upstream_error", code="upstream_malformed")


def _retry_after(value: str | None) -> int:
    """Seconds from a Retry-After header (delta or HTTP date); 1 when absent or unreadable."""
    if value:
        value = value.strip()
        if value.isdigit():
            return max(1, int(value))
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(1, int(when.timestamp() - time.time() + 0.999))
        except (TypeError, ValueError):
            pass
    return 1


REDACTED = b"[redacted]"
_BEARER = re.compile(rb"(?i)(bearer\s+)[^\s\"',;\\]+")


def redact(data: bytes, secret: bytes | None) -> bytes:
    """The upstream's bytes without the gateway's key to it, nor any bearer credential it quotes
    (an upstream's error text may echo the request's Authorization header)."""
    if secret and secret in data:
        data = data.replace(secret, REDACTED)
    if b"earer" in data:
        data = _BEARER.sub(rb"\1" + REDACTED, data)
    return data


def load_upstream_json(data: bytes) -> Any:
    """JSON from the upstream, as leniently as its clients read it: orjson, and where orjson
    refuses what Python's json and the browser's JSON.parse accept (a lone surrogate escape such
    as "\\ud83d", from an upstream that cut a string between two UTF-16 units), Python's json.
    The bytes themselves are relayed as they came. Raises ValueError for what is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _error_fields(body: bytes) -> dict[str, Any]:
    """The `error` object of an OpenAI-style error body, or {} when there is none."""
    try:
        parsed = load_upstream_json(body)
    except ValueError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def _text(value: Any) -> str | None:
    return value[:MAX_MESSAGE] if isinstance(value, str) and value else None


def status_error(status: int, body: bytes, retry_after: str | None) -> UpstreamError:
    """Map an upstream error response to ours (see the module docstring)."""
    fields = _error_fields(body)
    message, code, param = _text(fields.get("message")), _text(fields.get("code")), _text(fields.get("param"))
    if status in (401, 403, 407):
        # The gateway's own credentials were refused: not the caller's fault, and the upstream's
        # message may quote part of our key, so it is not passed on.
        return UpstreamError(502, "The model service refused the gateway's credentials.", type="upstream_error", code="upstream_auth_failed")
    if status == 408:
        return timed_out()
    if status == 429:
        return UpstreamError(
            429,
            message or "The model service is rate limiting requests; try again later.",
            type="rate_limit_error",
            code=code or "rate_limit_exceeded",
            retry_after=_retry_after(retry_after),
        )
    if 400 <= status < 500:
        return UpstreamError(status, message or f"The model service rejected the request ({status}).", code=code, param=param)
    return UpstreamError(502, f"The model service failed ({status}).", type="upstream_error", code="upstream_error")


def error_from_chunk(fields: dict[str, Any]) -> UpstreamError:
    """An error the upstream reported inside its stream, keeping its own message, type and code."""
    return UpstreamError(
        502,
        _text(fields.get("message")) or "The model service reported an error.",
        type=_text(fields.get("type")) or "upstream_error",
        code=_text(fields.get("code")) or "upstream_error",
        param=_text(fields.get("param")),
    )


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` bytes when longer."""
    parts: list[bytes] = []
    size = 0
    async for data in response.content.iter_any():
        parts.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


Chunk = tuple[bytes, dict[str, Any] | None]  # the JSON as sent; parsed when the gateway had to read it

_FINISH_REASON, _NO_FINISH_REASON = b'"finish_reason"', b'"finish_reason":null'
_USAGE, _NO_USAGE = b'"usage"', b'"usage":null'


def _needs_reading(payload: bytes) -> bool:
    """Whether a chunk may hold something the gateway acts on: an error, usage, a finish reason,
    or a shape that is not a JSON object. Decided on the bytes; most chunks are never parsed."""
    return (
        payload[:1] != b"{" or payload[-1:] != b"}" or b'"error"' in payload
        or payload.count(_USAGE) != payload.count(_NO_USAGE)
        or payload.count(_FINISH_REASON) != payload.count(_NO_FINISH_REASON)
    )


def _has_finish_reason(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def parse_chunk(payload: bytes) -> dict[str, Any]:
    try:
        obj = load_upstream_json(payload)
    except ValueError:
        raise malformed("a chunk that is not JSON") from None
    if not isinstance(obj, dict):
        raise malformed("a chunk that is not a JSON object")
    return obj


class _PushingProtocol(ResponseHandler):
    """aiohttp's connection protocol, which also tells a listener that body data (or the end)
    has arrived. The listener reads the body in the same callback: no task is woken, no future
    made, per chunk."""

    listener: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.listener is not None:
            self.listener()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.listener is not None:
            self.listener()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The body's reader asks after every read it makes; only a paused connection has anything
        # to resume (otherwise aiohttp feeds its parser an empty read, and calls the listener).
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)


class _PushingConnector(aiohttp.TCPConnector):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp makes every connection's protocol with this factory (aiohttp 3.x, pinned).
        self._factory = functools.partial(_PushingProtocol, loop=self._loop)


def _release_head(response: aiohttp.ClientResponse) -> None:
    """Let go of what only the head needed (its headers, the request's): an answer may stream
    for an hour, and an idle stream should hold little (DESIGN.md §6). What closing and
    releasing the response use is kept."""
    info = response._request_info
    response._request_info = aiohttp.RequestInfo(info.url, info.method, _NO_HEADERS, info.real_url)
    response._raw_headers = ()
    response._headers = _NO_HEADERS
    response._history = ()
    response._cache.clear()


_NO_HEADERS: Any = CIMultiDictProxy(CIMultiDict())


class ChatStream:
    """The body of one streaming answer, after its head.

    `listen(callback)` has the callback called whenever data or the end arrives; `read()` then
    returns the chunks that came, without waiting. Once `ended`, `failure` says whether the
    answer was complete (None) or how the upstream failed (an UpstreamError, raised after the
    good chunks before it were returned). `close()` when done.
    """

    __slots__ = ("_response", "_content", "_protocol", "_events", "_saw_finish_reason", "_reading",
                 "_secret", "_held", "ended", "failure", "last_data", "served_by")

    def __init__(self, response: aiohttp.ClientResponse, secret: bytes | None = None) -> None:
        self._response = response
        self._secret = secret  # the gateway's key to the upstream: never relayed, should it echo it
        self._content = response.content
        _release_head(response)
        # None when the whole body came with the head: aiohttp has released the connection.
        protocol = response.connection.protocol if response.connection is not None else None
        assert protocol is None or isinstance(protocol, _PushingProtocol)
        self._protocol = protocol
        if protocol is not None:
            # aiohttp's read timer covered the wait for the head; silences of the body are
            # watched by the producer's deadline, rather than by a timer re-armed per chunk.
            protocol.read_timeout = None
            protocol.start_timeout()
        self._events = RawEventDecoder()
        self._saw_finish_reason = False
        self._reading = False
        self._held: list[Chunk] | None = None  # read ahead (by the router, before choosing this upstream)
        self.served_by = ""  # the upstream's name in the routing table (--upstreams)
        self.ended = False
        self.failure: UpstreamError | None = None
        self.last_data = time.monotonic()

    def listen(self, listener: Callable[[], None] | None) -> None:
        if self._protocol is not None:
            self._protocol.listener = listener

    def read(self) -> list[Chunk]:
        """The chunks that arrived since the last call (until the upstream's [DONE])."""
        held = self._held
        if held is not None:
            self._held = None
            return held + self.read()
        if self.ended or self._reading:
            return []
        self._reading = True  # reading may resume the transport, which calls the listener again
        try:
            return self._read()
        finally:
            self._reading = False

    def hold(self, chunks: list[Chunk]) -> None:
        """Give `chunks` (read ahead) back: the next read returns them first."""
        self._held = chunks

    def _read(self) -> list[Chunk]:
        failure: UpstreamError | None = None
        content = self._content
        try:
            data = content.read_nowait(-1)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            data, failure = content._read_nowait(-1), timed_out()
        except aiohttp.ClientError:
            # What came before the connection broke is part of the answer: it goes out ahead of
            # the error (aiohttp's public read raises at once, dropping what it holds).
            data, failure = content._read_nowait(-1), dropped()
        chunks: list[Chunk] = []
        done = False
        if data:
            self.last_data = time.monotonic()
            try:
                done = self._decode(data, chunks)
            except DecodeError as exc:
                failure = malformed(str(exc))
            except UpstreamError as exc:
                failure = exc
        if not done and failure is None and self._content.at_eof():
            done = self._complete_without_end()
            failure = None if done else dropped()
        if done or failure is not None:
            self.ended = True
            self.failure = failure
            self.listen(None)
        return chunks

    def _decode(self, data: bytes, chunks: list[Chunk]) -> bool:
        """Append the chunks in `data` to `chunks`; True once the upstream's [DONE] came."""
        secret = self._secret
        for event, payload in self._events.feed(data):
            if payload == b"[DONE]":
                return True
            if secret is not None and secret in payload:
                payload = redact(payload, secret)
            obj = None
            if event is not None or _needs_reading(payload):
                obj = parse_chunk(payload)
                error = obj.get("error")
                if event == b"error" or error:
                    raise error_from_chunk(error if isinstance(error, dict) else {})
                self._saw_finish_reason = self._saw_finish_reason or _has_finish_reason(obj)
            chunks.append((payload, obj))
        return False

    def refusal(self) -> UpstreamError | None:
        """An answer that ended, before any content, with a failure of its own making (the
        Responses API's `error` or `response.failed` event): another upstream may do better."""
        return None

    def _complete_without_end(self) -> bool:
        """A clean end of the body without [DONE]: complete if the model said why it stopped
        (some OpenAI-compatible servers omit [DONE]), otherwise the answer was cut short."""
        return self._saw_finish_reason

    def pause(self) -> None:
        """Stop reading the upstream's socket (the log is behind); `resume()` starts again.

        A body that has come whole has nothing left to hold back (and aiohttp's parser refuses
        to pause once its message is complete)."""
        if self._protocol is not None and not self._content.is_eof():
            self._protocol.pause_reading()

    def resume(self) -> None:
        if self._protocol is not None:
            self._protocol.resume_reading()

    def close(self) -> None:
        """Release the connection; one not read to the end is closed, which cancels the upstream work."""
        self.listen(None)
        if self.ended and self.failure is None:
            self._response.release()
        else:
            self._response.close()


class UpstreamClient:
    """The one aiohttp session to the model API, created on first use inside the running loop."""

    def __init__(
        self,
        base_url: str | Callable[[], Awaitable[str]],
        *,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._secret = api_key.encode() if api_key else None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout, sock_read=idle_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _url(self, path: str) -> str:
        base = self._base_url if isinstance(self._base_url, str) else await self._base_url()
        return base + path

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: every gateway stream holds one upstream connection for its whole life;
            # how many streams may run is decided at the gateway's door, not by a pool queue.
            connector = _PushingConnector(limit=0, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False, headers={"User-Agent": USER_AGENT}
            )
        return self._session

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def _send(self, method: str, path: str, *, body: bytes | None = None, accept: str) -> aiohttp.ClientResponse:
        """Send a request and wait for the response head; any failure is an UpstreamError."""
        headers = self._headers(accept)
        if body is not None:
            headers["Content-Type"] = "application/json"
        if accept == "text/event-stream":
            headers["Accept-Encoding"] = "identity"  # compression would batch tokens
        url = await self._url(path)
        try:
            response = await self._client().request(method, url, data=body, headers=headers, allow_redirects=False)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise timed_out() from None
        except aiohttp.ClientConnectorError as exc:
            log.warning("upstream unreachable: %s", exc.os_error or exc.__class__.__name__)
            raise unreachable() from None
        except aiohttp.ClientError as exc:
            log.warning("upstream request failed: %s", exc.__class__.__name__)
            raise unreachable() from None
        if response.status != 200:
            try:
                error_body = await _read_capped(response, MAX_ERROR_BODY)
            except (TimeoutError, aiohttp.ClientError):
                error_body = b""
            finally:
                response.close()
            error = status_error(response.status, redact(error_body, self._secret), response.headers.get("Retry-After"))
            log.warning("upstream answered %d -> %d %s", response.status, error.status, error.code)
            raise error
        return response

    async def open_chat_stream(self, payload: dict[str, Any]) -> ChatStream:
        """POST a streaming chat request; return once the head says 200 and the body is SSE."""
        return await self.open_stream("/chat/completions", payload, ChatStream)

    async def open_stream(self, path: str, payload: dict[str, Any], kind: type[ChatStream],
                          carries_content: Any = None) -> ChatStream:
        """POST a streaming request to `path`; its body read as `kind` once the head says 200 and SSE.
        (`carries_content` is for the router, which reads ahead to the first content.)"""
        response = await self._send("POST", path, body=orjson.dumps(payload), accept="text/event-stream")
        if response.content_type != "text/event-stream":
            response.close()
            raise malformed(f"{response.content_type or 'no content type'} where an event stream was expected")
        return kind(response, self._secret)

    async def _read_json(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            body = await _read_capped(response, MAX_JSON_BODY + 1)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise timed_out() from None
        except aiohttp.ClientError:
            raise dropped() from None
        finally:
            response.close()
        if len(body) > MAX_JSON_BODY:
            raise malformed("a response larger than the gateway accepts")
        body = redact(body, self._secret)
        try:
            load_upstream_json(body)
        except ValueError:
            raise malformed("a response that is not JSON") from None
        return body

    async def chat(self, payload: dict[str, Any]) -> bytes:
        """A non-streaming completion: the upstream's JSON, unchanged."""
        response = await self._send("POST", "/chat/completions", body=orjson.dumps(payload), accept="application/json")
        return await self._read_json(response)

    async def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> bytes:
        """Any other JSON call (the Responses API's): the upstream's JSON, unchanged."""
        body = orjson.dumps(payload) if payload is not None else None
        response = await self._send(method, path, body=body, accept="application/json")
        return await self._read_json(response)

    async def models(self) -> bytes:
        response = await self._send("GET", "/models", accept="application/json")
        return await self._read_json(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
