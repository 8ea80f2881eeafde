"""Several gateway processes on one Redis act as one gateway (DESIGN.md §4.2, §4.3).

Two real `sse_server.py` processes share a real redis-server; the mock model runs in the test,
so that what the upstream sees (a cancellation, say) can be observed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from support import EventReader, blocks, chat_body, content_of, node_client
from test_push import take

REPO = Path(__file__).resolve().parents[1]
KEYS = "key-alice:alice,key-bob:bob,key-carol:carol"
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
CAROL = {"Authorization": "Bearer key-carol"}
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture
def cluster(programs, mock_model, redis_url):
    """`await cluster(n, *flags)`: n gateway processes on the test Redis; their base URLs."""

    async def start(count: int = 2, *flags: str) -> list[str]:
        urls = []
        for _ in range(count):
            server = await programs(
                sys.executable, str(REPO / "sse_server.py"), "--port=0", f"--redis-url={redis_url}",
                f"--upstream-url={mock_model.base_url}", f"--api-keys={KEYS}", "--admin-keys=admin-key",
                "--session-secret=shared-between-instances", "--heartbeat-interval=1", *flags,
            )
            urls.append((await server.wait_for_line(r"listening on (http://[\d.]+:\d+)")).group(1))
            start.servers.append(server)
        return urls

    start.servers = []  # the processes, in the order of their URLs
    return start


async def read_events(http, url: str, headers, last_id: str | None = None, count: int | None = None) -> list:
    headers = {**headers, **({"Last-Event-ID": last_id} if last_id else {})}
    response = await http.get(url, headers=headers)
    assert response.status == 200, await response.text()
    reader = EventReader(response)
    events = await reader.read_all() if count is None else await take(reader, count)
    response.close()
    return events


async def test_a_stream_started_on_one_instance_resumes_on_the_other(cluster, http):
    a, b = await cluster(2)
    text = " ".join(f"w{i}" for i in range(60))
    response = await http.post(f"{a}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)
    stream_id = response.headers["X-Stream-Id"]
    reader = EventReader(response)
    first = await take(reader, 5)
    response.close()  # the phone loses its connection; the reconnect lands on the other instance
    rest = await read_events(http, f"{b}/v1/streams/{stream_id}", ALICE, first[-1].id)
    assert content_of(first + rest) == text
    assert [e.id for e in first + rest] == [f"{stream_id}:{i}" for i in range(1, len(first) + len(rest) + 1)]
    # Any instance serves the same log.
    assert await read_events(http, f"{a}/v1/streams/{stream_id}", ALICE) == first + rest


async def test_the_ticket_and_the_session_work_on_every_instance(cluster, http):
    a, b = await cluster(2)
    created = await (await http.post(f"{a}/v1/streams", json=chat_body("ticket from a"), headers=ALICE)).json()
    assert content_of(await read_events(http, f"{b}{created['url']}", {})) == "ticket from a"
    login = await http.post(f"{a}/v1/session", headers=ALICE)
    cookie = {"Cookie": login.headers["Set-Cookie"].split(";")[0]}
    assert content_of(await read_events(http, f"{b}/v1/streams/{created['id']}", cookie)) == "ticket from a"


async def test_delete_on_one_instance_stops_the_producer_on_the_other(cluster, http, mock_model):
    a, b = await cluster(2)
    text = "long " * 300
    created = await (await http.post(f"{a}/v1/streams", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)).json()
    reader_b = EventReader(await http.get(f"{b}{created['url']}"))
    reader_a = EventReader(await http.get(f"{a}{created['url']}"))
    await take(reader_b, 3)
    await take(reader_a, 3)
    response = await http.delete(f"{b}/v1/streams/{created['id']}", headers=ALICE)
    assert response.status == 200 and (await response.json())["state"] == "cancelled"
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=2)
    assert record.state == "cancelled"
    ends = [await reader.read_all() for reader in (reader_a, reader_b)]
    assert ends[0][-1].data == ends[1][-1].data == "[DONE]"
    assert ends[0][-1].id == ends[1][-1].id


async def test_the_grace_counts_readers_on_every_instance(cluster, http, mock_model):
    a, b = await cluster(2, "--resume-grace=1")
    text = " ".join(f"w{i}" for i in range(150))  # 150 chunks 20 ms apart: 3 s of answer
    response = await http.post(f"{a}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)
    stream_id = response.headers["X-Stream-Id"]
    on_b = EventReader(await http.get(f"{b}/v1/streams/{stream_id}", headers=ALICE))
    await take(on_b, 2)
    response.close()  # the reader on A leaves; the one on B keeps the stream alive past the grace
    events = await on_b.read_all()
    assert content_of(events).strip().split()[-1] == "w149"
    assert mock_model.find(text).state == "finished"


async def test_a_stream_nobody_reads_anywhere_is_cancelled(cluster, http, mock_model):
    a, b = await cluster(2, "--resume-grace=1")
    text = " ".join(f"w{i}" for i in range(300))
    response = await http.post(f"{a}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.02), headers=ALICE)
    stream_id = response.headers["X-Stream-Id"]
    await read_events(http, f"{b}/v1/streams/{stream_id}", ALICE, count=2)  # comes and goes on B
    response.close()
    record = mock_model.find(text)
    await asyncio.wait_for(mock_model.wait_for(lambda: record.state != "open"), timeout=5)
    assert record.state == "cancelled"


async def wait_for_cursor(redis_url: str, user: str, message_id: str) -> None:
    """Until the user's push cursor is recorded as `message_id` (told by keyspace notifications)."""
    key = f"sse:{{user:{user}}}:cursor"
    client = await node_client(redis_url, key)
    try:
        await client.config_set("notify-keyspace-events", "K$")
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(f"__keyspace@0__:{key}")
            while (await client.get(key) or b"").decode() != message_id:
                await pubsub.get_message(timeout=1)
    finally:
        await client.aclose()


