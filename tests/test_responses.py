"""The Responses API through the gateway (issue 13, DESIGN.md §4.6): the official SDK's helpers
unchanged, every event passed through as the upstream sent it, resumable like chat on both
stores, failures before and after the head, and answers readable by their owner only."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from aiohttp import web
from support import EventReader

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
LIFECYCLE = ["response.created", "response.in_progress", "response.output_item.added"]
TOOL = {"type": "function", "name": "shout", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        "strict": False}


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> str:
    """Resumable on both stores."""
    return request.param


@pytest.fixture
def gateway(start_gateway):
    return start_gateway(api_keys=KEYS, heartbeat_interval=0.3)


@pytest.fixture
def client(io_loop, gateway):
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="key-alice", max_retries=0)
    yield sdk
    io_loop.run_sync(sdk.close)


def body(text: str = "hello there", **extra) -> dict:
    return {"model": "mock-echo", "input": text, "stream": True, **extra}


async def test_the_sdk_streams_text_with_create_and_with_the_stream_helper(client, gateway, http):
    stream = await client.responses.create(model="mock-echo", input="streamed through the gateway", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:3] == LIFECYCLE and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "streamed through the gateway"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    async with client.responses.stream(model="mock-echo", input="the helper too") as helper:
        async for _ in helper:
            pass
        final = await helper.get_final_response()
    assert final.output_text == "the helper too"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 3)
    # Usage from response.completed's usage, as reported (not estimated).
    usage = await (await http.get(f"{gateway.url}/v1/usage", headers=ALICE)).json()
    assert usage["total"]["prompt_tokens"] == 4 + 3 and usage["total"]["completion_tokens"] == 4 + 3
    assert not any(row["estimated"] for row in usage["data"])


async def test_a_function_call_streams_its_arguments_in_pieces(client):
    async with client.responses.stream(model="mock-echo", input="call the tool", tools=[TOOL]) as stream:
        deltas = [event.delta async for event in stream if event.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    assert len(deltas) > 2 and "".join(deltas) == '{"text":"call the tool"}'
    [call] = final.output
    assert (call.type, call.name, call.arguments) == ("function_call", "shout", '{"text":"call the tool"}')


async def test_not_streamed_and_read_back_by_its_owner_only(client, gateway, http):
    response = await client.responses.create(model="mock-echo", input="kept upstream")
    assert response.output_text == "kept upstream"
    assert (await client.responses.retrieve(response.id)).output_text == "kept upstream"
    # Bob shares the gateway's upstream key, not Alice's answers.
    got = await http.get(f"{gateway.url}/v1/responses/{response.id}", headers=BOB)
    assert got.status == 404 and (await got.json())["error"]["code"] == "response_not_found"
    cancel = await http.post(f"{gateway.url}/v1/responses/{response.id}/cancel", headers=BOB)
    assert cancel.status == 404
    follow_up = await http.post(f"{gateway.url}/v1/responses", headers=BOB,
                                json={"model": "mock-echo", "input": "x", "previous_response_id": response.id})
    assert follow_up.status == 400 and (await follow_up.json())["error"]["param"] == "previous_response_id"
    # A streamed answer is Alice's too, from its response.created event.
    stream = await client.responses.create(model="mock-echo", input="streamed, kept", stream=True)
    events = [event async for event in stream]
    created = events[0].response.id
    assert (await client.responses.retrieve(created)).output_text == "streamed, kept"
    assert (await http.get(f"{gateway.url}/v1/responses/{created}", headers=BOB)).status == 404
    # The upstream's own answer for what it cannot do passes through (the mock: not a background answer).
    cancel = await http.post(f"{gateway.url}/v1/responses/{created}/cancel", headers=ALICE)
    assert cancel.status == 400


@pytest.mark.parametrize(("payload", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "", "input": "x"}, "model"),
    ({"model": "mock-echo", "input": 5}, "input"),
    ({"model": "mock-echo", "input": ["text"]}, "input"),
    ({"model": "mock-echo", "input": "x", "stream": "yes"}, "stream"),
    ({"model": "mock-echo", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
async def test_bad_requests_get_400(gateway, http, mock_model, payload, param):
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE, json=payload)
    assert response.status == 400 and (await response.json())["error"]["param"] == param
    assert not mock_model.requests


async def read_events(response) -> list:
    return await EventReader(response).read_all()


async def test_every_event_passes_through_unchanged(start_gateway, scripted_upstream, http):
    """Names the gateway has never seen, odd spacing, a data of several lines: byte for byte."""
    events = [
        (b"response.created", b'{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","usage":null}}'),
        (b"response.vendor.thought", b'{ "type" :  "response.vendor.thought", "sequence_number":1, "x": [1, 2] }'),
        (b"response.output_text.delta", b'{"type":"response.output_text.delta","sequence_number":2,"delta":"caf\xc3\xa9 \\u2028"}'),
        (b"x-experimental", b'{"type":"x-experimental",\n"sequence_number":3}'),
        (b"response.completed", (b'{"type":"response.completed","sequence_number":4,"response":{"id":"resp_1",'
                                 b'"usage":{"input_tokens":7,"output_tokens":9}}}')),
    ]

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for name, data in events:
            await response.write(b"event: " + name + b"\n" + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n")
        return response

    gateway = start_gateway(api_keys=KEYS, upstream_url=await scripted_upstream(answer))
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE, json=body())
    assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    got = await read_events(response)
    assert [(e.event.encode(), e.data.encode()) for e in got] == events
    assert all(e.id == f"{response.headers['X-Stream-Id']}:{n}" for n, e in enumerate(got, 1))
    assert "[DONE]" not in [e.data for e in got]


async def take(reader: EventReader, count: int) -> list:
    return [await reader.next_event() for _ in range(count)]


def check_whole(events: list, text: str) -> None:
    """One answer's events: numbered without a gap or a repeat, ending with its terminal event."""
    data = [json.loads(e.data) for e in events]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert [e.event for e in events] == [d["type"] for d in data]
    assert events[-1].event == "response.completed"
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == text


