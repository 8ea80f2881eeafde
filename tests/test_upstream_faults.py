"""Upstream faults: before the stream starts they become our status; after, an error frame."""

from __future__ import annotations

import asyncio
import json
import logging

import orjson
import pytest
from aiohttp import web
from support import EventReader, chat_body, content_of, stream_chat
from test_errors import error_of

from sse_gateway.mock_upstream import MockModel

UPSTREAM_KEY = "sk-upstream-VERY-secret-0123456789"


def error_frame(reader: EventReader) -> dict:
    """The stream ended with an error frame and then [DONE]; return the error object."""
    assert reader.events[-1].data == "[DONE]"
    body = json.loads(reader.events[-2].data)
    assert set(body) == {"error"}
    assert reader.events[-2].id is not None and reader.events[-1].id is not None
    return body["error"]


@pytest.fixture
def keyed_mock(io_loop):
    model = MockModel(api_key=UPSTREAM_KEY)
    io_loop.run_sync(model.start)
    yield model
    io_loop.run_sync(model.close)


async def test_refused_connection_is_502(start_gateway, http, closed_port):
    gateway = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port}/v1")
    for body in (chat_body(), chat_body(stream=False)):
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=body)
        assert (await error_of(response, 502))["code"] == "upstream_unavailable"
    assert (await error_of(await http.get(f"{gateway.url}/v1/models"), 502))["code"] == "upstream_unavailable"
    assert await gateway.services.streams.wait_idle(timeout=1.0)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_upstream_5xx_is_502(gateway, http, status):
    for body in (chat_body(mock_error_status=status), chat_body(stream=False, mock_error_status=status)):
        error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions", json=body), 502)
        assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")


async def test_upstream_429_is_429_with_retry_after(gateway, http):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(mock_error_status=429))
    error = await error_of(response, 429)
    assert error["type"] == "rate_limit_error"
    assert response.headers["Retry-After"] == "1"


async def test_upstream_400_keeps_its_message(gateway, http):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(mock_error_status=400))
    assert (await error_of(response, 400))["message"] == "Mock failure with status 400."


async def test_unknown_model_is_the_upstreams_404(gateway, http):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(model="gpt-nonexistent"))
    error = await error_of(response, 404)
    assert error["code"] == "model_not_found" and "gpt-nonexistent" in error["message"]


async def test_upstream_key_is_sent_and_never_leaks(start_gateway, http, keyed_mock, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start_gateway(upstream_url=keyed_mock.base_url, upstream_api_key=UPSTREAM_KEY)
    response, reader = await stream_chat(http, gateway.url, chat_body("with the right key"))
    assert content_of(reader.events) == "with the right key"
    assert keyed_mock.find("with the right key").authorization == f"Bearer {UPSTREAM_KEY}"
    assert UPSTREAM_KEY not in bytes(reader.raw).decode()
    assert all(UPSTREAM_KEY not in v for v in response.headers.values())
    assert UPSTREAM_KEY not in caplog.text


async def test_upstream_refusing_our_key_is_502_without_the_key(start_gateway, http, keyed_mock, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-but-still-secret-42"
    gateway = start_gateway(upstream_url=keyed_mock.base_url, upstream_api_key=wrong)
    for body in (chat_body(), chat_body(stream=False)):
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=body)
        error = await error_of(response, 502)
        assert error["code"] == "upstream_auth_failed"
        assert wrong not in await response.text()
    models = await http.get(f"{gateway.url}/v1/models")
    assert (await error_of(models, 502))["code"] == "upstream_auth_failed"
    assert wrong not in caplog.text


async def test_hang_before_the_first_byte_is_504(start_gateway, http, mock_model):
    # The idle timeout runs out before one heartbeat interval: the status is still ours to choose.
    gateway = start_gateway(upstream_idle_timeout=0.3, heartbeat_interval=30)
    text = "never answered"
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_head_delay=30))
    assert (await error_of(response, 504))["code"] == "upstream_timeout"
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=2)
    assert record.state == "cancelled"  # the gateway hung up on the silent upstream


