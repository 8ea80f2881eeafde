"""Entry point: parse options -> Settings -> make_app() -> listen; clean shutdown (DESIGN.md §2, §3).

    python sse_server.py --port=8000 [--upstream-url=https://api.openai.com/v1 ...]

Every flag is also read from an `SSE_*` environment variable; `--help` lists them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

import tornado.httpserver
import tornado.netutil
import tornado.web
import uvloop
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from handlers import (
    ChatCompletionsHandler,
    EventsHandler,
    HealthHandler,
    IndexHandler,
    MetricsHandler,
    ModelsHandler,
    NotFoundHandler,
    ResponseCancelHandler,
    ResponseHandler,
    ResponsesHandler,
    SessionHandler,
    StreamHandler,
    StreamsHandler,
    UsageHandler,
)
from sse_gateway import logs
from sse_gateway.config import Settings, parse_settings
from sse_gateway.page import PAGE_DIR
from sse_gateway.services import Services

log = logging.getLogger("sse_gateway")

BACKLOG = 4096  # connections the kernel queues for us: a burst of reconnects waits there, not refused
# Connections accepted per turn of the event loop: a burst of new requests is taken in slices,
# so that the streams already running keep getting their frames on time in between. A turn takes
# ACCEPT_LEAST, or ACCEPT_RATE per millisecond since the last one if more (a loop busy with
# running streams turns less often, and must still keep up with new ones), at most ACCEPT_MOST.
ACCEPT_LEAST = 2
ACCEPT_RATE = 1.0
ACCEPT_MOST = 128
ACCEPT_BACKOFF = 0.1  # seconds accepting pauses while the process is out of file descriptors
OUT_OF_FILES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
OUT_OF_FILES_LOG_EVERY = 10.0  # seconds between log lines while out of file descriptors


class GatewayApplication(tornado.web.Application):
    services: Services


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One access line per request (a streamed response writes its own when it ends)."""
    logs.access(handler.get_status(), handler.request.method or "", handler.request.path, handler.request.request_time(),
                getattr(handler, "request_id", "-"), getattr(handler, "user", "-"), getattr(handler, "stream_id", "-"))


