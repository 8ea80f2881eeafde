"""The built-in mock model: an OpenAI-compatible HTTP server (DESIGN.md §4.5).

It is the embedded default upstream (the gateway starts it in-process on a free loopback port
and talks to it over real HTTP, so the same client code runs as against a real API), a test
double the test harness starts as a real server, and a program of its own:

    python -m sse_gateway.mock_upstream --port=9000 [--token-delay=0.05] [--api-key=KEY]

Models: `mock-echo` streams the last user message back, one chunk per word with its whitespace,
so that joining the chunks gives the message exactly; `mock-count` streams `max_tokens` chunks
"0 ", "1 ", .... Per-request controls in the body (for tests and demos): `mock_token_delay`,
`mock_first_token_delay`, `mock_head_delay` (seconds before the response head), `mock_fail_after`
(drop the connection after N chunks), `mock_error_status` (answer that status with an OpenAI
error body). The wire format follows a real capture (`shared/samples/openai_chat_stream.sse`).
It also speaks the Responses API (`POST /v1/responses`, `GET /v1/responses/<id>`; see
mock_responses.py), with the same models and controls.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import logging
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

from .mock_responses import ResponseAnswer, input_text

__all__ = ["MockModel", "MockRequest", "MODELS", "split_words"]

log = logging.getLogger("sse_gateway.mock")

MODELS = ("mock-echo", "mock-count")
DEFAULT_COUNT = 16
MAX_COUNT = 100_000  # tokens mock-count generates at most, whatever max_tokens says (then: "length")
KEPT_RESPONSES = 256  # finished Responses API answers kept for GET /v1/responses/<id>
YIELD_EVERY = 64  # frames written without a delay between them before the loop gets a turn
_WORDS = re.compile(r"\s*\S+\s*|\s+")
T = TypeVar("T")


def split_words(text: str) -> list[str]:
    """One piece per word with the whitespace around it; "".join(pieces) == text."""
    return _WORDS.findall(text)


@dataclass
class MockRequest:
    """What the mock saw of one chat request, and how it ended (for tests and the log)."""

    body: dict[str, Any]
    authorization: str | None
    peer: Any = None  # the client's address: the same for requests on one kept-alive connection
    state: str = "open"  # open -> finished | cancelled | dropped | rejected
    head_sent: bool = False
    chunks_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def last_user_text(self) -> str:
        if "input" in self.body and "messages" not in self.body:  # a Responses API request
            return input_text(self.body)
        return _last_user_text(self.body.get("messages") or [])


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts: keep the text ones
                return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text", ""), str))
    return ""


def _check_content_parts(messages: Any) -> None:
    """What the model reads of content parts must be text (as OpenAI answers: a 400)."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and "text" in part and not isinstance(part["text"], str):
                raise ValueError("Invalid type for 'messages[].content[].text': expected a string.")


