"""Resumable streams: the ticket flow, Last-Event-ID, stop, grace (DESIGN.md §4.2)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from support import EventReader, chat_body, content_of, stream_chat
from test_errors import error_of

from sse_gateway.decoder import ServerSentEvent
from sse_gateway.store.memory import MemoryStore
from sse_gateway.store.redis.connection import connect


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request) -> str:
    """Every contract test of resumable streams runs against both stores."""
    return request.param


ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
KEYS = {"key-alice": "alice", "key-bob": "bob"}


async def create_stream(http, gateway, body, headers=None) -> dict:
    response = await http.post(f"{gateway.url}/v1/streams", json=body, headers=headers)
    assert response.status == 201, await response.text()
    created = await response.json()
    assert response.headers["Location"] == f"/v1/streams/{created['id']}"
    return created


async def open_stream(http, gateway, path, headers=None) -> EventReader:
    response = await http.get(f"{gateway.url}{path}", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    return EventReader(response)


async def read_from(http, gateway, path, last_id: str | None, count: int | None, headers=None) -> list[ServerSentEvent]:
    """Connect, read `count` events (all when None), disconnect."""
    headers = dict(headers or {})
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    reader = await open_stream(http, gateway, path, headers)
    events = []
    while count is None or len(events) < count:
        event = await reader.next_event()
        if event is None:
            break
        events.append(event)
    reader.response.close()
    return events


async def test_ticket_flow_streams_a_whole_answer(gateway, http):
    text = "the ticket flow works"
    created = await create_stream(http, gateway, chat_body(text, stream=False))
    assert created["object"] == "stream" and created["url"].startswith(f"/v1/streams/{created['id']}?token=")
    reader = await open_stream(http, gateway, created["url"])
    events = await reader.read_all()
    assert content_of(events) == text
    assert [e.id for e in events] == [f"{created['id']}:{i}" for i in range(1, len(events) + 1)]
    assert events[-1].data == "[DONE]"
    assert bytes(reader.raw).startswith(b"retry: 3000\n")


async def test_resume_from_every_position_of_a_finished_stream(gateway, http):
    created = await create_stream(http, gateway, chat_body("one two three four five six seven"))
    full = await read_from(http, gateway, created["url"], None, None)
    n = len(full)
    assert full[-1].data == "[DONE]"
    for k in range(n):
        rest = await read_from(http, gateway, created["url"], f"{created['id']}:{k}", None)
        assert rest == full[k:], f"resumed after {k}"


@pytest.mark.parametrize("seed", [1, 2])
async def test_resume_while_the_producer_writes_has_no_gap_and_no_duplicate(gateway, http, seed):
    # Each connection reads a few events and drops; the next resumes from the last id seen.
    # Many of the seams fall between replayed and live frames.
    rng = random.Random(seed)
    created = await create_stream(http, gateway, chat_body(model="mock-count", max_tokens=40, mock_token_delay=0.01))
    collected: list[ServerSentEvent] = []
    while not collected or collected[-1].data != "[DONE]":
        last = collected[-1].id if collected else None
        collected += await read_from(http, gateway, created["url"], last, rng.randint(1, 3))
    full = await read_from(http, gateway, created["url"], None, None)
    assert collected == full
    assert content_of(collected) == "".join(f"{i} " for i in range(40))


async def test_a_finished_reader_reconnecting_gets_204(gateway, http):
    created = await create_stream(http, gateway, chat_body("short"))
    full = await read_from(http, gateway, created["url"], None, None)
    response = await http.get(f"{gateway.url}{created['url']}", headers={"Last-Event-ID": full[-1].id})
    assert response.status == 204
    assert await response.read() == b""


async def test_last_event_id_as_query_parameter_and_header_wins(gateway, http):
    created = await create_stream(http, gateway, chat_body("a b c d"))
    full = await read_from(http, gateway, created["url"], None, None)
    sid = created["id"]
    by_query = await read_from(http, gateway, f"{created['url']}&last_event_id={sid}:2", None, None)
    assert by_query == full[2:]
    # EventSource keeps the URL it was given and sends a newer id in the header.
    both = await read_from(http, gateway, f"{created['url']}&last_event_id={sid}:1", f"{sid}:4", None)
    assert both == full[4:]


async def test_a_chat_completions_stream_can_be_resumed_by_its_stream_id(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS)
    text = "resume me " * 10
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.01), headers=ALICE)
    stream_id = response.headers["X-Stream-Id"]
    reader = EventReader(response)
    first = [await reader.next_event() for _ in range(3)]
    response.close()
    rest = await read_from(http, gateway, f"/v1/streams/{stream_id}", first[-1].id, None, headers=ALICE)
    assert content_of(first + rest) == text
    assert rest[-1].data == "[DONE]"


async def test_two_readers_of_one_stream_get_the_same_frames(gateway, http):
    created = await create_stream(http, gateway, chat_body(model="mock-count", max_tokens=30, mock_token_delay=0.01))
    a, b = await asyncio.gather(
        read_from(http, gateway, created["url"], None, None),
        read_from(http, gateway, created["url"], None, None),
    )
    assert a == b and content_of(a) == "".join(f"{i} " for i in range(30))


class TestStop:
    async def test_delete_stops_the_upstream_and_ends_every_reader(self, start_gateway, http, mock_model):
        gateway = start_gateway(api_keys=KEYS)
        text = "long answer " * 200
        created = await create_stream(http, gateway, chat_body(text, mock_token_delay=0.02), ALICE)
        readers = [await open_stream(http, gateway, created["url"]) for _ in range(2)]
        for reader in readers:
            for _ in range(3):
                await reader.next_event()
        response = await http.delete(f"{gateway.url}/v1/streams/{created['id']}", headers=ALICE)
        assert response.status == 200
        assert await response.json() == {"id": created["id"], "object": "stream", "state": "cancelled"}
        record = mock_model.find(text)
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=1.0)
        assert record.state == "cancelled"
        results = [await reader.read_all() for reader in readers]
        assert results[0] == results[1]
        assert results[0][-1].data == "[DONE]"
        assert 3 <= len(results[0]) < 200
        assert "error" not in results[0][-2].data  # a stop is not a failure: no error frame
        # Later readers get the same frames so far and [DONE].
        again = await read_from(http, gateway, created["url"], None, None)
        assert again == results[0]

    async def test_delete_of_another_users_or_unknown_stream(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS)
        created = await create_stream(http, gateway, chat_body(), ALICE)
        response = await http.delete(f"{gateway.url}/v1/streams/{created['id']}", headers=BOB)
        assert (await error_of(response, 403))["code"] == "not_your_stream"
        response = await http.delete(f"{gateway.url}/v1/streams/unknownstream123", headers=ALICE)
        assert (await error_of(response, 404))["code"] == "stream_not_found"
        # A read token reads; it does not stop.
        response = await http.delete(f"{gateway.url}{created['url']}")
        assert (await error_of(response, 401))["code"] == "missing_api_key"

    async def test_delete_of_a_finished_stream_reports_its_state(self, gateway, http):
        created = await create_stream(http, gateway, chat_body("done already"))
        await read_from(http, gateway, created["url"], None, None)
        response = await http.delete(f"{gateway.url}/v1/streams/{created['id']}")
        assert (await response.json())["state"] == "done"


class TestGrace:
    async def test_grace_zero_cancels_within_a_second_of_the_disconnect(self, start_gateway, http, mock_model):
        gateway = start_gateway(resume_grace=0)
        text = "grace zero " * 100
        created = await create_stream(http, gateway, chat_body(text, mock_token_delay=0.02))
        await read_from(http, gateway, created["url"], None, 3)
        record = mock_model.find(text)
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=1.0)
        assert record.state == "cancelled"

    async def test_reconnect_within_grace_resumes_and_no_reader_after_it_cancels(self, start_gateway, http, mock_model):
        gateway = start_gateway(resume_grace=5)
        text = " ".join(f"w{i}" for i in range(400))  # 400 chunks 50 ms apart: 20 s of answer
        created = await create_stream(http, gateway, chat_body(text, mock_token_delay=0.05))
        first = await read_from(http, gateway, created["url"], None, 3)
        record = mock_model.find(text)
        await asyncio.sleep(2)  # the client is away for 2 s: within the grace
        assert record.state == "open"
        reader = await open_stream(http, gateway, created["url"], {"Last-Event-ID": first[-1].id})
        resumed = [await reader.next_event() for _ in range(3)]
        assert [e.id for e in resumed] == [f"{created['id']}:{i}" for i in (4, 5, 6)]
        reader.response.close()
        left = asyncio.get_running_loop().time()
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=7)
        waited = asyncio.get_running_loop().time() - left
        assert record.state == "cancelled"
        assert 4.5 <= waited <= 6.5, waited  # cancelled once the 5 s of grace ran out

    async def test_a_stream_nobody_opens_is_cancelled_after_the_grace(self, start_gateway, http, mock_model):
        gateway = start_gateway(resume_grace=6)
        text = "never read " * 400
        created_at = asyncio.get_running_loop().time()
        await create_stream(http, gateway, chat_body(text, mock_token_delay=0.05))
        record = mock_model.find(text)
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=8)
        assert record.state == "cancelled"
        assert 5.5 <= asyncio.get_running_loop().time() - created_at <= 7.5

    async def test_with_no_grace_a_new_stream_still_waits_for_its_first_reader(self, start_gateway, http, mock_model):
        gateway = start_gateway(resume_grace=0)
        created = await create_stream(http, gateway, chat_body("opened in time", mock_first_token_delay=0.3))
        events = await read_from(http, gateway, created["url"], None, None)
        assert content_of(events) == "opened in time"

    async def test_a_chat_client_that_drops_can_resume_within_the_grace(self, start_gateway, http, mock_model):
        gateway = start_gateway(resume_grace=5)
        text = "still generating " * 40
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.01))
        reader = EventReader(response)
        first = [await reader.next_event() for _ in range(2)]
        response.close()
        record = mock_model.find(text)
        await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=5)
        assert record.state == "finished"  # the generation went on without its reader
        rest = await read_from(http, gateway, f"/v1/streams/{response.headers['X-Stream-Id']}", first[-1].id, None)
        assert content_of(first + rest) == text


class TestBadInput:
    @pytest.fixture
    def keyed(self, start_gateway):
        return start_gateway(api_keys=KEYS, ticket_ttl=60)

    async def test_forged_token(self, keyed, http):
        created = await create_stream(http, keyed, chat_body(), ALICE)
        response = await http.get(f"{keyed.url}/v1/streams/{created['id']}?token=forged-token-value")
        assert (await error_of(response, 401))["code"] == "invalid_token"

    async def test_expired_token(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS, ticket_ttl=0.3)
        created = await create_stream(http, gateway, chat_body(), ALICE)
        await asyncio.sleep(0.5)  # let the token's lifetime run out
        response = await http.get(f"{gateway.url}{created['url']}")
        assert (await error_of(response, 401))["code"] == "invalid_token"

    async def test_token_of_another_stream(self, keyed, http):
        one = await create_stream(http, keyed, chat_body("one"), ALICE)
        two = await create_stream(http, keyed, chat_body("two"), ALICE)
        token = one["url"].split("token=")[1]
        response = await http.get(f"{keyed.url}/v1/streams/{two['id']}?token={token}")
        assert (await error_of(response, 403))["code"] == "token_for_another_stream"

    async def test_another_users_stream(self, keyed, http):
        created = await create_stream(http, keyed, chat_body(), ALICE)
        response = await http.get(f"{keyed.url}/v1/streams/{created['id']}", headers=BOB)
        assert (await error_of(response, 403))["code"] == "not_your_stream"
        assert (await http.get(f"{keyed.url}/v1/streams/{created['id']}", headers=ALICE)).status == 200

    async def test_no_credentials(self, keyed, http):
        created = await create_stream(http, keyed, chat_body(), ALICE)
        response = await http.get(f"{keyed.url}/v1/streams/{created['id']}")
        assert (await error_of(response, 401))["code"] == "missing_api_key"

    async def test_unknown_stream(self, keyed, http):
        response = await http.get(f"{keyed.url}/v1/streams/nosuchstream0000", headers=ALICE)
        assert (await error_of(response, 404))["code"] == "stream_not_found"

    @pytest.mark.parametrize("last_id", ["garbage", "{sid}", "{sid}:x", "{sid}:-1", "other:1", "{sid}:1:2", "{sid}:99999"])
    async def test_bad_last_event_id(self, keyed, http, last_id):
        created = await create_stream(http, keyed, chat_body("a b"), ALICE)
        await read_from(http, keyed, created["url"], None, None)
        value = last_id.format(sid=created["id"])
        response = await http.get(f"{keyed.url}{created['url']}", headers={"Last-Event-ID": value})
        error = await error_of(response, 400)
        assert (error["code"], error["param"]) == ("invalid_last_event_id", "Last-Event-ID")

    async def test_last_event_id_of_a_running_stream_beyond_its_end(self, keyed, http):
        created = await create_stream(http, keyed, chat_body("slow " * 50, mock_token_delay=0.05), ALICE)
        response = await http.get(f"{keyed.url}{created['url']}", headers={"Last-Event-ID": f"{created['id']}:45"})
        assert (await error_of(response, 400))["code"] == "invalid_last_event_id"

    async def test_bad_body_for_a_new_stream(self, keyed, http):
        response = await http.post(f"{keyed.url}/v1/streams", json={"model": "mock-echo"}, headers=ALICE)
        assert (await error_of(response, 400))["param"] == "messages"

    async def test_upstream_refusal_is_the_status_of_the_post(self, keyed, http):
        response = await http.post(f"{keyed.url}/v1/streams", json=chat_body(mock_error_status=429), headers=ALICE)
        assert (await error_of(response, 429))["type"] == "rate_limit_error"
        assert response.headers["Retry-After"] == "1"


class TestIdempotency:
    async def test_repeated_stream_post_attaches_to_the_first(self, gateway, http, mock_model):
        body = chat_body("only once please", mock_token_delay=0.01)
        headers = {"Idempotency-Key": "question-42"}
        first = await create_stream(http, gateway, body, headers)
        second = await create_stream(http, gateway, body, headers)
        assert first["id"] == second["id"]
        assert first["url"] != second["url"]  # a fresh token, for the same stream
        events = await read_from(http, gateway, second["url"], None, None)
        assert content_of(events) == "only once please"
        assert sum(r.last_user_text == "only once please" for r in mock_model.requests) == 1

    async def test_repeated_chat_post_replays_the_same_stream(self, gateway, http, mock_model):
        body = chat_body("retried by fetch", mock_token_delay=0.01)
        headers = {"Idempotency-Key": "fetch-retry-1"}
        (r1, a), (r2, b) = await asyncio.gather(
            stream_chat(http, gateway.url, body, headers), stream_chat(http, gateway.url, body, headers)
        )
        assert r1.headers["X-Stream-Id"] == r2.headers["X-Stream-Id"]
        assert a.events == b.events and content_of(a.events) == "retried by fetch"
        assert sum(r.last_user_text == "retried by fetch" for r in mock_model.requests) == 1

    async def test_same_key_with_another_body_is_409(self, gateway, http):
        headers = {"Idempotency-Key": "reused"}
        await create_stream(http, gateway, chat_body("first body"), headers)
        response = await http.post(f"{gateway.url}/v1/streams", json=chat_body("second body"), headers=headers)
        assert (await error_of(response, 409))["code"] == "idempotency_key_reused"

    async def test_the_same_key_of_two_users_is_two_streams(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS)
        body = chat_body("same words")
        a = await create_stream(http, gateway, body, {**ALICE, "Idempotency-Key": "k"})
        b = await create_stream(http, gateway, body, {**BOB, "Idempotency-Key": "k"})
        assert a["id"] != b["id"]

    @pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve"])
    async def test_malformed_key_is_400(self, gateway, http, key):
        response = await http.post(f"{gateway.url}/v1/streams", json=chat_body(), headers={"Idempotency-Key": key})
        assert (await error_of(response, 400))["code"] == "invalid_idempotency_key"


class TestSessions:
    ORIGIN = "https://app.example.com"

    @pytest.fixture
    def keyed(self, start_gateway):
        return start_gateway(api_keys=KEYS, cors_origins=(self.ORIGIN,))

    async def login(self, gateway, http) -> str:
        response = await http.post(f"{gateway.url}/v1/session", headers=ALICE)
        assert response.status == 200
        assert await response.json() == {"object": "session", "user": "alice", "expires_in": 43200}
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        return cookie.split(";")[0]  # sse_session=<signed value>

    async def test_cookie_opens_streams_for_eventsource(self, keyed, http):
        cookie = await self.login(keyed, http)
        created = await create_stream(http, keyed, chat_body("via cookie"), {"Cookie": cookie})
        events = await read_from(http, keyed, f"/v1/streams/{created['id']}", None, None, {"Cookie": cookie})
        assert content_of(events) == "via cookie"

    async def test_ending_the_session_revokes_the_cookie(self, keyed, http):
        cookie = await self.login(keyed, http)
        response = await http.delete(f"{keyed.url}/v1/session", headers={"Cookie": cookie})
        assert response.status == 204
        assert 'sse_session=""' in response.headers["Set-Cookie"]
        response = await http.post(f"{keyed.url}/v1/streams", json=chat_body(), headers={"Cookie": cookie})
        assert (await error_of(response, 401))["code"] == "session_expired"

    async def test_the_session_says_whose_it_is(self, keyed, http):
        # A reloaded page asks this to show who is signed in (the cookie is HttpOnly).
        response = await http.get(f"{keyed.url}/v1/session")
        assert (await error_of(response, 401))["code"] == "no_session"
        cookie = await self.login(keyed, http)
        response = await http.get(f"{keyed.url}/v1/session", headers={"Cookie": cookie})
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        assert await response.json() == {"object": "session", "user": "alice"}
        await http.delete(f"{keyed.url}/v1/session", headers={"Cookie": cookie})
        response = await http.get(f"{keyed.url}/v1/session", headers={"Cookie": cookie})
        assert (await error_of(response, 401))["code"] == "session_expired"
        forged = {"Cookie": "sse_session=2|1:0|10:1|4:x|4:abcd|0"}
        assert (await error_of(await http.get(f"{keyed.url}/v1/session", headers=forged), 401))["code"] == "no_session"

    async def test_forged_cookie_is_no_credential(self, keyed, http):
        response = await http.post(f"{keyed.url}/v1/streams", json=chat_body(), headers={"Cookie": "sse_session=2|1:0|10:1|4:x|4:abcd|0"})
        assert (await error_of(response, 401))["code"] == "missing_api_key"

    async def test_a_session_is_made_from_a_key_only(self, keyed, http):
        cookie = await self.login(keyed, http)
        response = await http.post(f"{keyed.url}/v1/session", headers={"Cookie": cookie})
        assert (await error_of(response, 401))["code"] == "missing_api_key"
        response = await http.post(f"{keyed.url}/v1/session", headers={"Authorization": "Bearer nope"})
        assert (await error_of(response, 401))["code"] == "invalid_api_key"

    async def test_cross_site_changes_with_the_cookie_are_refused(self, keyed, http):
        cookie = await self.login(keyed, http)
        evil = {"Cookie": cookie, "Origin": "https://evil.example.net"}
        response = await http.post(f"{keyed.url}/v1/streams", json=chat_body(), headers=evil)
        assert (await error_of(response, 403))["code"] == "origin_not_allowed"
        # The gateway's own page and listed origins may.
        for origin in (keyed.url, self.ORIGIN):
            await create_stream(http, keyed, chat_body(), {"Cookie": cookie, "Origin": origin})

    async def test_preflight_allows_what_eventsource_and_fetch_send(self, keyed, http):
        response = await http.options(
            f"{keyed.url}/v1/streams/abc",
            headers={"Origin": self.ORIGIN, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "last-event-id"},
        )
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
        assert "DELETE" in response.headers["Access-Control-Allow-Methods"]


async def test_a_stream_over_its_event_limit_ends_with_an_error(start_gateway, http, mock_model):
    gateway = start_gateway(stream_max_events=10)
    created = await create_stream(http, gateway, chat_body(model="mock-count", max_tokens=50, mock_token_delay=0.001))
    events = await read_from(http, gateway, created["url"], None, None)
    assert len(events) == 10
    assert json.loads(events[-2].data)["error"]["code"] == "stream_too_long"
    record = next(r for r in mock_model.requests if r.body.get("max_tokens") == 50)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=1)
    assert record.state == "cancelled"


async def keys_left(gateway, retention: float) -> int:
    """What the store still holds once everything has ended and `retention` has passed (usage,
    kept for good on purpose, and the instances' leases and list aside)."""
    store = gateway.services.store
    if isinstance(store, MemoryStore):
        await asyncio.wait_for(store.wait_empty(), timeout=retention + 10)
        return len(store)
    client = connect(gateway.settings.redis_url)  # one Redis, or every node of a cluster
    deadline = asyncio.get_running_loop().time() + retention + 10
    try:
        while True:  # Redis expires keys by itself: until they are gone, or long after they should be
            keys = [key async for key in client.scan_iter(match="sse:*")]  # SCAN skips expired keys
            left = len([key for key in keys
                        if not key.startswith((b"sse:usage:", b"sse:lease:")) and key != b"sse:instances"])
            if left == 0 or asyncio.get_running_loop().time() > deadline:
                return left
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def test_a_finished_stream_expires_after_the_retention(start_gateway, http):
    gateway = start_gateway(stream_retention=0.3, ticket_ttl=60)
    created = await create_stream(http, gateway, chat_body("soon gone"))
    await read_from(http, gateway, created["url"], None, None)
    await asyncio.sleep(0.5)  # the retention runs out
    response = await http.get(f"{gateway.url}{created['url']}")
    assert (await error_of(response, 404))["code"] == "stream_not_found"


async def test_ten_thousand_streams_leave_nothing_behind(start_gateway, http):
    # Tickets and finished logs live long enough for a busy machine to use them, and then go.
    gateway = start_gateway(stream_retention=3, ticket_ttl=3, resume_grace=0)
    semaphore = asyncio.Semaphore(50)

    async def one(i: int) -> str:
        async with semaphore:
            if i % 2:
                created = await create_stream(http, gateway, chat_body(f"s{i}"))
                events = await read_from(http, gateway, created["url"], None, None)
            else:
                _response, reader = await stream_chat(http, gateway.url, chat_body(f"s{i}"))
                events = reader.events
            return content_of(events)

    texts = await asyncio.gather(*(one(i) for i in range(10_000)))
    assert texts == [f"s{i}" for i in range(10_000)]
    assert len(gateway.services.streams) == 0  # no producer left
    assert await keys_left(gateway, retention=3) == 0
