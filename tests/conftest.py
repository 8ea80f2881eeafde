"""Test harness: real servers on loopback, started per test on free ports and stopped after.

- `mock_model`: the mock model as a real aiohttp HTTP server.
- `start_gateway(**settings)`: the gateway's real Tornado HTTP server (as `make_app` and
  `make_server` build it for production), pointed at the mock model unless told otherwise.
- `http`: an aiohttp client session for the test.
- `redis_url`: a real redis-server, and (the same tests again) a real three-master Redis Cluster
  of redis-server processes joined with `redis-cli --cluster create`; emptied for each test.

Everything runs on pytest-tornasync's per-test IOLoop; async tests run on it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import Process
from tornado.testing import bind_unused_port

from sse_gateway.config import Settings
from sse_gateway.mock_upstream import MockModel
from sse_gateway.page import INDEX
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


def _copy_lines(source: Any, path: Path) -> None:
    with path.open("ab") as sink:
        for line in source:
            sink.write(line)
            sink.flush()


class RedisServer:
    """A real redis-server on a free port, in its own folder, with append-only persistence
    fsynced on every write (so that anything acknowledged survives a kill). `cluster`: a node of
    a Redis Cluster (its bus on a second free port)."""

    def __init__(self, folder: Path, cluster: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        cluster_args: list[str] = []
        if not self.port:
            sock, self.port = bind_unused_port()
            sock.close()
        if self.cluster:
            # Without full coverage, the shards that are up serve their slots while one is down.
            bus, bus_port = bind_unused_port()
            bus.close()
            # A replica syncs at once (not after the default 5 s), so that it can take over from then on.
            cluster_args = ["--cluster-enabled", "yes", "--cluster-port", str(bus_port), "--cluster-config-file",
                            "nodes.conf", "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no",
                            "--repl-diskless-sync-delay", "0"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--loglevel", "notice", *cluster_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # blocks until redis-server says it is ready (or dies)
            if b"Ready to accept connections" in line:
                # The rest of its log goes to a file, so that a full pipe never stalls it.
                threading.Thread(target=_copy_lines, args=(self.proc.stdout, self.folder / "redis.log"),
                                 daemon=True).start()
                return self
        raise RuntimeError(f"redis-server did not start (exit {self.proc.wait()})")

    def kill(self) -> None:
        """Die at once, as in a crash (SIGKILL)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def pause(self) -> None:
        """Hang (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class RedisClusterServers:
    """A real Redis Cluster: `masters` redis-server processes (each with `replicas` replicas) on
    free loopback ports, joined with `redis-cli --cluster create`."""

    def __init__(self, folder: Path, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [RedisServer(folder / f"node{i}", cluster=True) for i in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, timeout=60,
        )
        self.wait_until_ok(self.nodes)
        self.wait_for_replicas()
        return self

    def wait_for_replicas(self, timeout: float = 60) -> None:
        """Until every replica has synced with its master (before, it could not take over)."""
        import time

        import redis

        deadline = time.monotonic() + timeout
        for node in self.nodes:
            with redis.Redis(port=node.port) as client:
                while (info := client.info("replication"))["role"] == "slave" and info["master_link_status"] != "up":
                    assert time.monotonic() < deadline, "a replica did not sync"
                    time.sleep(0.05)

    def wait_until_ok(self, nodes: list[RedisServer], timeout: float = 60) -> None:
        """Until every node says the cluster is ok and all slots are served (gossip converges)."""
        import time

        import redis

        deadline = time.monotonic() + timeout
        for node in nodes:
            with redis.Redis(port=node.port) as client:
                while True:
                    info = client.cluster("info")
                    if info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384:
                        break
                    assert time.monotonic() < deadline, f"cluster not ok: {info}"
                    time.sleep(0.05)

    def wait_for_failover(self, dead: RedisServer, timeout: float = 60) -> None:
        """Until a replica serves the slots of the `dead` master, as every node that is up sees it."""
        import time

        import redis

        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            with redis.Redis(port=node.port) as client:
                while True:
                    primaries = {int(primary[1]) for _start, _end, primary, *_ in client.cluster("slots")}
                    if dead.port not in primaries and client.cluster("info")["cluster_state"] == "ok":
                        break
                    assert time.monotonic() < deadline, "no replica took over"
                    time.sleep(0.05)

    def masters(self) -> list[RedisServer]:
        import redis

        found = []
        for node in self.nodes:
            if node.proc is None:
                continue
            with redis.Redis(port=node.port) as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
        return found

    def owner(self, key: str) -> RedisServer:
        """The master that serves `key`'s slot."""
        import redis

        with redis.Redis(port=self.masters()[0].port) as client:
            slot = client.cluster("keyslot", key)
            for start, end, primary, *_replicas in client.cluster("slots"):
                if start <= slot <= end:
                    port = int(primary[1])
        return next(node for node in self.nodes if node.port == port)

    def flush(self) -> None:
        import redis

        for node in self.masters():
            with redis.Redis(port=node.port) as client:
                client.flushall()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield servers
    servers.kill()