def _error(status: int, message: str, type: str, code: str | None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _failure_event(responses: bool, failed: bool) -> bytes:
    """A stream's first event that is a failure: chat's error chunk, or the Responses API's
    `error` (or, `failed`, `response.failed`) event."""
    error = {"message": "Mock failure in the first event.", "type": "server_error", "code": "mock_error"}
    if not responses:
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    if failed:
        data = {"type": "response.failed", "sequence_number": 0,
                "response": {"id": "resp_mockfailed", "object": "response", "status": "failed", "error": error}}
        return b"event: response.failed\ndata: " + orjson.dumps(data) + b"\n\n"
    data = {"type": "error", "sequence_number": 0, "code": "mock_error", "message": error["message"], "param": None}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    return float(value)


class _Answer:
    """One answer of the mock model, as a `chat.completion` or as streamed chunks."""

    def __init__(self, model: str, pieces: Sequence[str], messages: list[Any]) -> None:
        self.model = model
        self.pieces = pieces  # a list, or a range-like sequence that makes each piece when asked
        self.finish_reason = "length" if model == "mock-count" else "stop"
        self.id = "chatcmpl-mock" + secrets.token_hex(8)
        self.created = int(time.time())
        prompt = sum(len(split_words(_text(m))) for m in messages if isinstance(m, dict))
        self.usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return orjson.dumps({**head, "choices": choices, **extra})

    def completion(self) -> bytes:
        message = {"role": "assistant", "content": "".join(self.pieces)}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason}
        return self._object("chat.completion", [choice], usage=self.usage)

    def frames(self, include_usage: bool) -> Iterator[bytes]:
        """The SSE frames of the stream, as OpenAI sends them: role, words, finish, [usage], [DONE];
        each made when it is due, so that a long answer holds no memory ahead of its sending."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + self._object("chat.completion.chunk", [choice]) + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for piece in self.pieces:
            yield chunk({"content": piece})
        yield chunk({}, self.finish_reason)
        if include_usage:
            yield b"data: " + self._object("chat.completion.chunk", [], usage=self.usage) + b"\n\n"
        yield b"data: [DONE]\n\n"


class _Counting(Sequence[str]):
    """mock-count's pieces, "0 ", "1 ", ...: made when asked, not held."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        return f"{range(self.count)[index]} "  # range checks the index