async def test_hang_after_the_head_was_committed_is_an_error_frame(start_gateway, http):
    gateway = start_gateway(upstream_idle_timeout=0.6, heartbeat_interval=0.2)
    response, reader = await stream_chat(http, gateway.url, chat_body("late", mock_head_delay=30))
    assert response.status == 200
    assert reader.comments  # heartbeats held the connection while waiting
    assert error_frame(reader)["code"] == "upstream_timeout"
    assert content_of(reader.events[:-2]) == ""


async def test_silence_between_chunks_is_an_error_frame(start_gateway, http):
    gateway = start_gateway(upstream_idle_timeout=0.3)
    _response, reader = await stream_chat(http, gateway.url, chat_body("a b c", mock_token_delay=5))
    assert error_frame(reader)["code"] == "upstream_timeout"
    assert len(reader.events) == 3  # the role chunk, then the error, then [DONE]


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster"])
@pytest.mark.parametrize("fail_after", [1, 3])
async def test_drop_after_n_chunks_is_an_error_frame(gateway, http, fail_after):
    """The chunks that came before the reset are all relayed, on both stores."""
    body = chat_body("one two three four five six", mock_fail_after=fail_after)
    response, reader = await stream_chat(http, gateway.url, body)
    assert response.status == 200
    assert len(reader.events) == fail_after + 2  # the chunks relayed, the error, [DONE]
    error = error_frame(reader)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_disconnected")
    assert content_of(reader.events[:fail_after]) == "".join(["", "one ", "two "][:fail_after])


async def sse_response(request: web.Request, frames: list[bytes], content_type: str = "text/event-stream") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    for frame in frames:
        await response.write(frame)
    await response.write_eof()
    return response


def chunk(content: str, finish: str | None = None) -> bytes:
    obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def test_upstream_that_does_not_stream_is_502(start_gateway, http, scripted_upstream):
    async def handler(request):
        return web.json_response({"object": "chat.completion", "choices": []})

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body())
    assert (await error_of(response, 502))["code"] == "upstream_malformed"


async def test_malformed_chunk_is_an_error_frame(start_gateway, http, scripted_upstream):
    async def handler(request):
        return await sse_response(request, [chunk("ok "), b"data: {not json\n\n", chunk("never")])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    assert content_of(reader.events[:1]) == "ok "
    assert error_frame(reader)["code"] == "upstream_malformed"
    assert len(reader.events) == 3


async def test_error_inside_the_upstream_stream_is_relayed(start_gateway, http, scripted_upstream):
    error = {"error": {"message": "The server had an error while processing your request.", "type": "server_error", "code": "overloaded"}}

    async def handler(request):
        return await sse_response(request, [chunk("partial "), b"data: " + orjson.dumps(error) + b"\n\n"])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    relayed = error_frame(reader)
    assert (relayed["message"], relayed["type"], relayed["code"]) == (error["error"]["message"], "server_error", "overloaded")


async def test_clean_end_without_done_after_finish_reason_is_complete(start_gateway, http, scripted_upstream):
    async def handler(request):
        return await sse_response(request, [chunk("all "), chunk("there", "stop")])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    assert content_of(reader.events) == "all there"
    assert [e.data for e in reader.events][-1] == "[DONE]"
    assert "error" not in reader.events[-2].data


async def test_clean_end_without_done_mid_answer_is_an_error(start_gateway, http, scripted_upstream):
    async def handler(request):
        return await sse_response(request, [chunk("cut "), chunk("short")])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    assert content_of(reader.events[:2]) == "cut short"
    assert error_frame(reader)["code"] == "upstream_disconnected"


