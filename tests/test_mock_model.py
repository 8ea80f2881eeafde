"""The built-in mock model: bounded, lazy, never holding the loop it shares with the gateway."""

from __future__ import annotations

import time

from support import EventReader, chat_body
from test_errors import error_of

from sse_gateway.mock_upstream import MAX_COUNT


async def test_a_huge_max_tokens_streams_without_holding_the_loop(start_gateway, http, mock_model):
    gateway = start_gateway()  # the mock model runs in the gateway's own loop, as with `make run`
    response = await http.post(f"{gateway.url}/v1/chat/completions",
                               json=chat_body(model="mock-count", max_tokens=2**40, mock_token_delay=0))
    assert response.status == 200
    reader = EventReader(response)
    for _ in range(200):
        assert await reader.next_event() is not None  # the burst is running
    started = time.monotonic()
    health = await http.get(f"{gateway.url}/healthz")
    assert health.status == 200
    # Before the cap, a list of 2**40 tokens held the loop until a MemoryError; now the burst
    # gives the loop a turn every few dozen frames.
    assert time.monotonic() - started < 1.0
    response.close()


async def test_mock_count_stops_at_its_cap(mock_model, http):
    response = await http.post(f"{mock_model.base_url}/chat/completions",
                               json=chat_body(model="mock-count", stream=False, max_tokens=2**40))
    assert response.status == 200
    completion = await response.json()
    assert completion["usage"]["completion_tokens"] == MAX_COUNT
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["choices"][0]["message"]["content"].endswith(f" {MAX_COUNT - 1} ")


async def test_a_content_part_whose_text_is_not_a_string_is_a_400(gateway, http, mock_model):
    body = chat_body()
    body["messages"][0]["content"] = [{"type": "text", "text": 5}]
    direct = await http.post(f"{mock_model.base_url}/chat/completions", json=body)
    assert direct.status == 400
    for stream in (True, False):
        body["stream"] = stream
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=body)
        assert (await error_of(response, 400))["type"] == "invalid_request_error"
