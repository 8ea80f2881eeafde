"""One shard of a Redis Cluster dying, and coming back (issue: Redis Cluster).

A dedicated three-master cluster of real redis-server processes (append-only, fsynced on every
write); one master is killed with SIGKILL mid-stream. Streams and push channels whose slots live
on the other shards must not notice; streams on the dead shard end with the same clear error
frame as with one Redis; once the master is started again on its port and folder, its slots
serve again without a gateway restart.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import RedisClusterServers
from support import EventReader, chat_body, content_of
from test_push import take
from test_redis_faults import ADMIN, ALICE, KEYS, ends_outside_the_log, error_code

KEYS = {**KEYS, **{f"k-user{i}": f"user{i}" for i in range(100)}}  # users to place on chosen shards


@pytest.fixture
def crashable_cluster(tmp_path):
    servers = RedisClusterServers(tmp_path).start()
    yield servers
    servers.kill()


@pytest.fixture
def gateway(crashable_cluster, start_gateway):  # the cluster first: it outlives the gateway
    return start_gateway(redis_url=crashable_cluster.url, api_keys=KEYS, admin_keys=("admin-key",),
                         heartbeat_interval=0.5)


def user_on(cluster: RedisClusterServers, node, *, other: bool = False) -> str:
    """A user name whose push channel lives on `node` (or, with `other`, anywhere else)."""
    for i in range(100):  # 100 users: all on one shard of three has odds of 3 in 10**47
        name = f"user{i}"
        if (cluster.owner(f"sse:{{user:{name}}}") is node) != other:
            return name
    raise AssertionError("no such user among 100")


async def test_a_dead_shard_ends_only_its_own_streams(gateway, crashable_cluster, http):
    words = [f"w{i}" for i in range(150)]
    text = " ".join(words)
    readers: list[tuple[str, EventReader]] = []
    victim = None
    while victim is None or all(crashable_cluster.owner(f"sse:{{stream:{sid}}}") is victim for sid, _ in readers):
        response = await http.post(f"{gateway.url}/v1/chat/completions", headers=ALICE,
                                   json=chat_body(text, mock_token_delay=0.02))
        assert response.status == 200
        readers.append((response.headers["X-Stream-Id"], EventReader(response)))
        victim = victim or crashable_cluster.owner(f"sse:{{stream:{readers[0][0]}}}")
    for _sid, reader in readers:
        await take(reader, 3)
    victim.kill()
    for sid, reader in readers:
        events = await asyncio.wait_for(reader.read_all(), timeout=30)
        if crashable_cluster.owner(f"sse:{{stream:{sid}}}") is victim:
            assert error_code(events[-2]) == "store_unavailable" and events[-1].data == "[DONE]"
            assert ends_outside_the_log(reader)
        else:  # untouched: every word, in order, and a clean end
            assert content_of(events) == text and events[-1].data == "[DONE]"


async def test_a_shard_that_hangs_holds_up_only_its_own_streams(gateway, crashable_cluster, http):
    # Each shard has a writer of its own: while one primary hangs (SIGSTOP), the streams on the
    # others go on to their end; the hung shard's end with an error once its reply is overdue.
    text = " ".join(f"w{i}" for i in range(60))
    readers: list[tuple[str, EventReader]] = []
    victim = None
    while victim is None or all(crashable_cluster.owner(f"sse:{{stream:{sid}}}") is victim for sid, _ in readers):
        response = await http.post(f"{gateway.url}/v1/chat/completions", headers=ALICE,
                                   json=chat_body(text, mock_token_delay=0.02))
        readers.append((response.headers["X-Stream-Id"], EventReader(response)))
        victim = victim or crashable_cluster.owner(f"sse:{{stream:{readers[0][0]}}}")
    for _sid, reader in readers:
        await take(reader, 3)
    on_victim = {sid: reader for sid, reader in readers if crashable_cluster.owner(f"sse:{{stream:{sid}}}") is victim}
    victim.pause()
    try:
        for sid, reader in readers:
            if sid not in on_victim:
                events = await asyncio.wait_for(reader.read_all(), timeout=30)
                assert content_of(events) == text and events[-1].data == "[DONE]"
        assert (await http.get(f"{gateway.url}/healthz")).status == 200  # the other shards answer
        for sid in on_victim:  # still waiting for their shard: nothing has failed them yet
            local = gateway.services.store.logs.local(sid)
            assert local is not None and local.failure is None and not local.ended
        for reader in on_victim.values():
            events = await asyncio.wait_for(reader.read_all(), timeout=30)
            assert error_code(events[-2]) == "store_unavailable" and events[-1].data == "[DONE]"
    finally:
        victim.resume()


async def test_push_on_the_other_shards_goes_on_and_the_dead_one_comes_back(gateway, crashable_cluster, http):
    masters = crashable_cluster.masters()
    victim = masters[0]
    doomed, spared = user_on(crashable_cluster, victim), user_on(crashable_cluster, victim, other=True)
    channels = {user: EventReader(await http.get(f"{gateway.url}/v1/events", headers={"Authorization": f"Bearer k-{user}"}))
                for user in (doomed, spared)}
    for user, channel in channels.items():
        before = await http.post(f"{gateway.url}/v1/events", json={"user": user, "data": "before"}, headers=ADMIN)
        assert before.status == 202
        assert [json.loads(e.data) for e in await take(channel, 1)] == ["before"]
    victim.kill()

    # The other shard delivers at once; the dead one's user is told 503, nothing is half-written.
    sent = await http.post(f"{gateway.url}/v1/events", json={"user": spared, "data": "during"}, headers=ADMIN)
    assert sent.status == 202
    assert [json.loads(e.data) for e in await take(channels[spared], 1)] == ["during"]
    refused = await http.post(f"{gateway.url}/v1/events", json={"user": doomed, "data": "lost"}, headers=ADMIN)
    assert refused.status == 503
    assert (await http.get(f"{gateway.url}/healthz")).status == 200  # the instance still serves
    heartbeats = len(channels[doomed].comments)  # the dead shard's channel rides it out on heartbeats
    while len(channels[doomed].comments) < heartbeats + 2:
        await asyncio.wait_for(channels[doomed].next_comment_or_event(), timeout=5)
    assert not channels[doomed].eof

    # The master comes back on its port and folder: its slots serve again, its channel delivers.
    victim.start()
    crashable_cluster.wait_until_ok(crashable_cluster.masters())
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # until the gateway's client has reconnected to the node (its first try may still fail)
        again = await http.post(f"{gateway.url}/v1/events", json={"user": doomed, "data": "after"}, headers=ADMIN)
        if again.status == 202:
            break
        assert again.status == 503 and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert [json.loads(e.data) for e in await take(channels[doomed], 1)] == ["after"]


@pytest.fixture
def replicated_cluster(tmp_path):
    servers = RedisClusterServers(tmp_path, masters=3, replicas=1).start()
    yield servers
    servers.kill()


async def test_a_replica_takes_over_and_the_gateway_follows_it(replicated_cluster, start_gateway, http):
    gateway = start_gateway(redis_url=replicated_cluster.url, api_keys=KEYS, admin_keys=("admin-key",),
                            heartbeat_interval=0.5)
    victim = replicated_cluster.masters()[0]
    user = user_on(replicated_cluster, victim)
    channel = EventReader(await http.get(f"{gateway.url}/v1/events", headers={"Authorization": f"Bearer k-{user}"}))
    before = await http.post(f"{gateway.url}/v1/events", json={"user": user, "data": "before"}, headers=ADMIN)
    assert [json.loads(e.data) for e in await take(channel, 1)] == ["before"] and before.status == 202

    victim.kill()
    replicated_cluster.wait_for_failover(victim)  # a replica has been promoted in its place
    assert replicated_cluster.owner(f"sse:{{user:{user}}}") is not victim

    # The same push channel, still open, now delivers from the new primary.
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # until the gateway's clients have learnt the new primary
        after = await http.post(f"{gateway.url}/v1/events", json={"user": user, "data": "after"}, headers=ADMIN)
        if after.status == 202:
            break
        assert after.status == 503 and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert [json.loads(e.data) for e in await take(channel, 1)] == ["after"]

    # New streams on every shard, the promoted one included, stream whole and resume elsewhere.
    promoted = replicated_cluster.owner(f"sse:{{user:{user}}}")
    other = start_gateway(redis_url=replicated_cluster.url, api_keys=KEYS)
    while True:
        created = await http.post(f"{gateway.url}/v1/streams", json=chat_body("one two three"), headers=ALICE)
        assert created.status == 201
        stream_id = (await created.json())["id"]
        events = await EventReader(await http.get(f"{other.url}/v1/streams/{stream_id}", headers=ALICE)).read_all()
        assert content_of(events) == "one two three" and events[-1].data == "[DONE]"
        if replicated_cluster.owner(f"sse:{{stream:{stream_id}}}") is promoted:
            break


async def test_wake_ups_go_to_the_owning_shard_only(crashable_cluster, start_gateway, http):
    # A reader on another instance subscribes to the stream's channel: with sharded pub/sub, only
    # on the shard that holds the stream's keys, and never on the cluster-wide bus.
    import redis

    producer, elsewhere = (start_gateway(redis_url=crashable_cluster.url, api_keys=KEYS) for _ in range(2))
    created = await http.post(f"{producer.url}/v1/streams", json=chat_body("a b c d", mock_first_token_delay=60),
                              headers=ALICE)
    stream_id = (await created.json())["id"]
    reader = EventReader(await http.get(f"{elsewhere.url}/v1/streams/{stream_id}", headers=ALICE))
    channel = f"sse:{{stream:{stream_id}}}"
    owner = crashable_cluster.owner(channel)

    def sharded_subscribers(node) -> int:
        with redis.Redis(port=node.port) as client:
            return client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]

    while sharded_subscribers(owner) == 0:  # the reader subscribes just after its head went out
        await asyncio.sleep(0.02)
    assert sharded_subscribers(owner) == 1
    for node in crashable_cluster.masters():
        if node is not owner:
            assert sharded_subscribers(node) == 0
        with redis.Redis(port=node.port) as client:
            assert client.execute_command("PUBSUB", "NUMSUB", channel)[1] == 0  # nothing cluster-wide
    assert (await http.delete(f"{producer.url}/v1/streams/{stream_id}", headers=ALICE)).status in (200, 202, 204)
    assert (await reader.read_all())[-1].data == "[DONE]"
