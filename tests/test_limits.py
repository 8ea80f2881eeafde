"""Limits per user, server-side policy and global caps."""

from __future__ import annotations

import asyncio
import json

import pytest
from support import EventReader, chat_body, content_of, stream_chat
from test_errors import error_of

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
SLOW = {"mock_token_delay": 0.05}


async def open_stream(http, gateway, text: str, headers=ALICE):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, **SLOW), headers=headers)
    return response


async def limited(response, limit: str) -> dict:
    error = await error_of(response, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", f"{limit}_exceeded")
    assert int(response.headers["Retry-After"]) >= 1
    return error


class TestConcurrentStreams:
    async def test_the_sixth_stream_of_five_is_refused_and_slots_free_up(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS, concurrent_streams=5)
        streams = [await open_stream(http, gateway, "long " * 100) for _ in range(5)]
        assert all(r.status == 200 for r in streams)
        await limited(await open_stream(http, gateway, "sixth"), "concurrent_streams")
        other_user = await open_stream(http, gateway, "bob has his own", headers=BOB)
        assert other_user.status == 200
        other_user.close()
        # A stream that ends frees its slot.
        await http.delete(f"{gateway.url}/v1/streams/{streams[0].headers['X-Stream-Id']}", headers=ALICE)
        await EventReader(streams[0]).read_all()
        await gateway.services.streams.wait_idle(0.1)  # let the freeing run
        replacement = await open_stream(http, gateway, "in the freed slot")
        assert replacement.status == 200
        # So does a client that disconnects (the stream may go on in its grace period).
        streams[1].close()
        async def admitted() -> None:
            while (response := await open_stream(http, gateway, "after a disconnect")).status != 200:
                await limited(response, "concurrent_streams")
                await asyncio.sleep(int(response.headers["Retry-After"]))  # as a client is told to
        await asyncio.wait_for(admitted(), timeout=5)

    async def test_an_idempotent_retry_takes_no_second_slot(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS, concurrent_streams=1)
        headers = {**ALICE, "Idempotency-Key": "once"}
        first = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("x " * 50, **SLOW), headers=headers)
        again = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("x " * 50, **SLOW), headers=headers)
        assert first.status == again.status == 200
        assert first.headers["X-Stream-Id"] == again.headers["X-Stream-Id"]


async def test_requests_per_minute(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS, requests_per_minute=3)
    for _ in range(3):
        response, _reader = await stream_chat(http, gateway.url, chat_body(), headers=ALICE)
        assert response.status == 200
    error = await limited(await http.post(f"{gateway.url}/v1/streams", json=chat_body(), headers=ALICE), "requests_per_minute")
    assert "3 requests per minute" in error["message"]
    response, _reader = await stream_chat(http, gateway.url, chat_body(), headers=BOB)
    assert response.status == 200  # per user


async def test_requests_per_minute_are_counted_across_instances(start_gateway, redis_url, http):
    a, b = (start_gateway(api_keys=KEYS, requests_per_minute=4, redis_url=redis_url) for _ in range(2))
    for gateway in (a, b, a, b):
        response, _reader = await stream_chat(http, gateway.url, chat_body(), headers=ALICE)
        assert response.status == 200
    await limited(await http.post(f"{b.url}/v1/chat/completions", json=chat_body(), headers=ALICE), "requests_per_minute")


async def test_tokens_per_day(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS, tokens_per_day=10)
    _response, reader = await stream_chat(http, gateway.url, chat_body("x", model="mock-count", max_tokens=12), headers=ALICE)
    assert content_of(reader.events).split()[-1] == "11"
    await gateway.services.streams.wait_idle(5)  # its usage is recorded
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(), headers=ALICE)
    error = await limited(response, "tokens_per_day")
    assert "10 tokens" in error["message"]
    assert int(response.headers["Retry-After"]) <= 86400  # until midnight, UTC


async def test_a_model_allowlist(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS, models=("mock-echo",))
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(model="mock-count"), headers=ALICE)
    error = await error_of(response, 403)
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    models = await (await http.get(f"{gateway.url}/v1/models", headers=ALICE)).json()
    assert [m["id"] for m in models["data"]] == ["mock-echo"]


async def test_a_policy_file_per_user_and_per_model(start_gateway, http, mock_model):
    policy = {
        "users": {"alice": {"models": ["mock-count"], "system_prompt": "Alice's preset.", "concurrent_streams": 1}},
        "models": {"mock-echo": {"system_prompt": "The echo model's preset."}},
    }
    gateway = start_gateway(api_keys=KEYS, system_prompt="The default preset.", policy=policy)
    assert (await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(), headers=ALICE)).status == 403
    await stream_chat(http, gateway.url, chat_body("from alice", model="mock-count", max_tokens=1), headers=ALICE)
    await stream_chat(http, gateway.url, chat_body("from bob"), headers=BOB)
    await stream_chat(http, gateway.url, chat_body("bob counts", model="mock-count", max_tokens=1), headers=BOB)
    system = {r.last_user_text: r.body["messages"][0]["content"] for r in mock_model.requests}
    assert system == {"from alice": "Alice's preset.", "from bob": "The echo model's preset.",
                      "bob counts": "The default preset."}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"users": {"alice": {"requests_per_minute": -1}}}, "must be a whole number"),
        ({"users": {"alice": {"speed": 1}}}, "unknown fields: speed"),
        ({"users": {"alice": {"models": "mock-echo"}}}, "must be a list of model names"),
        ({"models": {"m": {"system_prompt": 5}}}, "models.m must be"),
        ({"groups": {}}, 'with "users" and/or "models"'),
    ],
)
def test_a_wrong_policy_file_stops_the_start(tmp_path, capsys, document, message):
    from sse_gateway.config import parse_settings

    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    with pytest.raises(SystemExit):
        parse_settings([f"--policy={path}"], env={})
    assert message in capsys.readouterr().err


