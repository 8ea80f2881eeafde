"""The programs as users run them: `sse_server.py`, `python -m sse_gateway.mock_upstream`, `curl -N`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from support import EventReader, Process, chat_body, content_of, stream_chat

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


async def start_mock(programs, *args: str) -> tuple[Process, str]:
    mock = await programs(PYTHON, "-m", "sse_gateway.mock_upstream", "--port=0", *args)
    return mock, (await mock.wait_for_line(r"listening on (http://\S+/v1)")).group(1)


async def start_server(programs, *args: str, env: dict[str, str] | None = None) -> tuple[Process, str]:
    server = await programs(PYTHON, str(REPO / "sse_server.py"), "--port=0", *args, env=env)
    return server, (await server.wait_for_line(r"listening on (http://[\d.]+:\d+)")).group(1)


async def test_gateway_and_mock_model_as_separate_programs(programs, http):
    _mock, mock_url = await start_mock(programs, "--token-delay=0.01")
    server, url = await start_server(
        programs, f"--upstream-url={mock_url}", env={"SSE_API_KEYS": "prog-key:prog-user", "SSE_HEARTBEAT_INTERVAL": "1"}
    )
    denied = await http.post(f"{url}/v1/chat/completions", json=chat_body())
    assert denied.status == 401
    response, reader = await stream_chat(
        http, url, chat_body("two real processes"), headers={"Authorization": "Bearer prog-key"}
    )
    assert response.status == 200 and content_of(reader.events) == "two real processes"
    assert await server.stop() == 0
    assert any("stopped" in line for line in server.lines)
    assert not any("prog-key" in line for line in server.lines)


async def test_embedded_mock_is_the_default(programs, http):
    server, url = await start_server(programs, "--mock-token-delay=0")
    await server.wait_for_line("OPEN DEV MODE")  # logged just after the listening line
    models = await (await http.get(f"{url}/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["mock-echo", "mock-count"]
    _response, reader = await stream_chat(http, url, chat_body("no key, no other server"))
    assert content_of(reader.events) == "no key, no other server"
    assert await server.stop(signal.SIGINT) == 0


async def test_sigterm_refuses_new_connections_and_drains_running_streams(programs, http):
    server, url = await start_server(programs, "--mock-token-delay=0.05", "--drain-timeout=20")
    text = " ".join(f"w{i}" for i in range(30))
    response = await http.post(f"{url}/v1/chat/completions", json=chat_body(text))
    reader = EventReader(response)
    assert await reader.next_event() is not None
    server.proc.send_signal(signal.SIGTERM)
    await server.wait_for_line(r"draining 1 running stream")
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as fresh:  # a new connection, not a pooled one
            await fresh.get(f"{url}/healthz")
    await reader.read_all()
    assert content_of(reader.events) == text and reader.events[-1].data == "[DONE]"
    assert await server.stop(sig=None) == 0


async def test_help_lists_every_flag_with_its_environment_variable(programs):
    proc = await asyncio.create_subprocess_exec(
        PYTHON, str(REPO / "sse_server.py"), "--help", stdout=asyncio.subprocess.PIPE
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0
    for flag in ("address", "port", "upstream-url", "upstream-api-key", "redis-url", "api-keys", "admin-keys",
                 "cors-origins", "heartbeat-interval", "resume-grace", "mock-token-delay",
                 "upstream-connect-timeout", "upstream-idle-timeout", "max-body-size", "drain-timeout",
                 "session-secret", "session-ttl", "ticket-ttl", "stream-retention", "stream-max-events", "retry-ms",
                 "events-retention", "events-max", "system-prompt", "trust-proxy", "models",
                 "requests-per-minute", "tokens-per-day", "concurrent-streams", "policy", "prices", "usage-db",
                 "max-connections", "max-stream-lifetime", "max-messages", "max-message-size", "max-tokens",
                 "write-timeout", "processes", "log-format"):
        assert f"--{flag}" in out
        assert "SSE_" + flag.upper().replace("-", "_") in out


async def test_a_bad_flag_stops_the_program_with_status_2(programs):
    server = await programs(PYTHON, str(REPO / "sse_server.py"), "--heartbeat-interval=-1")
    assert await server.stop(sig=None) == 2
    assert any("--heartbeat-interval" in line for line in server.lines)


async def test_curl_prints_frames_as_they_are_generated(gateway, mock_model):
    text = " ".join(f"t{i}" for i in range(40))
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sN", "-X", "POST", f"{gateway.url}/v1/chat/completions",
        "-H", "Content-Type: application/json", "-d", json.dumps(chat_body(text, mock_token_delay=0.03)),
        stdout=asyncio.subprocess.PIPE,
    )
    lines = []
    progress_seen = None
    async for raw in curl.stdout:
        line = raw.decode().rstrip("\n")
        lines.append(line)
        if progress_seen is None and line.startswith("data: {") and '"content":"t' in line:
            record = mock_model.find(text)
            progress_seen = (record.state, record.chunks_sent)
    assert await curl.wait() == 0
    # The first word reached curl while the model was still generating the rest.
    assert progress_seen is not None and progress_seen[0] == "open" and progress_seen[1] < 40
    assert lines[0] == "retry: 3000"
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    words = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1]]
    assert "".join(words) == text