async def test_push_reaches_every_connection_of_a_user_on_every_instance(cluster, http, redis_url):
    a, b = await cluster(2)
    on_a = EventReader(await http.get(f"{a}/v1/events", headers=BOB))
    on_b = EventReader(await http.get(f"{b}/v1/events", headers=BOB))
    ids = []
    for i in range(10):
        response = await http.post(f"{(a, b)[i % 2]}/v1/events", json={"user": "bob", "data": i}, headers=ADMIN)
        assert response.status == 202
        ids.append((await response.json())["id"])
    assert [e.id for e in await take(on_a, 10)] == ids
    assert [e.id for e in await take(on_b, 10)] == ids
    # Alice, on either instance, sees none of it.
    alice = EventReader(await http.get(f"{b}/v1/events", headers=ALICE))
    mine = (await (await http.post(f"{a}/v1/events", json={"user": "alice", "data": "hi"}, headers=ADMIN)).json())["id"]
    assert [e.id for e in await take(alice, 1)] == [mine]
    # Messages while bob is away arrive when he comes back, on either instance.
    await wait_for_cursor(redis_url, "bob", ids[-1])
    on_a.response.close()
    on_b.response.close()
    away = (await (await http.post(f"{a}/v1/events", json={"user": "bob", "data": "away"}, headers=ADMIN)).json())["id"]
    back = EventReader(await http.get(f"{b}/v1/events", headers=BOB))
    assert [e.id for e in await take(back, 1)] == [away]


async def test_an_instance_that_dies_frees_what_it_held(cluster, http):
    """SIGKILL the instance producing a stream: within the lease (1 s here), its readers on the
    other instance get the end (producer_lost, outside the log), a resume gets it too, a DELETE
    ends another of its streams at once, the user's slot is free, and the usage is recorded."""
    a, b = await cluster(2, "--instance-lease=1", "--concurrent-streams=1")
    text = " ".join(f"w{i}" for i in range(200))
    created = await (await http.post(f"{a}/v1/streams", json=chat_body(text, mock_token_delay=0.1),
                                     headers=ALICE)).json()
    bobs = await (await http.post(f"{a}/v1/streams", json=chat_body(text, mock_token_delay=0.1),
                                  headers=BOB)).json()
    carols = await http.post(f"{a}/v1/streams", json=chat_body(text, mock_token_delay=0.1), headers=CAROL)
    assert carols.status == 201
    response = await http.get(f"{b}{created['url']}", headers=ALICE)
    assert response.status == 200
    reader = EventReader(response)
    await take(reader, 3)  # the stream is under way
    cluster.servers[0].proc.kill()  # SIGKILL: no drain, no goodbye

    try:
        await asyncio.wait_for(reader.read_all(), 20)
    except TimeoutError:
        raise AssertionError("\n".join(cluster.servers[1].lines)) from None
    events = reader.events
    error = json.loads(events[-2].data)["error"]
    assert error["code"] == "producer_lost" and events[-1].data == "[DONE]"
    assert not any(line.startswith("id:") for block in blocks(bytes(reader.raw))[-2:] for line in block)
    last = events[-3].id  # the last frame of the log: the end is outside it, so a resume stays exact
    response = await http.get(f"{b}/v1/streams/{created['id']}", headers={**ALICE, "Last-Event-ID": last})
    resumed = EventReader(response)
    await resumed.read_all()
    assert [e.data for e in resumed.events][-1] == "[DONE]"
    assert json.loads(resumed.events[-2].data)["error"]["code"] == "producer_lost"
    assert not any(line.startswith("id:") for block in blocks(bytes(resumed.raw)) for line in block)

    # Bob's stream had no reader: a DELETE on the living instance ends it at once.
    stopped = await http.delete(f"{b}/v1/streams/{bobs['id']}", headers=BOB)
    assert stopped.status == 200 and (await stopped.json())["state"] == "failed"

    # Carol's stream had no reader, and nobody asked about it: it is ended all the same, and
    # what it consumed is recorded (by the surviving instance's sweep).
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        usage = await (await http.get(f"{b}/v1/usage", headers=CAROL)).json()
        if [row["reason"] for row in usage["data"]] == ["producer_lost"]:
            break
        assert asyncio.get_running_loop().time() < deadline, usage
        await asyncio.sleep(0.1)
    # Alice's one slot is free again, and what her stream consumed is recorded, as an estimate.
    again = await http.post(f"{b}/v1/chat/completions", json=chat_body("again"), headers=ALICE)
    assert again.status == 200
    assert content_of(await EventReader(again).read_all()) == "again"
    usage = await (await http.get(f"{b}/v1/usage", headers=ALICE)).json()
    assert "producer_lost" in [row["reason"] for row in usage["data"]]