class MockModel:
    """The mock model server. `requests` keeps the most recent requests for inspection."""

    def __init__(self, token_delay: float = 0.0, api_key: str | None = None, history: int = 1000) -> None:
        self.token_delay = token_delay
        self.api_key = api_key
        # Test controls for every request, as if each body had them (a body's own win): one mock
        # of several upstreams can fail while the others answer. `mock_error_event`: a 200 whose
        # first event is an error.
        self.controls: dict[str, Any] = {}
        self.requests: collections.deque[MockRequest] = collections.deque(maxlen=history)
        self._change = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._start_lock = asyncio.Lock()
        self.base_url: str | None = None
        self.responses: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # id -> finished response

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._chat)
        app.router.add_get("/v1/responses/{id}", self._get_response)
        app.router.add_post("/v1/responses/{id}/cancel", self._cancel_response)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen (once) and return the base URL, ending in /v1."""
        async with self._start_lock:
            if self.base_url is None:
                # handler_cancellation: a client that goes away cancels its handler at once,
                # which is how the mock notices (and records) an upstream request cancelled.
                self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
                await self._runner.setup()
                site = web.TCPSite(self._runner, host, port)
                await site.start()
                bound = self._runner.addresses[0]
                self.base_url = f"http://{bound[0]}:{bound[1]}/v1"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self.base_url = None

    async def wait_for(self, predicate: Callable[[], T]) -> T:
        """Wait until `predicate()` is truthy, re-checked whenever a request starts or changes."""
        while True:
            change = self._change
            result = predicate()
            if result:
                return result
            await change.wait()

    def find(self, text: str) -> MockRequest | None:
        """The latest request whose last user message is `text`."""
        for request in reversed(self.requests):
            if request.last_user_text == text:
                return request
        return None

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def _set_state(self, record: MockRequest, state: str) -> None:
        record.state = state
        record.ended = time.monotonic()
        self._notify()

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        presented = request.headers.get("Authorization", "")
        return hmac.compare_digest(presented.encode(), f"Bearer {self.api_key}".encode())

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "sse-gateway-mock"} for name in MODELS]
        return web.json_response({"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode())

    async def _get_response(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = self.responses.get(request.match_info["id"])
        if body is None:
            return _error(404, "No response with that id.", "invalid_request_error", "not_found")
        return web.Response(body=body, content_type="application/json")

    async def _cancel_response(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if request.match_info["id"] not in self.responses:
            return _error(404, "No response with that id.", "invalid_request_error", "not_found")
        return _error(400, "Only responses created with background=true can be cancelled.", "invalid_request_error", None)

    def _keep(self, answer: ResponseAnswer) -> None:
        self.responses[answer.id] = answer.completed()
        while len(self.responses) > KEPT_RESPONSES:
            self.responses.popitem(last=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        if not isinstance(body, dict):
            return _error(400, "The body must be a JSON object.", "invalid_request_error", None)
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        record = MockRequest(body=body, authorization=request.headers.get("Authorization"), peer=peer)
        self.requests.append(record)
        self._notify()
        try:
            response = await self._answer(request, body, record)
        except asyncio.CancelledError:
            self._set_state(record, "cancelled")
            raise
        if record.state == "open":
            self._set_state(record, "finished" if response.status < 400 else "rejected")
        return response

    async def _answer(self, request: web.Request, body: dict[str, Any], record: MockRequest) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        body = {**self.controls, **body}
        try:
            head_delay = _number(body, "mock_head_delay", 0)
            first_delay = _number(body, "mock_first_token_delay", 0)
            token_delay = _number(body, "mock_token_delay", self.token_delay)
            _check_content_parts(body.get("messages"))
            fail_after = body.get("mock_fail_after")
            if fail_after is not None and (isinstance(fail_after, bool) or not isinstance(fail_after, int)):
                raise ValueError("mock_fail_after must be an integer")
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error", None)
        if head_delay:
            await asyncio.sleep(head_delay)
        error_status = body.get("mock_error_status")
        if isinstance(error_status, int) and 400 <= error_status <= 599:
            headers = {"Retry-After": str(body.get("mock_retry_after", 1))} if error_status == 429 else None
            return _error(error_status, f"Mock failure with status {error_status}.", "mock_error", "mock_error", headers)
        model = body.get("model")
        if model not in MODELS:
            return _error(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found")
        if (body.get("mock_error_event") or body.get("mock_failed_event")) and body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(_failure_event(request.path.endswith("/responses"), bool(body.get("mock_failed_event"))))
            return response
        if request.path.endswith("/responses"):
            answer = ResponseAnswer(model, self._pieces(model, body), body, len(split_words(input_text(body))))
            if not body.get("stream"):
                if first_delay:
                    await asyncio.sleep(first_delay)
                self._keep(answer)
                return web.Response(body=answer.completed(), content_type="application/json")
            frames = answer.frames()
            self._keep(answer)  # GET /v1/responses/<id> finds it (complete, as the mock knows it will be)
        else:
            chat = _Answer(model, self._pieces(model, body), body.get("messages") or [])
            if not body.get("stream"):
                if first_delay:
                    await asyncio.sleep(first_delay)
                return web.Response(body=chat.completion(), content_type="application/json")
            options = body.get("stream_options")
            frames = chat.frames(include_usage=isinstance(options, dict) and bool(options.get("include_usage")))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        record.head_sent = True
        self._notify()
        for index, data in enumerate(frames):
            if fail_after is not None and index >= fail_after:
                # Drop the connection mid-stream, without the chunked terminator.
                self._set_state(record, "dropped")
                assert request.transport is not None
                request.transport.abort()
                return response
            delay = first_delay if index == 0 else token_delay
            if delay:
                await asyncio.sleep(delay)
            elif index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long burst must not hold the loop: the gateway may share it
            await response.write(data)
            record.chunks_sent += 1
        await response.write_eof()
        return response

    def _pieces(self, model: str, body: dict[str, Any]) -> Sequence[str]:
        if model == "mock-count":
            count = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens") or DEFAULT_COUNT
            return _Counting(min(int(count), MAX_COUNT))
        if "input" in body and "messages" not in body:
            return split_words(input_text(body))
        return split_words(_last_user_text(body.get("messages") or []))


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sse_gateway.mock_upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        model = MockModel(token_delay=args.token_delay, api_key=args.api_key)
        url = await model.start(args.host, args.port)
        log.info("mock model listening on %s (models: %s)", url, ", ".join(MODELS))
        try:
            await stop.wait()
        finally:
            await model.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
