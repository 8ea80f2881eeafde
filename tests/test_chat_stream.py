"""End to end through the gateway and the mock model: `POST /v1/chat/completions` (DESIGN.md §4.1)."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from support import EventReader, blocks, chat_body, content_of, stream_chat

from sse_gateway.mock_upstream import split_words

TEXTS = [
    "hello there",
    "first paragraph\n\nsecond paragraph",
    "line\u2028separator and\u2029paragraph separator",
    "emoji 😀🎉 and a flag 🇫🇷",
    "中文测试，你好世界",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF\rand CR",
    '{"json": "looking", "text": [1, 2]}\n</script><b>html</b>',
]


@pytest.mark.parametrize("text", TEXTS)
async def test_joined_chunks_equal_the_question(gateway, http, text):
    response, reader = await stream_chat(http, gateway.url, chat_body(text))
    assert response.status == 200
    assert content_of(reader.events) == text
    assert reader.events[-1].data == "[DONE]"


async def test_stream_frames_and_headers_follow_the_contract(gateway, http):
    text = "one two three four"
    response, reader = await stream_chat(http, gateway.url, chat_body(text))
    headers = response.headers
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in headers
    stream_id = headers["X-Stream-Id"]
    assert stream_id

    raw = bytes(reader.raw)
    assert raw.startswith(b"retry: 3000\nid: ")  # retry first, with no blank line after it
    events = reader.events
    assert len(events) == len(split_words(text)) + 3  # role chunk, words, finish chunk, [DONE]
    assert [e.id for e in events] == [f"{stream_id}:{seq}" for seq in range(1, len(events) + 1)]
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # Every block is exactly one event: an id line and a data line (the first block also
    # carries the retry line ahead of them).
    for index, block in enumerate(blocks(raw)):
        lines = block[1:] if index == 0 else block
        assert [line.split(":", 1)[0] for line in lines] == ["id", "data"]


async def test_each_stream_has_its_own_id(gateway, http):
    ids = set()
    for _ in range(3):
        response, _reader = await stream_chat(http, gateway.url, chat_body("x"))
        ids.add(response.headers["X-Stream-Id"])
    assert len(ids) == 3


async def test_non_streaming_completion(gateway, http):
    for body in (chat_body("plain answer", stream=False), {"model": "mock-echo", "messages": [{"role": "user", "content": "no stream field"}]}):
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=body)
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        completion = await response.json()
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"] == body["messages"][0]["content"]


async def test_models_are_listed(gateway, http):
    response = await http.get(f"{gateway.url}/v1/models")
    assert response.status == 200
    assert [m["id"] for m in (await response.json())["data"]] == ["mock-echo", "mock-count"]


async def test_mock_count_and_usage_pass_through(gateway, http):
    body = chat_body(model="mock-count", max_tokens=5, stream_options={"include_usage": True})
    _response, reader = await stream_chat(http, gateway.url, body)
    assert content_of(reader.events) == "0 1 2 3 4 "
    usage_chunk = json.loads(reader.events[-2].data)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5


async def test_unknown_fields_reach_the_upstream_unchanged(gateway, http, mock_model):
    body = chat_body("pass me through", custom_vendor_field={"nested": [1, 2.5, None]}, seed=7)
    await stream_chat(http, gateway.url, body)
    seen = mock_model.find("pass me through").body
    assert seen["custom_vendor_field"] == {"nested": [1, 2.5, None]}
    assert seen["seed"] == 7 and seen["stream"] is True


async def test_chunks_are_relayed_byte_for_byte(gateway, http, mock_model):
    # The gateway passes the upstream's JSON through as bytes; it does not re-serialise it.
    body = chat_body("exact bytes 😀", mock_token_delay=0)
    _response, reader = await stream_chat(http, gateway.url, body)
    relayed = [e.data.encode() for e in reader.events[:-1]]
    assert all(orjson.loads(r) for r in relayed)
    # orjson writes compact JSON with raw UTF-8, as the mock does: a re-encoding with
    # json.dumps' defaults would have spaces and \\u escapes.
    assert any("😀".encode() in r for r in relayed)
    assert all(b'", "' not in r for r in relayed)


async def test_concurrent_streams_stay_separate(gateway, http):
    texts = [f"stream number {i} says {'word ' * i}".strip() for i in range(20)]
    results = await asyncio.gather(*(stream_chat(http, gateway.url, chat_body(t, mock_token_delay=0.001)) for t in texts))
    assert [content_of(reader.events) for _response, reader in results] == texts
    assert len({response.headers["X-Stream-Id"] for response, _reader in results}) == 20


async def test_client_disconnect_cancels_the_upstream_within_a_second(start_gateway, http, mock_model):
    gateway = start_gateway(resume_grace=0)  # no resume grace: a dropped client stops its stream
    text = "word " * 400
    response = await http.post(
        f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02)
    )
    reader = EventReader(response)
    for _ in range(3):
        assert await reader.next_event() is not None
    record = mock_model.find(text)
    assert record.state == "open"
    response.close()  # the client goes away mid-stream
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=1.0)
    assert record.state == "cancelled"
    assert record.chunks_sent < 400
    assert await gateway.services.streams.wait_idle(timeout=1.0)


async def test_client_disconnect_during_non_streaming_request_cancels_the_upstream(gateway, http, mock_model):
    text = "slow non-streaming answer"
    request = asyncio.ensure_future(
        http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, stream=False, mock_first_token_delay=30))
    )
    record = await asyncio.wait_for(mock_model.wait_for(lambda: mock_model.find(text)), timeout=5)
    request.cancel()  # closes the client's connection
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=1.0)
    assert record.state == "cancelled"
