"""Half-open and slow clients, and a process out of file descriptors: real sockets, and the real
program under `prlimit --nofile`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from support import EventReader, chat_body, content_of

REPO = Path(__file__).resolve().parents[1]


async def closed_by_the_gateway(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(), 20)
    except ConnectionResetError:
        pass
    return reader.at_eof()


async def test_a_request_head_never_finished_is_dropped_after_the_header_timeout(start_gateway):
    gateway = start_gateway(header_timeout=0.5)
    address = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert await closed_by_the_gateway(reader)
    writer.close()


async def test_a_body_never_finished_is_dropped_after_the_body_timeout(start_gateway):
    gateway = start_gateway(body_timeout=0.5)
    address = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\":")  # 10 of the 100 bytes announced
    assert await closed_by_the_gateway(reader)
    writer.close()


async def test_out_of_file_descriptors_running_streams_go_on_and_the_log_stays_short(programs, http):
    server = await programs("prlimit", "--nofile=128:128", sys.executable, str(REPO / "sse_server.py"), "--port=0",
                            "--header-timeout=60")
    url = (await server.wait_for_line(r"listening on (http://[\d.]+:\d+)")).group(1)
    text = " ".join(f"w{i}" for i in range(60))
    response = await http.post(f"{url}/v1/chat/completions", json=chat_body(text, mock_token_delay=0.05))
    stream = EventReader(response)
    await stream.next_event()
    address = urlsplit(url)
    flood = [await asyncio.open_connection(address.hostname, address.port) for _ in range(300)]
    for _reader, writer in flood:
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # half a request each: held until the header timeout
    await server.wait_for_line("cannot accept connections")
    assert content_of(await stream.read_all()) == text  # the running stream went on to its end
    for _reader, writer in flood:
        writer.close()
    async with aiohttp.ClientSession() as fresh:  # new connections, once the flood's are gone
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                if (await fresh.get(f"{url}/healthz")).status == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "/healthz never answered again"
            await asyncio.sleep(0.1)
    assert await server.stop() == 0
    assert sum("cannot accept connections" in line for line in server.lines) <= 2  # one line per 10 s
    assert not any("Traceback" in line for line in server.lines)
