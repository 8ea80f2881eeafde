"""Metrics, structured logs, and readers too slow to keep up."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tracemalloc
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support import EventReader, chat_body, stream_chat

REPO = Path(__file__).resolve().parents[1]


async def scrape(http, gateway) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = await http.get(f"{gateway.url}/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_time_to_first_token_counts_the_first_content_not_the_role_chunk(gateway, http):
    before = await scrape(http, gateway)
    # The mock sends the role chunk at once and the first word 0.4 s later.
    await stream_chat(http, gateway.url, chat_body("late words", mock_first_token_delay=0, mock_token_delay=0.4))
    await gateway.services.streams.wait_idle(5)
    after = await scrape(http, gateway)
    assert moved(before, after, "sse_time_to_first_token_seconds_count") == 1
    assert moved(before, after, "sse_time_to_first_token_seconds_sum") >= 0.4


async def test_metrics_parse_and_move_as_the_gateway_works(start_gateway, http, closed_port):
    gateway = start_gateway(heartbeat_interval=0.2, requests_per_minute=4)
    before = await scrape(http, gateway)
    _response, reader = await stream_chat(http, gateway.url, chat_body("one two three", mock_first_token_delay=0.5, mock_token_delay=0.02))
    frames = len(reader.events)
    await gateway.services.streams.wait_idle(5)
    after = await scrape(http, gateway)
    assert moved(before, after, "sse_frames_relayed_total") == frames
    assert moved(before, after, "sse_bytes_relayed_total") == len(reader.raw)
    assert moved(before, after, "sse_heartbeats_sent_total") == len(reader.comments) >= 2
    assert moved(before, after, "sse_time_to_first_token_seconds_count") == 1
    assert moved(before, after, "sse_time_to_first_token_seconds_sum") >= 0.5
    assert moved(before, after, "sse_inter_token_gap_seconds_count") >= 3
    assert after[("sse_open_connections", ())] == 0 and after[("sse_running_streams", ())] == 0

    # A client that leaves, a stop, a refused upstream, a limit: each has its counter.
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("x " * 100, mock_token_delay=0.05))
    stream_id = response.headers["X-Stream-Id"]
    await EventReader(response).next_event()
    during = await scrape(http, gateway)
    assert during[("sse_open_connections", ())] == 1 and during[("sse_running_streams", ())] == 1
    response.close()
    await http.delete(f"{gateway.url}/v1/streams/{stream_id}")
    refused = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port}/v1")
    await stream_chat(http, refused.url, chat_body())
    for _ in range(3):
        await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body())
    await gateway.services.streams.wait_idle(5)
    after = await scrape(http, gateway)
    assert moved(before, after, "sse_client_disconnects_total", reason="client_gone") == 1
    assert moved(before, after, "sse_stream_cancellations_total", reason="stop") == 1
    assert moved(before, after, "sse_limit_rejections_total", limit="requests_per_minute") >= 1
    unreachable = await scrape(http, refused)
    assert unreachable[("sse_upstream_errors_total", (("kind", "upstream_unavailable"),))] == 1


async def test_a_reader_that_stops_reading_is_cut_off_without_holding_others_or_memory(start_gateway, http):
    gateway = start_gateway(write_timeout=1.0)
    tokens = 20_000  # some 4 MB of frames: far more than socket buffers hold
    created = await (await http.post(f"{gateway.url}/v1/streams",
                                     json=chat_body(model="mock-count", max_tokens=tokens))).json()
    # A client that asks and then never reads, with a small receive buffer: a paused tab, say.
    paused = socket.socket()
    paused.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    paused.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(paused, ("127.0.0.1", gateway.port))
    await loop.sock_sendall(paused, f"GET {created['url']} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
    tracemalloc.start()
    try:
        response = await http.get(f"{gateway.url}{created['url']}")
        events = await EventReader(response).read_all()
        assert len(events) == tokens + 3 and events[-1].data == "[DONE]"  # the other reader had it all
        held, _peak = tracemalloc.get_traced_memory()
        buffers = sum(stat.size for stat in tracemalloc.take_snapshot().statistics("filename")
                      if stat.traceback[0].filename.endswith("tornado/iostream.py"))
    finally:
        tracemalloc.stop()
    assert buffers < 1_000_000, f"{buffers} bytes in write buffers"  # one batch at most, not the stream

    async def cut_off() -> None:
        while not (await scrape(http, gateway)).get(("sse_client_disconnects_total", (("reason", "slow_reader"),))):
            await asyncio.sleep(0.1)  # no event tells the test; the counter does
    await asyncio.wait_for(cut_off(), timeout=10)
    received = bytearray()
    while data := await asyncio.wait_for(loop.sock_recv(paused, 65536), timeout=10):
        received += data
    paused.close()
    assert b"data: [DONE]" not in received and len(received) < 4_000_000  # cut off mid-stream


async def test_json_logs_carry_request_stream_and_user_and_never_a_key(programs, http):
    server = await programs(
        sys.executable, str(REPO / "sse_server.py"), "--port=0", "--log-format=json", "--mock-token-delay=0",
        "--api-keys=client-key-SECRET:alice", "--upstream-api-key=sk-upstream-SECRET", "--admin-keys=admin-SECRET",
    )
    url = (await server.wait_for_line(r"listening on (http://[\d.]+:\d+)")).group(1)
    response, _reader = await stream_chat(http, url, chat_body("logged"), headers={"Authorization": "Bearer client-key-SECRET"})
    stream_id = response.headers["X-Stream-Id"]
    await http.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong-SECRET"})
    assert await server.stop() == 0
    entries = [json.loads(line) for line in server.lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "request_id", "stream_id", "user"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "sse_gateway.access" and "/v1/chat/completions" in e["message"]]
    assert access[0]["user"] == "alice" and access[0]["stream_id"] == stream_id and access[0]["request_id"] != "-"
    assert "SECRET" not in "\n".join(server.lines)


async def test_retained_bytes_are_a_metric(start_gateway, http):
    gateway = start_gateway(stream_retention_bytes=10_000_000)
    assert (await scrape(http, gateway))[("sse_retained_bytes", ())] == 0
    await stream_chat(http, gateway.url, chat_body("kept for a resume"))
    await gateway.services.streams.wait_idle(5)
    retained = (await scrape(http, gateway))[("sse_retained_bytes", ())]
    assert retained == gateway.services.store.logs.retained_bytes > len("kept for a resume")
