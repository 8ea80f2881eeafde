"""Base handlers: CORS, authentication, request bodies and JSON errors for every API route.

Errors follow Tornado's chat demo: headers that must survive an error (CORS, `Vary`) are set in
`set_default_headers`, which Tornado re-runs when it clears a response for `send_error`, and
`write_error` renders every failure as OpenAI-shaped JSON (DESIGN.md §4.4). A `GatewayError`
carries its own status; any other exception is a bug of ours and becomes a bare 500.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection

from sse_gateway import logs
from sse_gateway.access import Ticket, check_idempotency_key
from sse_gateway.auth import unauthorized
from sse_gateway.errors import GatewayError, server_error
from sse_gateway.limits import Reservation
from sse_gateway.services import Services

log = logging.getLogger("sse_gateway.http")

_HTTP_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT")
DISCARD_CAP = 64 * 1024 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
SESSION_COOKIE = "sse_session"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _as_gateway_error(handler: tornado.web.RequestHandler, status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if status == 405:
        return GatewayError(
            405, f"{handler.request.method} is not allowed on {handler.request.path}.", code="method_not_allowed"
        )
    if status == 404:
        return not_found(handler.request.method or "", handler.request.path)
    if isinstance(exc, tornado.web.HTTPError) and status < 500:
        return GatewayError(status, exc.log_message or exc.reason or "Bad request.", code=None)
    return server_error()


def not_found(method: str, path: str) -> GatewayError:
    return GatewayError(404, f"Unknown route: {method} {path}.", code="not_found")


class ApiHandler(tornado.web.RequestHandler):
    """JSON API routes.

    Callers authenticate with `Authorization: Bearer <key>`; where a browser cannot send a key,
    with a session cookie (`cookie_methods`) or a stream's read token (`ticket_methods`, as
    `?token=`). `public_methods` need no authentication at all.
    """

    public_methods: frozenset[str] = frozenset()
    cookie_methods: frozenset[str] = frozenset({"GET", "POST", "DELETE"})
    ticket_methods: frozenset[str] = frozenset()
    counts_as_work = True  # False for probes (/healthz, /metrics): they must answer when busy
    _counted = False
    services: Services
    user: str = "-"
    stream_id: str = "-"  # the stream this request reads or starts, for the access log
    ticket: Ticket | None = None

    def initialize(self, services: Services) -> None:
        self.services = services
        # A request id from the proxy in front (nginx's $request_id) ties its log to ours.
        incoming = self.request.headers.get("X-Request-Id")
        self.request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else os.urandom(16).hex()
        logs.request_id.set(self.request_id)
        logs.user.set("-")
        logs.stream_id.set("-")
        # RequestHandler.__init__ ran set_default_headers before services were known: again.
        self.set_default_headers()

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        if not hasattr(self, "services"):
            return
        self.set_header("X-Request-Id", self.request_id)
        for name, value in self.services.cors.headers(self.request.headers.get("Origin")):
            self.set_header(name, value)

    async def prepare(self) -> None:
        self.check_method()
        self.admit_connection()
        if self.request.method != "OPTIONS" and self.request.method not in self.public_methods:
            await self.authenticate()

    def admit_connection(self) -> None:
        """503 while draining or at --max-connections; else count this request until it ends."""
        if not self.counts_as_work or self._counted:
            return
        services = self.services
        if services.draining:
            self.set_header("Connection", "close")
            raise GatewayError(503, "This gateway instance is shutting down; try again.", type="server_error",
                               code="draining", retry_after=1)
        if services.active_requests >= services.settings.max_connections:
            services.metrics.rejections.labels("connections").inc()
            raise GatewayError(503, "The gateway is at capacity; try again shortly.", type="server_error",
                               code="overloaded", retry_after=1)
        services.active_requests += 1
        self._counted = True

    def on_finish(self) -> None:
        if self._counted:
            self._counted = False
            self.services.active_requests -= 1

    def check_method(self) -> None:
        """405 before anything else, so that a wrong method is never reported as a missing key."""
        if self.request.method not in self._allowed_methods():
            raise tornado.web.HTTPError(405)

    async def authenticate(self) -> None:
        """Set `self.user` from the first credential present; a bad one is a 401, never skipped."""
        self.user = await self._identify()
        logs.user.set(self.user)

    async def _identify(self) -> str:
        method = self.request.method or ""
        header = self.request.headers.get("Authorization")
        if header is not None:
            return self.services.keys.authenticate(header)
        token = self.get_query_argument("token", None) if method in self.ticket_methods else None
        if token is not None:
            ticket = await self.services.tickets.check(token)
            if ticket is None:
                raise unauthorized("The read token is invalid or has expired.", "invalid_token")
            self.ticket = ticket
            return ticket.user
        session_id = self.session_id() if method in self.cookie_methods else None
        if session_id is not None:
            user = await self.services.sessions.user(session_id)
            if user is None:
                raise unauthorized("The session has ended; sign in again.", "session_expired")
            self._check_cookie_origin()
            return user
        return self.services.keys.authenticate(None)  # 401, or "anonymous" in open dev mode

    def authenticate_admin(self) -> None:
        """Admin routes take an admin key (`--admin-keys`), never a user's key or cookie."""
        admins = self.services.admin_keys
        header = self.request.headers.get("Authorization")
        if admins.open:
            if self.services.keys.open:
                return  # open dev mode: no keys of any kind configured
            raise GatewayError(403, "This route needs an admin key, and none is configured (--admin-keys).",
                               type="permission_error", code="admin_keys_not_configured")
        try:
            admins.authenticate(header)
        except GatewayError:
            scheme, _, token = (header or "").partition(" ")
            if scheme.lower() == "bearer" and not self.services.keys.open and self.services.keys.lookup(token.strip()):
                raise GatewayError(403, "This route needs an admin key; this is a user's key.",
                                   type="permission_error", code="admin_key_required") from None
            raise

    def session_id(self) -> str | None:
        """The session id from a correctly signed session cookie, if any."""
        days = self.services.settings.session_ttl / 86400 + 1
        value = self.get_signed_cookie(SESSION_COOKIE, max_age_days=days)
        return value.decode() if value else None

    def _check_cookie_origin(self) -> None:
        """Refuse a cookie-authenticated change from a page of another origin (CSRF).

        SameSite=Lax already keeps the cookie off cross-site POSTs; this also covers sibling
        sites. Browsers send `Origin` with every POST and DELETE.
        """
        if self.request.method in ("GET", "HEAD"):
            return
        origin = self.request.headers.get("Origin")
        if origin is None or self.services.cors.allows(origin):
            return
        if urllib.parse.urlsplit(origin).netloc.lower() != self.request.host.lower():
            raise GatewayError(403, "Cross-site requests with a session cookie are refused.",
                               type="permission_error", code="origin_not_allowed")

    def options(self, *args: Any) -> None:
        """CORS preflight: no authentication, as browsers send none with it."""
        headers = self.services.cors.preflight_headers(self.request.headers.get("Origin"))
        if headers is None:
            raise GatewayError(403, "This origin is not allowed to call the API.", type="permission_error",
                               code="origin_not_allowed")
        for name, value in headers:
            self.set_header(name, value)
        self.set_status(204)

    @property
    def connection(self) -> HTTP1Connection:
        """The request's HTTP/1.1 connection (the only kind Tornado's server makes)."""
        connection = self.request.connection
        assert isinstance(connection, HTTP1Connection)
        return connection

    def write_json(self, body: bytes, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = _as_gateway_error(self, status_code, exc)
        self.set_status(error.status)
        if error.retry_after is not None:
            self.set_header("Retry-After", str(error.retry_after))
        if error.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="sse-gateway"')
        if error.status == 405:
            self.set_header("Allow", ", ".join(self._allowed_methods()))
        self.write_json(error.to_json(), error.status)

    def _allowed_methods(self) -> list[str]:
        own = [m for m in _HTTP_METHODS if getattr(type(self), m.lower()) is not getattr(tornado.web.RequestHandler, m.lower())]
        return own + ["OPTIONS"]

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        # A GatewayError is an answer, not a bug: no traceback in the log.
        if isinstance(value, GatewayError):
            log.info("%s %s -> %d %s", self.request.method, self.request.path, value.status, value.code)
        else:
            super().log_exception(typ, value, tb)


@tornado.web.stream_request_body
class JsonBodyHandler(ApiHandler):
    """Routes that take a JSON body, read as it arrives and bounded by `--max-body-size`.

    Authentication and the size check wait until the whole body has arrived: answering earlier
    would make Tornado close the connection with unread request bytes in the socket, which
    resets it, and the client would see a broken connection instead of our 401 or 413. A body
    over the limit is counted and dropped as it arrives, never buffered.
    """

    reservation: Reservation | None = None  # tokens of the day held for this request (limits.py)

    def release_reservation(self) -> None:
        """Give back the tokens held for this request, unless something took them over to settle."""
        self.services.limiter.release(self.reservation)
        self.reservation = None

    async def prepare(self) -> None:
        if self.request.method not in BODY_METHODS:
            await super().prepare()  # no body to wait for: authenticate now
            return
        self.check_method()
        self.admit_connection()
        self._body: list[bytes] = []
        self._body_size = 0
        # Tornado itself would cut a body over the server's limit with a bare 400; raise that
        # limit so that an oversized body is read and dropped, and its sender gets our 413.
        # Beyond the discard cap the sender is abusive and the bare 400 is good enough.
        limit = self.services.settings.max_body_size
        self.connection.set_max_body_size(max(8 * limit, DISCARD_CAP))

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.services.settings.max_body_size:
            self._body.append(chunk)
        elif self._body:
            self._body.clear()

    async def read_body(self) -> bytes:
        """Authenticate, then return the body; 401 or 413 as GatewayErrors."""
        if self.request.method not in self.public_methods:
            await self.authenticate()
        limit = self.services.settings.max_body_size
        if self._body_size > limit:
            raise GatewayError(
                413, f"The request body is larger than {limit} bytes.", code="request_too_large"
            )
        return b"".join(self._body)


    def idempotency_key(self) -> str | None:
        value = self.request.headers.get("Idempotency-Key")
        return check_idempotency_key(value) if value is not None else None


class NotFoundHandler(ApiHandler):
    """Every unknown route, whatever the method: a JSON 404."""

    async def prepare(self) -> None:
        raise not_found(self.request.method or "", self.request.path)
