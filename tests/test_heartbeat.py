"""Heartbeats: from the request's arrival, as comment lines with no id and no blank line."""

from __future__ import annotations

import json

from support import EventReader, blocks, chat_body, content_of, stream_chat


async def test_heartbeats_cover_the_wait_for_the_first_token(start_gateway, http):
    gateway = start_gateway(heartbeat_interval=0.2)
    body = chat_body("thought long", mock_first_token_delay=1.0)
    response, reader = await stream_chat(http, gateway.url, body)
    assert response.status == 200
    assert content_of(reader.events) == "thought long"
    assert len(reader.comments) >= 3  # 1 s of silence at most 0.2 s apart
    assert set(reader.comments) == {"ping"}
    raw = bytes(reader.raw)
    assert raw.startswith(b"retry: 3000\n: ping\n")
    # Heartbeats carry no id and end no block: they ride ahead of the next real event.
    for block in blocks(raw):
        fields = [line.split(":", 1)[0] for line in block]
        while fields and fields[0] in ("retry", ""):
            fields.pop(0)
        assert fields == ["id", "data"], block


async def test_head_is_committed_after_one_interval_while_the_upstream_is_silent(start_gateway, http, mock_model):
    gateway = start_gateway(heartbeat_interval=0.2)
    text = "slow head"
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_head_delay=1.0))
    # Our 200 arrived while the upstream had not even sent its head.
    assert response.status == 200
    assert mock_model.find(text).head_sent is False
    reader = EventReader(response)
    await reader.next_comment_or_event()
    assert reader.comments == ["ping"] and not reader.events
    await reader.read_all()
    assert content_of(reader.events) == text


async def test_a_busy_stream_gets_no_heartbeat(start_gateway, http):
    gateway = start_gateway(heartbeat_interval=0.5)
    # 60 chunks 0.02 s apart: the stream is never silent for anywhere near the interval.
    body = chat_body(model="mock-count", max_tokens=60, mock_token_delay=0.02)
    _response, reader = await stream_chat(http, gateway.url, body)
    assert content_of(reader.events).split() == [str(i) for i in range(60)]
    assert reader.comments == []


async def test_heartbeats_between_slow_tokens(start_gateway, http):
    gateway = start_gateway(heartbeat_interval=0.2)
    body = chat_body("a b c", mock_token_delay=0.5)
    _response, reader = await stream_chat(http, gateway.url, body)
    assert content_of(reader.events) == "a b c"
    assert len(reader.comments) >= 4
    for event in reader.events[:-1]:
        assert json.loads(event.data)["object"] == "chat.completion.chunk"