async def test_long_upstream_lines_are_relayed_whole(start_gateway, http, scripted_upstream):
    long_text = "ä" * 300_000  # 600 KB of UTF-8 in one SSE line, far over 64 KiB

    async def handler(request):
        return await sse_response(request, [chunk(long_text), chunk("", "stop"), b"data: [DONE]\n\n"])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    assert content_of(reader.events) == long_text


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster"])
async def test_a_whole_answer_in_one_read_while_the_store_is_behind(start_gateway, http):
    """The upstream sends its whole response (head, more frames than the store takes before it
    asks the producer to pause, and the end of the body) in one write: the body has ended when
    the producer would pause, and the answer arrives complete."""
    pieces = [f"w{i} " for i in range(1500)]
    events = b"".join([*map(chunk, pieces), chunk("", "stop"), b"data: [DONE]\n\n"])
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%b\r\n0\r\n\r\n" % (len(events), events))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        writer.write(response)  # one write: one read on the gateway's side
        await writer.drain()
        await reader.read()  # until the gateway lets the connection go
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = upstream.sockets[0].getsockname()[1]
        gateway = start_gateway(upstream_url=f"http://127.0.0.1:{port}/v1")
        _response, reader = await stream_chat(http, gateway.url, chat_body())
        assert reader.events[-1].data == "[DONE]"
        assert not any('"error"' in event.data for event in reader.events)  # no error frame
        assert content_of(reader.events) == "".join(pieces)
        assert len(reader.events) == len(pieces) + 2  # each piece, the finish reason, [DONE]
    finally:
        upstream.close()


async def test_a_lone_surrogate_escape_is_relayed_untouched(start_gateway, http, scripted_upstream):
    """What Python's json and JSON.parse accept, orjson refuses: such a chunk still passes as it
    came, whether the gateway reads it (a finish reason, spaces after colons) or not."""
    chunks = [
        b'{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a \\ud83d"}, "finish_reason": null}]}',
        b'{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"\\ude00 b"},"finish_reason":"stop"}]}',
    ]

    async def handler(request):
        return await sse_response(request, [b"data: " + c + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"])

    gateway = start_gateway(upstream_url=await scripted_upstream(handler))
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    assert [event.data for event in reader.events] == [c.decode() for c in chunks] + ["[DONE]"]

    async def complete(request):
        return web.Response(body=b'{"object": "chat.completion", "choices": [{"index": 0, "message": '
                                 b'{"role": "assistant", "content": "\\ud83d"}, "finish_reason": "stop"}]}',
                            content_type="application/json")

    gateway = start_gateway(upstream_url=await scripted_upstream(complete))
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(stream=False))
    assert response.status == 200
    assert b'"content": "\\ud83d"' in await response.read()


async def test_an_upstream_that_echoes_the_key_never_passes_it_on(start_gateway, http, scripted_upstream, caplog):
    """Error texts, stream chunks, completions and the model list of an upstream that quotes the
    request's Authorization header reach neither the client nor the log with the key in them."""
    caplog.set_level(logging.DEBUG)

    def echo(request) -> str:
        return f"you sent {request.headers['Authorization']} (key {UPSTREAM_KEY})"

    async def chat(request):
        body = await request.json()
        if body.get("mock_error_status"):
            return web.json_response({"error": {"message": echo(request), "type": "invalid_request_error"}}, status=400)
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": echo(request)}, "finish_reason": "stop"}]})
        error = b"data: " + orjson.dumps({"error": {"message": echo(request), "type": "server_error"}}) + b"\n\n"
        return await sse_response(request, [chunk(echo(request)), error])

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": echo(request), "object": "model"}]})

    gateway = start_gateway(upstream_url=await scripted_upstream(chat, models), upstream_api_key=UPSTREAM_KEY)
    seen = []
    _response, reader = await stream_chat(http, gateway.url, chat_body())
    seen.append(reader.raw.decode())
    assert "[redacted]" in content_of(reader.events) and error_frame(reader)["message"].count("[redacted]") == 2
    for response in (await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(stream=False)),
                     await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(mock_error_status=400)),
                     await http.get(f"{gateway.url}/v1/models")):
        text = await response.text()
        assert "[redacted]" in text, text
        seen.append(text)
    await gateway.services.streams.wait_idle(5)
    secret = UPSTREAM_KEY.removeprefix("sk-")
    assert not any(secret in text for text in seen)
    assert secret not in caplog.text