class TestGlobalCaps:
    async def test_messages_count_and_size(self, start_gateway, http):
        gateway = start_gateway(max_messages=3, max_message_size=10)
        many = {"model": "mock-echo", "messages": [{"role": "user", "content": "x"}] * 4}
        error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions", json=many), 400)
        assert error["code"] == "too_many_messages"
        error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("x" * 11)), 400)
        assert (error["code"], error["param"]) == ("message_too_long", "messages[0].content")

    async def test_max_tokens(self, start_gateway, http):
        gateway = start_gateway(max_tokens=100)
        for field in ("max_tokens", "max_completion_tokens"):
            error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions",
                                                   json=chat_body(**{field: 101})), 400)
            assert (error["code"], error["param"]) == ("max_tokens_too_large", field)
        response, _reader = await stream_chat(http, gateway.url, chat_body(max_tokens=100))
        assert response.status == 200

    async def test_connections(self, start_gateway, http):
        gateway = start_gateway(max_connections=2)
        held = [await open_stream(http, gateway, "hold " * 100) for _ in range(2)]
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body())
        error = await error_of(response, 503)
        assert error["code"] == "overloaded" and response.headers["Retry-After"] == "1"
        assert (await http.get(f"{gateway.url}/healthz")).status == 200  # probes still answer
        for response in held:
            response.close()

    async def test_stream_lifetime(self, start_gateway, http, mock_model):
        gateway = start_gateway(max_stream_lifetime=0.5)
        text = "forever " * 100
        _response, reader = await stream_chat(http, gateway.url, chat_body(text, mock_token_delay=0.05))
        assert json.loads(reader.events[-2].data)["error"]["code"] == "stream_lifetime_exceeded"
        record = mock_model.find(text)
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=2)
        assert record.state == "cancelled"


class TestSlotsOfLongStreams:
    async def test_a_running_stream_keeps_renewing_its_slot(self, start_gateway, http):
        """Slots lapse after two leases unless renewed: a stream running far longer keeps its."""
        gateway = start_gateway(api_keys=KEYS, concurrent_streams=1, instance_lease=0.1)
        response = await open_stream(http, gateway, "long " * 40)  # 2 s at 50 ms a token
        reader = EventReader(response)
        for _ in range(10):  # 0.5 s of frames: five leases
            await reader.next_event()
        await limited(await open_stream(http, gateway, "second"), "concurrent_streams")
        await reader.read_all()
        await gateway.services.streams.wait_idle(5)
        response = await open_stream(http, gateway, "now")  # the ended stream freed its slot
        assert content_of(await EventReader(response).read_all()) == "now"


class TestTokensPerDayUnderABurst:
    """Tokens are reserved at admission and settled at the end, in the store: a burst of
    parallel requests cannot all pass before any has used anything, on one instance or two."""

    @pytest.mark.parametrize(("backend", "instances"), [("memory", 1), ("redis", 1), ("redis", 2)])
    async def test_fifty_parallel_requests_pass_the_limit_by_one_request_at_most(
            self, start_gateway, http, backend, instances):
        gateways = [start_gateway(api_keys=KEYS, tokens_per_day=100) for _ in range(instances)]
        body = chat_body("x", model="mock-count", max_tokens=21)  # 21 tokens, and a prompt of 1

        async def ask(i: int):
            response = await http.post(f"{gateways[i % instances].url}/v1/chat/completions", json=body, headers=ALICE)
            if response.status == 200:
                await EventReader(response).read_all()
            return response

        responses = await asyncio.gather(*(ask(i) for i in range(50)))
        admitted = [r for r in responses if r.status == 200]
        for refused in [r for r in responses if r.status != 200]:
            await limited(refused, "tokens_per_day")
        for gateway in gateways:
            await gateway.services.streams.wait_idle(5)
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # each instance writes its usage to Redis in batches: until both have
            usage = await (await http.get(f"{gateways[0].url}/v1/usage", headers=ALICE)).json()
            used = usage["total"]["prompt_tokens"] + usage["total"]["completion_tokens"]
            if used == 22 * len(admitted) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert used == 22 * len(admitted)
        assert used - 22 < 100 <= used  # under the limit before the last one admitted, over after it
        await limited(await http.post(f"{gateways[0].url}/v1/chat/completions", json=body, headers=ALICE),
                      "tokens_per_day")

    async def test_a_request_that_never_reaches_the_model_gives_its_tokens_back(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS, tokens_per_day=100)
        failing = chat_body("x", model="mock-count", max_tokens=95, mock_error_status=500)
        for stream in (True, False):  # each reserves 96 of the 100, and fails before any token
            failing["stream"] = stream
            response = await http.post(f"{gateway.url}/v1/chat/completions", json=failing, headers=ALICE)
            assert response.status == 502
        response = await http.post(f"{gateway.url}/v1/streams", json=failing, headers=ALICE)
        assert response.status == 502
        await gateway.services.streams.wait_idle(5)
        _response, reader = await stream_chat(http, gateway.url, chat_body("x", model="mock-count", max_tokens=95),
                                              headers=ALICE)
        assert content_of(reader.events).split()[-1] == "94"  # admitted: nothing was held any more