def store_url(request, kind: str) -> str:
    """The URL of a shared test store, emptied: "redis" one Redis, "cluster" a Redis Cluster."""
    servers = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster")
    servers.flush()
    return servers.url


@pytest.fixture(params=["redis", "cluster"])
def redis_url(request) -> str:
    """The shared test store, emptied for this test: one Redis, then a Redis Cluster."""
    return store_url(request, request.param)


@pytest.fixture
def backend() -> str:
    """The store behind the gateways of a test; modules parametrize it over memory, redis and cluster."""
    return "memory"


@pytest.fixture
def start_gateway(io_loop, mock_model: MockModel, backend: str, request, tmp_path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []
    shared_url = store_url(request, backend) if backend != "memory" else None

    def start(**overrides: Any) -> Gateway:
        fields: dict[str, Any] = {
            "upstream_url": mock_model.base_url,
            "mock_token_delay": 0.0,
            "redis_url": shared_url,
            "usage_db": str(tmp_path / f"usage{len(started)}.sqlite3"),
        }
        fields.update(overrides)
        gateway = Gateway(dataclasses.replace(Settings(), **fields))
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        io_loop.run_sync(gateway.close, timeout=60)  # a close that hangs fails the test, loudly


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


@pytest.fixture
def http(io_loop) -> Iterator[aiohttp.ClientSession]:
    async def open_session() -> aiohttp.ClientSession:
        # No connection limit: some tests hold a thousand streams open at once.
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=0))

    session = io_loop.run_sync(open_session)
    yield session
    io_loop.run_sync(session.close)


@pytest.fixture
def scripted_upstream(io_loop) -> Iterator[Callable[..., Awaitable[str]]]:
    """`await scripted_upstream(handler)` starts an upstream answering chat (and Responses API)
    requests with `handler`.

    For faults the mock model has no switch for: wrong content types, malformed chunks, a
    stream that ends without [DONE]. Returns the base URL (ending in /v1).
    """
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Any], models: Callable[[web.Request], Any] | None = None) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        app.router.add_post("/v1/responses", handler)  # the Responses API's requests, to the same script
        if models is not None:
            app.router.add_get("/v1/models", models)
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


class TcpRelay:
    """A TCP relay in front of a server, whose connections a test can break at will.

    It stands for the network between a browser and the gateway: `break_all()` resets every
    connection passing through it, as a flaky Wi-Fi would, while new ones are still accepted.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                self._writers.discard(writer)

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    def break_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.break_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
def relay(io_loop) -> Iterator[Callable[[int], Awaitable[TcpRelay]]]:
    """`await relay(port)`: a breakable TCP relay to a local port."""
    started: list[TcpRelay] = []

    async def start(port: int) -> TcpRelay:
        started.append(await TcpRelay(port).start())
        return started[-1]

    yield start
    for item in started:
        io_loop.run_sync(item.close)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


@pytest.fixture
def browser(io_loop):
    """Debian's headless Chromium, driven by Playwright."""
    from playwright.async_api import async_playwright

    async def launch():
        playwright = await async_playwright().start()
        return playwright, await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    playwright, chromium = io_loop.run_sync(launch)
    yield chromium

    async def stop() -> None:
        await chromium.close()
        await playwright.stop()

    io_loop.run_sync(stop)


