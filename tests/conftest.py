"""Test harness: real servers on loopback, started per test on free ports and stopped after.

- `mock_model`: the mock model as a real aiohttp HTTP server.
- `start_gateway(**settings)`: the gateway's real Tornado HTTP server (as `make_app` and
  `make_server` build it for production), pointed at the mock model unless told otherwise.
- `http`: an aiohttp client session for the test.

Everything runs on pytest-tornasync's per-test IOLoop; async tests run on it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tornado.testing import bind_unused_port

from sse_gateway.config import Settings
from sse_gateway.mock_upstream import MockModel
from sse_gateway.services import Services
from sse_server import GatewayApplication, make_app, make_server


class Gateway:
    """A running gateway: `url` is its base (no trailing slash)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: GatewayApplication = make_app(settings)
        self.server = make_server(self.app)
        sock, self.port = bind_unused_port()
        self.server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def services(self) -> Services:
        return self.app.services

    async def close(self) -> None:
        self.server.stop()
        await self.app.services.close()
        await self.server.close_all_connections()


@pytest.fixture
def mock_model(io_loop) -> Iterator[MockModel]:
    model = MockModel(token_delay=0.0)
    io_loop.run_sync(model.start)
    yield model
    io_loop.run_sync(model.close)


@pytest.fixture
def start_gateway(io_loop, mock_model: MockModel) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(**overrides: Any) -> Gateway:
        fields: dict[str, Any] = {"upstream_url": mock_model.base_url, "mock_token_delay": 0.0}
        fields.update(overrides)
        gateway = Gateway(dataclasses.replace(Settings(), **fields))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        io_loop.run_sync(gateway.close)


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


@pytest.fixture
def http(io_loop) -> Iterator[aiohttp.ClientSession]:
    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    session = io_loop.run_sync(open_session)
    yield session
    io_loop.run_sync(session.close)


@pytest.fixture
def scripted_upstream(io_loop) -> Iterator[Callable[..., Awaitable[str]]]:
    """`await scripted_upstream(handler)` starts an upstream answering chat requests with `handler`.

    For faults the mock model has no switch for: wrong content types, malformed chunks, a
    stream that ends without [DONE]. Returns the base URL (ending in /v1).
    """
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Any]) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/v1"

    yield start
    for runner in runners:
        io_loop.run_sync(runner.cleanup)


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    sock, port = bind_unused_port()
    sock.close()
    return port