def make_app(settings: Settings, services: Services | None = None) -> GatewayApplication:
    """The Tornado application; every dependency is built here once and handed to handlers."""
    services = services or Services.build(settings)
    deps = {"services": services}
    app = GatewayApplication(
        [
            (r"/v1/chat/completions", ChatCompletionsHandler, deps),
            (r"/v1/responses", ResponsesHandler, deps),
            (r"/v1/responses/([A-Za-z0-9_-]{1,128})", ResponseHandler, deps),
            (r"/v1/responses/([A-Za-z0-9_-]{1,128})/cancel", ResponseCancelHandler, deps),
            (r"/v1/models", ModelsHandler, deps),
            (r"/v1/streams", StreamsHandler, deps),
            (r"/v1/streams/([A-Za-z0-9_-]{1,64})", StreamHandler, deps),
            (r"/v1/session", SessionHandler, deps),
            (r"/v1/events", EventsHandler, deps),
            (r"/v1/usage", UsageHandler, deps),
            (r"/metrics", MetricsHandler, deps),
            (r"/healthz", HealthHandler, deps),
            (r"/", IndexHandler, deps),
            # Built assets have content hashes in their names: they may be cached for good.
            (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": str(PAGE_DIR)}),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        # Signs session cookies. Without --session-secret, sessions end when the process does.
        cookie_secret=settings.session_secret or secrets.token_hex(32),
        compress_response=False,  # gzip would hold tokens back until a block fills
    )
    app.services = services
    return app


def make_server(app: GatewayApplication) -> tornado.httpserver.HTTPServer:
    settings = app.services.settings
    # xheaders only behind a proxy that sets X-Forwarded-* itself: anyone could forge them.
    return tornado.httpserver.HTTPServer(
        app, max_body_size=settings.max_body_size, xheaders=settings.trust_proxy,
        idle_connection_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
    )


def listen(server: tornado.httpserver.HTTPServer, sockets: list[socket.socket]) -> Callable[[], None]:
    """Serve connections from `sockets`, a few per turn of the loop (see ACCEPT_RATE; Tornado's
    own accept loop takes up to 128 at once); returns the function that stops listening.

    Out of file descriptors (EMFILE and the like), accepting pauses for ACCEPT_BACKOFF seconds
    at a time (new connections wait in the kernel's backlog, running streams go on) with one
    log line per OUT_OF_FILES_LOG_EVERY seconds, instead of a failed accept, and its traceback,
    on every turn of the loop.
    """
    io_loop = IOLoop.current()
    stopped = False
    out_of_files = logs.Throttled(log, OUT_OF_FILES_LOG_EVERY)

    def back_off(sock: socket.socket, handler: Callable[[int, int], None], exc: OSError) -> None:
        io_loop.remove_handler(sock)
        out_of_files.warning("cannot accept connections: %s; pausing %gs at a time", exc.strerror, ACCEPT_BACKOFF)

        def resume() -> None:
            if not stopped:
                io_loop.add_handler(sock, handler, IOLoop.READ)

        io_loop.call_later(ACCEPT_BACKOFF, resume)

    def accept(sock: socket.socket) -> Callable[[int, int], None]:
        last = time.monotonic()

        def ready(_fd: int, _events: int) -> None:
            nonlocal last
            now = time.monotonic()
            batch = min(ACCEPT_MOST, max(ACCEPT_LEAST, int((now - last) * 1000 * ACCEPT_RATE)))
            last = now
            for _ in range(batch):
                try:
                    connection, address = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue  # the client gave up while queued
                except OSError as exc:
                    if exc.errno not in OUT_OF_FILES:
                        raise
                    back_off(sock, ready, exc)
                    return
                stream = IOStream(connection, max_buffer_size=server.max_buffer_size,
                                  read_chunk_size=server.read_chunk_size)
                server.handle_stream(stream, address)

        return ready

    accepting = [(sock, accept(sock)) for sock in sockets]
    for sock, handler in accepting:
        io_loop.add_handler(sock, handler, IOLoop.READ)

    def stop() -> None:
        nonlocal stopped
        stopped = True
        for sock in sockets:
            io_loop.remove_handler(sock)  # a no-op while paused
            sock.close()

    return stop


def tune_gc() -> None:
    """Keep the cyclic collector off the data path (DESIGN.md §6).

    What was loaded at start-up is frozen out of every collection. A stream leaves no reference
    cycle behind (the handler hands its connection over with the cycles broken, handlers/sse.py),
    so collections only ever look at objects that are alive: they run every 5,000 new survivors
    instead of every 700, short enough (a few ms) to stay off the latency of running streams.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    """Serve on `sockets` until SIGTERM or SIGINT, then drain (DESIGN.md §4.4) and close.

    Draining: the listening sockets close at once (new connections are refused), /healthz
    says 503, and running streams get up to --drain-timeout to finish. Streams still running
    then end with an error frame that tells the client to resume with Last-Event-ID (behind
    nginx with Redis, on another instance). A second signal ends the drain at once.
    """
    app = make_app(settings)
    server = make_server(app)
    stop_listening = listen(server, sockets)
    tune_gc()
    host, port = sockets[0].getsockname()[:2]
    upstream = settings.upstream_url or "the built-in mock model"
    log.info("listening on http://%s:%d (upstream: %s)", host, port, upstream)
    if app.services.keys.open:
        log.warning(
            "OPEN DEV MODE: no --api-keys given, so anyone who can reach this port can use the "
            "upstream model as user 'anonymous'. Do not expose it."
        )
    if settings.redis_url and not settings.session_secret:
        log.warning(
            "--redis-url without --session-secret: each instance signs session cookies with its own "
            "random key, so a cookie works only on the instance that issued it"
        )

    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled.set)
    await signalled.wait()
    signalled.clear()

    services = app.services
    services.draining = True
    stop_listening()  # close the listening sockets: new connections are refused from here on
    running = len(services.streams)
    if running:
        log.info("draining %d running stream(s) for up to %gs (signal again to stop now)", running, settings.drain_timeout)
        drained = asyncio.ensure_future(services.streams.wait_idle(settings.drain_timeout))
        interrupted = asyncio.ensure_future(signalled.wait())
        await asyncio.wait([drained, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        drained.cancel()
        if len(services.streams):
            log.warning("%d stream(s) still running: ending them; their clients can resume", len(services.streams))
    await services.close()
    await server.close_all_connections()
    log.info("stopped")


def supervise(settings: Settings, sockets: list[socket.socket]) -> None:
    """--processes=N: N workers share the listening socket (the kernel spreads the connections).

    This parent only watches: it passes SIGTERM and SIGINT on to the workers, starts again a
    worker that crashes, and exits 0 once they have all drained and exited after a signal.
    The workers share streams and sessions through Redis, so any of them serves any request.
    """
    workers: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own event loop, created after the fork
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                uvloop.run(serve(settings, sockets))
            except BaseException:
                log.exception("worker %d failed", number)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        workers[pid] = number

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    for number in range(settings.processes):
        start(number)
    log.info("%d worker processes started", settings.processes)
    status = 0
    while workers:
        pid, wait_status = os.wait()
        number = workers.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and not stopping:
            log.error("worker %d exited with %d; starting it again", number, code)
            start(number)
        elif code != 0:
            status = 1
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    logs.configure_logging(settings.log_level, settings.log_format)
    sockets = tornado.netutil.bind_sockets(settings.port, settings.address, backlog=BACKLOG)
    if settings.processes > 1:
        supervise(settings, sockets)
    else:
        uvloop.run(serve(settings, sockets))  # libuv's loop: the data path's calls into it are C


if __name__ == "__main__":
    main()