@pytest.mark.parametrize("cut", [1, 4, 9])
async def test_a_dropped_connection_resumes_with_no_event_lost_or_repeated(gateway, http, cut):
    text = " ".join(f"w{i}" for i in range(8))
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE, json=body(text, mock_token_delay=0.02))
    stream_id = response.headers["X-Stream-Id"]
    first = await take(EventReader(response), cut)
    response.close()  # the connection drops; the answer goes on for the resume grace
    resumed = await http.get(f"{gateway.url}/v1/streams/{stream_id}", headers={**ALICE, "Last-Event-ID": first[-1].id})
    assert resumed.status == 200
    rest = await read_events(resumed)
    events = first + rest
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]
    check_whole(events, text)
    # A reader holding the terminal event's id has everything: 204, browsers stop there.
    done = await http.get(f"{gateway.url}/v1/streams/{stream_id}", headers={**ALICE, "Last-Event-ID": events[-1].id})
    assert done.status == 204


@pytest.mark.parametrize(("status", "expected"), [(429, 429), (503, 502), (400, 400)])
async def test_an_upstream_refusal_before_the_head_is_the_status(client, status, expected):
    with pytest.raises(openai.APIStatusError) as caught:
        await client.responses.create(model="mock-echo", input="x", stream=True, extra_body={"mock_error_status": status})
    assert caught.value.status_code == expected


async def test_an_upstream_that_dies_after_the_head_ends_with_an_error_event(gateway, http, client):
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE, json=body("a b c d e f", mock_fail_after=6))
    events = await read_events(response)
    assert [e.event for e in events[:-1]] == [json.loads(e.data)["type"] for e in events[:-1]]
    last = json.loads(events[-1].data)
    assert events[-1].event == "error" and last["type"] == "error" and last["code"] == "upstream_disconnected"
    assert last["sequence_number"] == len(events) - 1  # next after the upstream's last
    # The SDK reads it as the API's own error event.
    stream = await client.responses.create(model="mock-echo", input="a b c", stream=True, extra_body={"mock_fail_after": 4})
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "error" and "response.completed" not in kinds
    # Usage of an answer cut short is estimated.
    usage = await (await http.get(f"{gateway.url}/v1/usage", headers=ALICE)).json()
    assert all(row["estimated"] for row in usage["data"])


async def test_stop_ends_the_stream_with_an_error_event_and_the_model_stops(gateway, http, mock_model):
    text = " ".join(f"w{i}" for i in range(200))
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE, json=body(text, mock_token_delay=0.02))
    reader = EventReader(response)
    await take(reader, 6)
    stop = await http.delete(f"{gateway.url}/v1/streams/{response.headers['X-Stream-Id']}", headers=ALICE)
    assert (await stop.json())["state"] == "cancelled"
    events = await reader.read_all()
    assert events[-1].event == "error" and json.loads(events[-1].data)["code"] == "stream_stopped"
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=5)
    assert record.state == "cancelled"


async def test_heartbeats_cover_a_model_that_thinks(gateway, http):
    response = await http.post(f"{gateway.url}/v1/responses", headers=ALICE,
                               json=body("slow", mock_first_token_delay=1.0))
    reader = EventReader(response)
    events = await reader.read_all()
    assert reader.comments  # ": ping" while the model thought (0.3 s interval)
    check_whole(events, "slow")


def test_a_responses_request_reserves_its_input_and_its_output_cap():
    """Daily token limits count a Responses request as a chat one: its prompt and its answer's cap."""
    from sse_gateway.limits import reserve_for

    assert reserve_for({"input": "x" * 400, "max_output_tokens": 7}) == 100 + 7
    assert reserve_for({"input": [{"role": "user", "content": "y" * 40}], "max_output_tokens": 3}) == 10 + 3
    assert reserve_for({"messages": [{"role": "user", "content": "z" * 8}], "max_tokens": 5}) == 2 + 5


def test_a_chat_request_is_reserved_by_its_messages_whatever_else_it_carries():
    from sse_gateway.limits import reserve_for

    chat = {"messages": [{"role": "user", "content": "z" * 400}], "input": "", "max_tokens": 5}
    assert reserve_for(chat) == 100 + 5  # an `input` field passed through does not shrink it


async def test_the_gateways_caps_hold_for_responses_too(start_gateway, http, mock_model):
    gateway = start_gateway(max_tokens=100, max_message_size=50, max_messages=2)
    for payload, code in [
        ({"model": "mock-echo", "input": "x", "max_output_tokens": 101}, "max_tokens_too_large"),
        ({"model": "mock-echo", "input": "y" * 51}, "message_too_long"),
        ({"model": "mock-echo", "input": [{"role": "user", "content": "y" * 51}]}, "message_too_long"),
        ({"model": "mock-echo", "input": [{"role": "user", "content": "a"}] * 3}, "too_many_messages"),
    ]:
        response = await http.post(f"{gateway.url}/v1/responses", json=payload)
        assert response.status == 400 and (await response.json())["error"]["code"] == code
    assert not mock_model.requests
