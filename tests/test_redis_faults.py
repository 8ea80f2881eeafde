"""Redis going away and coming back (issue: Redis faults).

A dedicated redis-server with append-only persistence fsynced on every write is killed with
SIGKILL mid-stream, as in a crash, then started again on the same port and folder. The gateway
must end open streams with an error frame, answer 503 meanwhile, and recover by itself, losing
nothing it acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from conftest import RedisServer
from support import EventReader, blocks, chat_body, content_of
from test_errors import error_of
from test_push import take

KEYS = {"key-alice": "alice"}
ALICE = {"Authorization": "Bearer key-alice"}
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture
def crashable_redis(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def gateway(start_gateway, crashable_redis):
    return start_gateway(redis_url=crashable_redis.url, api_keys=KEYS, admin_keys=("admin-key",),
                         heartbeat_interval=0.5)


def error_code(event) -> str:
    return json.loads(event.data)["error"]["code"]


def ends_outside_the_log(reader: EventReader) -> bool:
    """The last two blocks (error, [DONE]) have no id line: a browser's Last-Event-ID still
    names the last frame of the log it really has, so its resume is exact."""
    last_two = blocks(bytes(reader.raw))[-2:]
    return all(not any(line.startswith("id:") for line in block) for block in last_two)


async def test_open_streams_end_with_an_error_frame_instead_of_hanging(gateway, crashable_redis, http):
    text = " ".join(f"w{i}" for i in range(400))
    chat = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)
    reader = EventReader(chat)
    await take(reader, 5)
    crashable_redis.kill()
    events = await asyncio.wait_for(reader.read_all(), timeout=10)
    assert ends_outside_the_log(reader)
    assert error_code(events[-2]) == "store_unavailable" and events[-1].data == "[DONE]"


async def test_a_push_channel_rides_out_the_outage(gateway, crashable_redis, http):
    # Nothing can be published while Redis is away (503), so nothing can be missed: the channel
    # stays open on heartbeats and delivers again once Redis is back, without a reconnect.
    push = EventReader(await http.get(f"{gateway.url}/v1/events", headers=ALICE))
    first = await http.post(f"{gateway.url}/v1/events", json={"user": "alice", "data": "before"}, headers=ADMIN)
    assert [e.id for e in await take(push, 1)] == [(await first.json())["id"]]
    crashable_redis.kill()
    heartbeats = len(push.comments)
    while len(push.comments) < heartbeats + 2:
        await asyncio.wait_for(push.next_comment_or_event(), timeout=5)
    assert not push.eof
    # A channel opened during the outage opens too (an EventSource never retries after a
    # non-200), on heartbeats, and subscribes once Redis is back.
    during = await http.get(f"{gateway.url}/v1/events", headers=ALICE)
    assert during.status == 200
    late = EventReader(during)
    while len(late.comments) < 2:
        await asyncio.wait_for(late.next_comment_or_event(), timeout=5)
    crashable_redis.start()
    second = await http.post(f"{gateway.url}/v1/events", json={"user": "alice", "data": "after"}, headers=ADMIN)
    assert second.status == 202
    assert [e.id for e in await take(push, 1)] == [(await second.json())["id"]]
    # The late channel started after alice's cursor, which the first channel has moved past
    # "before": it gets "after" once it has subscribed again (within a second or so).
    assert [e.data for e in await take(late, 1)] == ['"after"']


async def test_503_while_redis_is_away_and_recovery_without_a_restart(gateway, crashable_redis, http, mock_model):
    assert (await http.get(f"{gateway.url}/healthz")).status == 200
    crashable_redis.kill()
    for method, path, body in [
        ("POST", "/v1/chat/completions", chat_body()),
        ("POST", "/v1/chat/completions", chat_body(stream=False)),
        ("POST", "/v1/streams", chat_body()),
        ("POST", "/v1/events", {"user": "alice", "data": 1}),
        ("GET", "/v1/streams/someid", None),
        ("POST", "/v1/session", None),
    ]:
        headers = ADMIN if path == "/v1/events" and method == "POST" else ALICE
        response = await http.request(method, f"{gateway.url}{path}", json=body, headers=headers)
        error = await error_of(response, 503)
        assert error["code"] == "store_unavailable", (method, path)
        assert response.headers["Retry-After"] == "1"
    health = await http.get(f"{gateway.url}/healthz")
    assert health.status == 503 and (await health.json())["reason"] == "store_unavailable"
    assert not mock_model.requests  # nothing reached the model while the state could not be kept

    crashable_redis.start()  # same port, same folder
    assert (await http.get(f"{gateway.url}/healthz")).status == 200
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("after the storm"), headers=ALICE)
    assert content_of(await EventReader(response).read_all()) == "after the storm"
    push = EventReader(await http.get(f"{gateway.url}/v1/events", headers=ALICE))
    sent = await http.post(f"{gateway.url}/v1/events", json={"user": "alice", "data": "back"}, headers=ADMIN)
    assert [e.id for e in await take(push, 1)] == [(await sent.json())["id"]]


async def test_acknowledged_messages_survive_a_crash_of_redis(gateway, crashable_redis, http):
    ids = []
    for i in range(20):
        response = await http.post(f"{gateway.url}/v1/events", json={"user": "alice", "data": i}, headers=ADMIN)
        assert response.status == 202
        ids.append((await response.json())["id"])
    crashable_redis.kill()
    crashable_redis.start()
    reader = EventReader(await http.get(f"{gateway.url}/v1/events", headers=ALICE))
    events = await take(reader, 20)
    assert [e.id for e in events] == ids
    assert [json.loads(e.data) for e in events] == list(range(20))


async def test_a_stream_cut_by_the_crash_can_be_resumed_after_it(gateway, crashable_redis, http):
    text = " ".join(f"w{i}" for i in range(400))
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)
    stream_id = response.headers["X-Stream-Id"]
    reader = EventReader(response)
    seen = await take(reader, 5)
    crashable_redis.kill()
    events = await asyncio.wait_for(reader.read_all(), timeout=10)
    assert ends_outside_the_log(reader)
    last_id = events[-1].id  # what a browser would send: the id of the last frame of the log
    crashable_redis.start()
    # The producer records the end of the stream once Redis is back; a resume then gets the
    # frames it missed, the reason the answer stopped, and [DONE].
    async def resumed() -> list:
        while True:
            got = await http.get(f"{gateway.url}/v1/streams/{stream_id}", headers={**ALICE, "Last-Event-ID": last_id})
            if got.status == 503:  # not yet: a client retries after Retry-After, as told
                await asyncio.sleep(int(got.headers["Retry-After"]))
                continue
            assert got.status == 200, await got.text()
            resumed_reader = EventReader(got)
            rest = await resumed_reader.read_all()
            if not ends_outside_the_log(resumed_reader):  # the log's own end, recorded after the crash
                return rest
    rest = await asyncio.wait_for(resumed(), timeout=10)
    assert rest[-1].data == "[DONE]" and error_code(rest[-2]) == "store_unavailable"
    received = events[:-2] + rest[:-2]
    assert [e.id for e in received] == [f"{stream_id}:{i}" for i in range(1, len(received) + 1)]
    assert text.startswith(content_of(received)) and seen == events[:5]


async def test_shutdown_without_redis_is_bounded_and_the_usage_waits_for_the_next_start(
        programs, crashable_redis, http, tmp_path):
    """SIGTERM while Redis is gone: the process exits within the drain timeout and a few seconds,
    the usage it could not write goes to its spill file, and the next start writes it."""
    from test_shutdown import start

    spill = tmp_path / "usage.unwritten"
    flags = (f"--redis-url={crashable_redis.url}", "--api-keys=key-alice:alice", "--drain-timeout=2",
             f"--usage-spill={spill}")
    server, url = await start(programs, *flags)
    response = await http.post(f"{url}/v1/chat/completions", headers=ALICE,
                               json=chat_body("a b c d e f g h", mock_token_delay=0.2))
    reader = EventReader(response)
    await reader.next_event()
    crashable_redis.kill()  # the stream ends with an error frame, and its usage cannot be written
    await reader.read_all()
    assert error_code(reader.events[-2]) == "store_unavailable"
    started = asyncio.get_running_loop().time()
    assert await server.stop(signal.SIGTERM, timeout=20) == 0
    assert asyncio.get_running_loop().time() - started < 2 + 8  # --drain-timeout, and the usage's last try
    assert not any("Traceback" in line for line in server.lines)
    # One line per 10 s while Redis is away, however many calls fail (about 20 in this test).
    assert sum("redis unavailable" in line for line in server.lines) == 1, "\n".join(server.lines)
    assert spill.exists(), "\n".join(server.lines)
    user, _date, model, reason, requests, *_ = json.loads(spill.read_text().splitlines()[0])
    assert (user, model, requests) == ("alice", "mock-echo", 1) and reason

    crashable_redis.start()
    server, url = await start(programs, *flags)
    await server.wait_for_line("read back from")
    usage = await (await http.get(f"{url}/v1/usage", headers=ALICE)).json()
    assert [(row["requests"], row["estimated"]) for row in usage["data"]] == [(1, True)]
    deadline = asyncio.get_running_loop().time() + 20
    while spill.exists():  # removed once its rows are written to Redis
        assert asyncio.get_running_loop().time() < deadline, "the spilled usage was never written"
        await asyncio.sleep(0.1)
    assert await server.stop() == 0
    server, url = await start(programs, *flags)  # written once: read from Redis, not the file again
    usage = await (await http.get(f"{url}/v1/usage", headers=ALICE)).json()
    assert [row["requests"] for row in usage["data"]] == [1]
