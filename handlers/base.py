"""Base handlers: CORS, authentication, request bodies and JSON errors for every API route.

Errors follow Tornado's chat demo: headers that must survive an error (CORS, `Vary`) are set in
`set_default_headers`, which Tornado re-runs when it clears a response for `send_error`, and
`write_error` renders every failure as OpenAI-shaped JSON (DESIGN.md §4.4). A `GatewayError`
carries its own status; any other exception is a bug of ours and becomes a bare 500.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import tornado.web
from tornado.http1connection import HTTP1Connection

from sse_gateway.errors import GatewayError, server_error
from sse_gateway.services import Services

log = logging.getLogger("sse_gateway.http")

_HTTP_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT")
DISCARD_CAP = 64 * 1024 * 1024
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
    """JSON API routes. Subclasses set `requires_auth = False` for public routes."""

    requires_auth = True
    services: Services
    user: str

    def initialize(self, services: Services) -> None:
        self.services = services
        # A request id from the proxy in front (nginx's $request_id) ties its log to ours.
        incoming = self.request.headers.get("X-Request-Id", "")
        self.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # RequestHandler.__init__ ran set_default_headers before services were known: again.
        self.set_default_headers()

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        if not hasattr(self, "services"):
            return
        self.set_header("X-Request-Id", self.request_id)
        for name, value in self.services.cors.headers(self.request.headers.get("Origin")):
            self.set_header(name, value)

    def prepare(self) -> None:
        self.check_method()
        if self.requires_auth and self.request.method != "OPTIONS":
            self.user = self.authenticate()

    def check_method(self) -> None:
        """405 before anything else, so that a wrong method is never reported as a missing key."""
        if self.request.method not in self._allowed_methods():
            raise tornado.web.HTTPError(405)

    def authenticate(self) -> str:
        return self.services.keys.authenticate(self.request.headers.get("Authorization"))

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

    def prepare(self) -> None:
        self.check_method()
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

    def read_body(self) -> bytes:
        """Authenticate, then return the body; 401 or 413 as GatewayErrors."""
        if self.requires_auth:
            self.user = self.authenticate()
        limit = self.services.settings.max_body_size
        if self._body_size > limit:
            raise GatewayError(
                413, f"The request body is larger than {limit} bytes.", code="request_too_large"
            )
        return b"".join(self._body)


class NotFoundHandler(ApiHandler):
    """Every unknown route, whatever the method: a JSON 404."""

    requires_auth = False

    def prepare(self) -> None:
        raise not_found(self.request.method or "", self.request.path)
