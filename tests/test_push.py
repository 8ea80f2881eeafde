"""Push messages to a user: `GET /v1/events` and `POST /v1/events` (DESIGN.md §4.3), on both stores."""

from __future__ import annotations

import asyncio
import json
import resource

import pytest
from support import EventReader
from test_errors import error_of

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def gateway(start_gateway):
    return start_gateway(api_keys=KEYS, admin_keys=("admin-key",), heartbeat_interval=0.5)


async def publish(http, gateway, user: str, data, event: str | None = None) -> str:
    body = {"user": user, "data": data} | ({"event": event} if event else {})
    response = await http.post(f"{gateway.url}/v1/events", json=body, headers=ADMIN)
    assert response.status == 202, await response.text()
    return (await response.json())["id"]


async def connect(http, gateway, headers, last_id: str | None = None) -> EventReader:
    headers = {**headers, **({"Last-Event-ID": last_id} if last_id else {})}
    response = await http.get(f"{gateway.url}/v1/events", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    return EventReader(response)


async def take(reader: EventReader, count: int) -> list:
    return [await asyncio.wait_for(reader.next_event(), timeout=10) for _ in range(count)]


def id_order(message_id: str) -> tuple[int, int]:
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


async def test_a_message_reaches_the_user_framed_as_designed(gateway, http):
    reader = await connect(http, gateway, ALICE)
    first = await publish(http, gateway, "alice", {"text": "hello", "n": [1, 2]}, event="notification")
    second = await publish(http, gateway, "alice", "plain")
    events = await take(reader, 2)
    assert [(e.id, e.event) for e in events] == [(first, "notification"), (second, "message")]
    assert json.loads(events[0].data) == {"text": "hello", "n": [1, 2]}
    raw = bytes(reader.raw).decode()
    assert f'id: {first}\nevent: notification\ndata: {{"text":"hello","n":[1,2]}}\n\n' in raw  # compact JSON
    assert f'id: {second}\ndata: "plain"\n\n' in raw  # no event line for "message"
    assert id_order(second) > id_order(first)


async def test_ids_are_unique_and_increasing(gateway, http):
    ids = [await publish(http, gateway, "alice", i) for i in range(50)]
    assert len(set(ids)) == 50 and sorted(ids, key=id_order) == ids


async def test_messages_published_while_offline_arrive_on_connect(gateway, http):
    ids = [await publish(http, gateway, "alice", f"offline {i}") for i in range(3)]
    reader = await connect(http, gateway, ALICE)
    assert [e.id for e in await take(reader, 3)] == ids


async def test_a_new_connection_starts_after_the_last_message_delivered(gateway, http):
    reader = await connect(http, gateway, ALICE)
    seen = [await publish(http, gateway, "alice", i) for i in range(2)]
    assert [e.id for e in await take(reader, 2)] == seen
    reader.response.close()
    missed = await publish(http, gateway, "alice", "while away")
    again = await connect(http, gateway, ALICE)  # no Last-Event-ID: the user's cursor decides
    assert [e.id for e in await take(again, 1)] == [missed]
    live = await publish(http, gateway, "alice", "live")
    assert [e.id for e in await take(again, 1)] == [live]


async def test_last_event_id_replays_what_was_missed(gateway, http):
    ids = [await publish(http, gateway, "alice", i) for i in range(5)]
    reader = await connect(http, gateway, ALICE)
    await take(reader, 5)
    replay = await connect(http, gateway, ALICE, last_id=ids[1])
    assert [e.id for e in await take(replay, 3)] == ids[2:]
    by_query = await http.get(f"{gateway.url}/v1/events?last_event_id={ids[3]}", headers=ALICE)
    assert [e.id for e in await take(EventReader(by_query), 1)] == ids[4:]


async def test_two_connections_of_a_user_each_get_every_message_once(gateway, http):
    a, b = await connect(http, gateway, ALICE), await connect(http, gateway, ALICE)
    ids = [await publish(http, gateway, "alice", i) for i in range(10)]
    assert [e.id for e in await take(a, 10)] == ids
    assert [e.id for e in await take(b, 10)] == ids


async def test_one_user_never_sees_another_users_messages(gateway, http):
    bob = await connect(http, gateway, BOB)
    for i in range(5):
        await publish(http, gateway, "alice", f"for alice {i}")
    mine = await publish(http, gateway, "bob", "for bob")
    events = await take(bob, 1)
    assert [e.id for e in events] == [mine] and json.loads(events[0].data) == "for bob"
    # Replaying from the very first id of alice's still yields nothing of hers.
    assert "for alice" not in bytes(bob.raw).decode()


async def test_heartbeats_keep_an_idle_channel_open(gateway, http):
    reader = await connect(http, gateway, ALICE)
    await reader.next_comment_or_event()
    assert reader.comments == ["ping"] and not reader.events


async def test_the_subscription_is_live_before_the_head_arrives(gateway, http):
    for i in range(20):  # a publish right after the head must never be missed
        response = await http.get(f"{gateway.url}/v1/events", headers=BOB)
        message_id = await publish(http, gateway, "bob", i)
        assert [e.id for e in await take(EventReader(response), 1)][-1] == message_id
        response.close()


async def test_messages_older_than_the_retention_are_not_delivered(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS, admin_keys=("admin-key",), events_retention=0.3)
    await publish(http, gateway, "alice", "too old")
    await asyncio.sleep(0.5)  # let the retention run out
    fresh = await publish(http, gateway, "alice", "fresh")
    reader = await connect(http, gateway, ALICE)
    events = await take(reader, 1)
    assert [e.id for e in events] == [fresh]


async def test_only_the_newest_messages_are_kept(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS, admin_keys=("admin-key",), events_max=3)
    ids = [await publish(http, gateway, "alice", i) for i in range(30)]
    reader = await connect(http, gateway, ALICE)
    assert [e.id for e in await take(reader, 3)] == ids[-3:]


async def test_a_session_cookie_opens_the_channel(gateway, http):
    login = await http.post(f"{gateway.url}/v1/session", headers=ALICE)
    cookie = login.headers["Set-Cookie"].split(";")[0]
    reader = await connect(http, gateway, {"Cookie": cookie})
    message_id = await publish(http, gateway, "alice", "via cookie")
    assert [e.id for e in await take(reader, 1)] == [message_id]


class TestBadInput:
    async def test_publishing_needs_an_admin_key(self, gateway, http):
        body = {"user": "alice", "data": 1}
        no_key = await http.post(f"{gateway.url}/v1/events", json=body)
        assert (await error_of(no_key, 401))["code"] == "missing_api_key"
        wrong = await http.post(f"{gateway.url}/v1/events", json=body, headers={"Authorization": "Bearer nope"})
        assert (await error_of(wrong, 401))["code"] == "invalid_api_key"
        user_key = await http.post(f"{gateway.url}/v1/events", json=body, headers=ALICE)
        assert (await error_of(user_key, 403))["code"] == "admin_key_required"

    async def test_no_admin_key_configured(self, start_gateway, http):
        gateway = start_gateway(api_keys=KEYS)
        response = await http.post(f"{gateway.url}/v1/events", json={"user": "alice", "data": 1}, headers=ALICE)
        assert (await error_of(response, 403))["code"] == "admin_keys_not_configured"

    async def test_open_dev_mode_publishes_without_keys(self, start_gateway, http):
        gateway = start_gateway()
        response = await http.post(f"{gateway.url}/v1/events", json={"user": "anonymous", "data": 1})
        assert response.status == 202

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            (b"{oops", None),
            (b"[1]", None),
            (b'{"data": 1}', "user"),
            (b'{"user": 5, "data": 1}', "user"),
            (b'{"user": "", "data": 1}', "user"),
            (b'{"user": "alice"}', "data"),
            (b'{"user": "alice", "event": "x\\ndata: forged", "data": 1}', "event"),
            (b'{"user": "alice", "event": "a\\rb", "data": 1}', "event"),
            (b'{"user": "alice", "event": "", "data": 1}', "event"),
            (b'{"user": "alice", "event": 7, "data": 1}', "event"),
        ],
    )
    async def test_bad_publish_bodies(self, gateway, http, body, param):
        response = await http.post(f"{gateway.url}/v1/events", data=body, headers=ADMIN)
        assert (await error_of(response, 400))["param"] == param

    @pytest.mark.parametrize("last_id", ["x", "1-", "-1", "12:3", "1-2-3", "0-99999999999999999999",
                                         "18446744073709551616-0", "123456789012345678901-0"])
    async def test_malformed_last_event_id(self, gateway, http, last_id):
        response = await http.get(f"{gateway.url}/v1/events", headers={**ALICE, "Last-Event-ID": last_id})
        assert (await error_of(response, 400))["code"] == "invalid_last_event_id"

    async def test_the_channel_needs_a_user(self, gateway, http):
        response = await http.get(f"{gateway.url}/v1/events")
        assert (await error_of(response, 401))["code"] == "missing_api_key"


async def test_a_thousand_subscribers_get_a_burst_in_order(start_gateway, http):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 4096, "the test needs file descriptors for 2,000 sockets"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    users = [f"user{i}" for i in range(10)]
    gateway = start_gateway(api_keys={f"k{u}": u for u in users}, admin_keys=("admin-key",))
    readers = await asyncio.gather(*(connect(http, gateway, {"Authorization": f"Bearer k{users[i % 10]}"})
                                     for i in range(1000)))
    sent = {user: [] for user in users}
    for n in range(100):
        for user in users:
            sent[user].append(await publish(http, gateway, user, {"n": n}))

    async def receive(i: int, reader: EventReader) -> bool:
        events = await take(reader, 100)
        return [e.id for e in events] == sent[users[i % 10]] and [json.loads(e.data)["n"] for e in events] == list(range(100))

    results = await asyncio.gather(*(receive(i, r) for i, r in enumerate(readers)))
    assert all(results), f"{results.count(False)} subscribers got a wrong sequence"
    for reader in readers:
        reader.response.close()