@pytest.fixture(scope="session")
def built_page() -> Path:
    """The chat page as shipped in the package (built by `make page`); fails loudly when missing."""
    assert INDEX.exists(), "the chat page is missing from sse_gateway/static: run `make page`"
    return INDEX


@pytest.fixture
def artifacts(request) -> Path:
    """A folder for this test's screenshots and other artifacts (test-artifacts/<test name>)."""
    folder = Path(__file__).resolve().parents[1] / "test-artifacts" / re.sub(r"[^\w.-]", "_", request.node.name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def programs(io_loop, tmp_path):
    """Start programs with `await programs(argv...)`, in the test's folder (files they write, such
    as the usage database, stay there); they are killed after the test if still running."""
    started: list[Process] = []

    async def start(*argv: str, env: dict[str, str] | None = None) -> Process:
        process = Process(*argv, env={**os.environ, **(env or {})}, cwd=str(tmp_path))
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        process.kill()
        if process.proc is not None:
            io_loop.run_sync(process.proc.wait)


SHIPPED_NGINX_SITE = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


def shipped_nginx_site(upstream_ports: list[int], log_folder: Path, read_timeout: str | None = None) -> str:
    """deploy/nginx.conf with test ports and paths: its own directives, every one of them."""
    text = SHIPPED_NGINX_SITE.read_text()
    servers = "\n".join(f"    server 127.0.0.1:{port};" for port in upstream_ports)
    text, upstreams = re.subn(r"(?m)^(    server 127\.0\.0\.1:\d+;\n)+", servers + "\n", text)
    text, logs = re.subn(r"access_log /var/log/nginx/\S+", f"access_log {log_folder}/access.log", text)
    if read_timeout is not None:
        text = text.replace("proxy_read_timeout 60s;", f"proxy_read_timeout {read_timeout};")
    assert upstreams == 1 and logs == 1 and (read_timeout is None or f"proxy_read_timeout {read_timeout};" in text), \
        "deploy/nginx.conf no longer has the lines the tests adapt"
    return text


class NginxServer:
    """A real nginx serving `site` (server blocks etc., as in conf.d) on a free loopback port.

    The listening socket is bound here and handed to nginx (its NGINX variable, as for binary
    upgrades), so connections queue in the kernel until nginx accepts them: nothing to wait for.
    """

    def __init__(self, folder: Path, site: str) -> None:
        self.folder = folder
        self.sock, self.port = bind_unused_port()
        site = re.sub(r"listen \S+;", f"listen 127.0.0.1:{self.port};", site)
        (folder / "site.conf").write_text(site)
        temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the test's folders
        (folder / "nginx.conf").write_text(
            f"{user}\nworker_processes 1;\ndaemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log notice;\n"
            f"events {{ worker_connections 4096; }}\nhttp {{ {temp}\n include {folder}/site.conf; }}\n"
        )
        fd = self.sock.fileno()
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")],
            env={**os.environ, "NGINX": f"{fd};"}, pass_fds=[fd],
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.sock.close()


@pytest.fixture
def nginx(tmp_path) -> Iterator[Callable[[str], NginxServer]]:
    """`nginx(site)`: a running nginx with that site configuration."""
    started: list[NginxServer] = []

    def start(site: str) -> NginxServer:
        folder = tmp_path / f"nginx{len(started)}"
        folder.mkdir()
        started.append(NginxServer(folder, site))
        return started[-1]

    yield start
    for server in started:
        server.stop()
