"""The data path on the wire: the writer that owns a stream's connection after its head
(handlers/wire.py), and the upstream connection the producer reads (sse_gateway/upstream.py).

These behaviours rest on attributes Tornado and aiohttp keep private; the tests would fail
should a new release of either change them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket

from support import chat_body, content_of, stream_chat

from sse_gateway.decoder import SSEDecoder


def request_bytes(body: dict, version: str = "HTTP/1.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions {version}\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def read_to_the_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=10):
        received += data
    return bytes(received)


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


def parse(raw: bytes) -> tuple[http.client.HTTPResponse, bytes]:
    """Status, headers and the body (de-chunked) of one raw HTTP response, by Python's own client."""

    class Wire:
        def makefile(self, mode: str) -> object:
            import io

            return io.BytesIO(raw)

    response = http.client.HTTPResponse(Wire())  # type: ignore[arg-type]
    response.begin()
    return response, response.read()


async def test_the_connection_ends_with_the_response(gateway):
    sock = await connect(gateway.port)
    await asyncio.get_running_loop().sock_sendall(sock, request_bytes(chat_body("closing after")))
    raw = await read_to_the_end(sock)  # the gateway closes the connection: no keep-alive after a stream
    sock.close()
    response, body = parse(raw)
    assert response.status == 200 and response.getheader("Connection") == "close"
    assert response.getheader("Transfer-Encoding") == "chunked" and raw.endswith(b"0\r\n\r\n")
    events = SSEDecoder().feed(body)
    assert content_of(events) == "closing after" and events[-1].data == "[DONE]"


async def test_an_http_10_client_gets_the_stream_unchunked(gateway):
    sock = await connect(gateway.port)
    await asyncio.get_running_loop().sock_sendall(sock, request_bytes(chat_body("one point oh"), "HTTP/1.0"))
    raw = await read_to_the_end(sock)
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding" not in head
    assert body.startswith(b"retry: 3000\nid: ")
    events = SSEDecoder().feed(body)
    assert content_of(events) == "one point oh" and events[-1].data == "[DONE]"


async def test_a_client_too_slow_for_its_stream_catches_up_with_nothing_lost_or_repeated(gateway):
    tokens = 50_000  # some 11 MB of frames: far more than the socket buffers between us hold
    sock = await connect(gateway.port, rcvbuf=4096)
    body = chat_body(model="mock-count", max_tokens=tokens)
    await asyncio.get_running_loop().sock_sendall(sock, request_bytes(body))
    # This client reads nothing for now: the writer stops at the full socket, and the rest of
    # the answer waits in the log, not in a buffer of the writer's.
    await asyncio.wait_for(_stalled(gateway), 30)
    raw = await read_to_the_end(sock)
    sock.close()
    _response, data = parse(raw)
    events = SSEDecoder().feed(data)
    stream_id = events[0].id.split(":")[0]
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]
    assert content_of(events) == "".join(f"{i} " for i in range(tokens)) and events[-1].data == "[DONE]"


async def _stalled(gateway) -> None:
    while not any(writer.stalled_since is not None for writer in gateway.services.open_streams):
        await asyncio.sleep(0.01)  # nothing tells; the writer's state does


async def test_a_streamed_response_writes_its_access_line_when_it_ends(start_gateway, http, caplog):
    caplog.set_level(logging.INFO, logger="sse_gateway.access")
    gateway = start_gateway(api_keys={"key-alice": "alice"})
    response, reader = await stream_chat(http, gateway.url, chat_body("logged at the end"),
                                         headers={"Authorization": "Bearer key-alice"})
    assert content_of(reader.events) == "logged at the end"
    await asyncio.wait_for(_access_line(caplog), 5)
    [line] = [r for r in caplog.records if r.name == "sse_gateway.access"]
    assert line.getMessage().startswith("200 POST /v1/chat/completions ")
    assert (line.user, line.stream_id) == ("alice", response.headers["X-Stream-Id"])


async def _access_line(caplog) -> None:
    while not any(r.name == "sse_gateway.access" for r in caplog.records):
        await asyncio.sleep(0.01)  # written by the response's end, right after the last byte


async def test_the_upstream_connection_is_kept_alive_between_answers(gateway, http, mock_model):
    for text in ("first answer", "second answer", "third answer"):
        _response, reader = await stream_chat(http, gateway.url, chat_body(text))
        assert content_of(reader.events) == text
    peers = [mock_model.find(text).peer for text in ("first answer", "second answer", "third answer")]
    assert peers[0] is not None and len(set(peers)) == 1  # one TCP connection served all three


async def test_an_answer_that_came_whole_with_its_head_is_relayed(gateway, http, mock_model):
    # With no delay the mock writes the whole answer at once: aiohttp may have read the body
    # before the producer starts listening; nothing of it may be lost.
    for _ in range(20):
        _response, reader = await stream_chat(http, gateway.url, chat_body("all at once", mock_token_delay=0))
        assert content_of(reader.events) == "all at once" and reader.events[-1].data == "[DONE]"
