"""Bad input, authentication and CORS: each has its status and an OpenAI-shaped JSON error."""

from __future__ import annotations

import re

import pytest
import tornado.web
from support import chat_body, content_of, stream_chat

from handlers.base import ApiHandler

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE = {"Authorization": "Bearer key-alice"}


async def error_of(response, status: int) -> dict:
    """Assert the status and the error shape; return the error object."""
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"] == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'"text"', None, "invalid_json"),
        (b'{"model": "\xff\xfe", "messages": []}', None, "invalid_json"),  # not UTF-8
        (b"[" * 5000 + b"]" * 5000, None, "invalid_json"),  # nested too deep
        (b'{"model": "mock-echo"}', "messages", "missing_required_parameter"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "missing_required_parameter"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model", "invalid_type"),
        (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "model", "empty_string"),
        (b'{"model": "mock-echo", "messages": [{"role": " ", "content": "x"}]}', "messages[0].role", "empty_string"),
        (b'{"model": "mock-echo", "messages": "hello"}', "messages", "invalid_type"),
        (b'{"model": "mock-echo", "messages": []}', "messages", "empty_array"),
        (b'{"model": "mock-echo", "messages": ["hello"]}', "messages[0]", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"content": "x"}]}', "messages[0].role", "missing_required_parameter"),
        (b'{"model": "mock-echo", "messages": [{"role": 1, "content": "x"}]}', "messages[0].role", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": 5}]}', "messages[0].content", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', "max_tokens", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens", "integer_below_min_value"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature", "invalid_type"),
        (b'{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}', "stream_options", "invalid_value"),
    ],
)
async def test_bad_bodies_get_400(gateway, http, mock_model, body, param, code):
    response = await http.post(
        f"{gateway.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    error = await error_of(response, 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert not mock_model.requests  # nothing reached the model


async def test_json_nested_deeper_than_the_gateway_writes_gets_400_everywhere(start_gateway, http, mock_model, caplog):
    """300 levels parse, but could never be written on (orjson writes 254): a 400, not a 500."""
    gateway = start_gateway(admin_keys=("admin-key",))
    deep = "[" * 300 + "]" * 300
    chat = '{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "metadata_x": %s}' % deep
    requests = [
        ("/v1/chat/completions", chat.replace("{", '{"stream": true, ', 1), {}),
        ("/v1/chat/completions", chat, {}),
        ("/v1/streams", chat, {}),
        ("/v1/events", '{"user": "alice", "data": %s}' % deep, {"Authorization": "Bearer admin-key"}),
    ]
    for path, body, headers in requests:
        response = await http.post(f"{gateway.url}{path}", data=body.encode(),
                                   headers={"Content-Type": "application/json", **headers})
        assert (await error_of(response, 400))["code"] == "invalid_json", path
    assert not mock_model.requests
    assert "Traceback" not in caplog.text
    # As deep as the gateway allows is fine.
    allowed = '{"user": "alice", "data": %s}' % ("[" * 127 + "]" * 127)
    response = await http.post(f"{gateway.url}/v1/events", data=allowed.encode(),
                               headers={"Content-Type": "application/json", "Authorization": "Bearer admin-key"})
    assert response.status == 202, await response.text()


async def test_body_over_the_limit_gets_413(start_gateway, http, mock_model):
    gateway = start_gateway(max_body_size=1000)
    big = chat_body("x" * 2000)
    error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large"
    # The same with a chunked body, whose size nobody announced.
    async def chunks():
        for _ in range(40):
            yield b"x" * 100

    error = await error_of(await http.post(f"{gateway.url}/v1/chat/completions", data=chunks()), 413)
    assert error["code"] == "request_too_large"
    assert not mock_model.requests
    # Just under the limit is fine.
    ok = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("y" * 100, stream=False))
    assert ok.status == 200


async def test_a_multi_megabyte_body_gets_a_clean_413(gateway, http):
    # The gateway reads and drops the body before answering: the client sees the 413,
    # not a connection reset.
    error = await error_of(
        await http.post(f"{gateway.url}/v1/chat/completions", data=b"x" * (5 * 1024 * 1024)), 413
    )
    assert "1048576" in error["message"]


async def test_missing_key_gets_401(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS)
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body())
    error = await error_of(response, 401)
    assert error["code"] == "missing_api_key"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("authorization", "code"),
    [("Bearer wrong-key", "invalid_api_key"), ("Bearer key-alic", "invalid_api_key"), ("Basic a2V5LWFsaWNl", "invalid_authorization"), ("Bearer ", "invalid_authorization")],
)
async def test_wrong_key_gets_401(start_gateway, http, mock_model, authorization, code):
    gateway = start_gateway(api_keys=KEYS)
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        body = chat_body() if method == "POST" else None
        response = await http.request(method, f"{gateway.url}{path}", json=body, headers={"Authorization": authorization})
        assert (await error_of(response, 401))["code"] == code
    assert not mock_model.requests


async def test_a_valid_key_is_accepted(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS)
    response, reader = await stream_chat(http, gateway.url, chat_body("with a key"), headers=ALICE)
    assert response.status == 200 and content_of(reader.events) == "with a key"
    models = await http.get(f"{gateway.url}/v1/models", headers={"Authorization": "bearer key-bob"})
    assert models.status == 200


async def test_401_after_a_large_body_arrives_intact(start_gateway, http):
    # Authentication waits for the body, so the 401 is never lost to a connection reset.
    gateway = start_gateway(api_keys=KEYS)
    body = chat_body("z" * 900_000)
    for _ in range(3):
        response = await http.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert (await error_of(response, 401))["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/nope"), ("GET", "/v1/chat/completions/x"), ("DELETE", "/v1/unknown")])
async def test_unknown_route_gets_404(start_gateway, http, method, path):
    gateway = start_gateway(api_keys=KEYS)
    error = await error_of(await http.request(method, f"{gateway.url}{path}"), 404)
    assert error["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST, OPTIONS"),
        ("PUT", "/v1/chat/completions", "POST, OPTIONS"),
        ("DELETE", "/v1/models", "GET, OPTIONS"),
        ("POST", "/healthz", "GET, HEAD, OPTIONS"),
    ],
)
async def test_wrong_method_gets_405_even_without_a_key(start_gateway, http, method, path, allow):
    gateway = start_gateway(api_keys=KEYS)
    response = await http.request(method, f"{gateway.url}{path}")
    assert (await error_of(response, 405))["code"] == "method_not_allowed"
    assert response.headers["Allow"] == allow


async def test_healthz_is_public(start_gateway, http):
    gateway = start_gateway(api_keys=KEYS)
    response = await http.get(f"{gateway.url}/healthz")
    assert response.status == 200 and (await response.json()) == {"status": "ok"}
    response = await http.head(f"{gateway.url}/healthz")
    assert response.status == 200 and await response.read() == b""


async def test_the_chat_page_and_its_assets_are_served(start_gateway, http, built_page):
    gateway = start_gateway(api_keys=KEYS)  # public, even when the API needs keys
    page = await http.get(f"{gateway.url}/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assert '<div id="app"></div>' in html
    assets = re.findall(r'(?:src|href)="(/static/assets/[^"]+)"', html)
    assert assets
    for asset in assets:
        assert (await http.get(f"{gateway.url}{asset}")).status == 200


class _Broken(ApiHandler):
    public_methods = frozenset({"GET"})

    def get(self) -> None:
        raise RuntimeError("secret internal detail")


async def test_a_bug_becomes_a_bare_json_500(gateway, http):
    gateway.app.add_handlers(r".*", [(r"/broken", _Broken, {"services": gateway.services})])
    error = await error_of(await http.get(f"{gateway.url}/broken"), 500)
    assert error["code"] == "internal_error"
    assert "secret internal detail" not in error["message"]


class TestCors:
    ORIGIN = "https://app.example.com"

    async def test_preflight_from_a_listed_origin(self, start_gateway, http):
        gateway = start_gateway(cors_origins=(self.ORIGIN,), api_keys=KEYS)
        response = await http.options(
            f"{gateway.url}/v1/chat/completions",
            headers={"Origin": self.ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type, last-event-id"},
        )
        assert response.status == 204
        headers = response.headers
        assert headers["Access-Control-Allow-Origin"] == self.ORIGIN
        assert headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "last-event-id", "idempotency-key"} <= allowed
        assert "Origin" in headers.getall("Vary")

    async def test_preflight_from_another_origin_is_refused(self, start_gateway, http):
        gateway = start_gateway(cors_origins=(self.ORIGIN,))
        response = await http.options(
            f"{gateway.url}/v1/chat/completions",
            headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
        )
        assert (await error_of(response, 403))["code"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in response.headers

    async def test_listed_origin_can_read_streams_and_errors(self, start_gateway, http):
        gateway = start_gateway(cors_origins=(self.ORIGIN,), api_keys=KEYS)
        response, _reader = await stream_chat(http, gateway.url, chat_body(), headers={"Origin": self.ORIGIN, **ALICE})
        assert response.headers["Access-Control-Allow-Origin"] == self.ORIGIN
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "X-Stream-Id" in response.headers["Access-Control-Expose-Headers"]
        # The browser can read the reason of a 401 too.
        denied = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(), headers={"Origin": self.ORIGIN})
        assert denied.status == 401
        assert denied.headers["Access-Control-Allow-Origin"] == self.ORIGIN

    async def test_unlisted_origin_gets_no_cors_headers(self, start_gateway, http):
        gateway = start_gateway(cors_origins=(self.ORIGIN,))
        response = await http.get(f"{gateway.url}/v1/models", headers={"Origin": "https://evil.example.com"})
        assert "Access-Control-Allow-Origin" not in response.headers
        assert response.headers["Vary"] == "Origin"

    async def test_wildcard_is_never_combined_with_credentials(self, start_gateway, http):
        gateway = start_gateway(cors_origins=("*", self.ORIGIN))
        other = await http.get(f"{gateway.url}/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert other.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in other.headers
        listed = await http.get(f"{gateway.url}/v1/models", headers={"Origin": self.ORIGIN})
        assert listed.headers["Access-Control-Allow-Origin"] == self.ORIGIN
        assert listed.headers["Access-Control-Allow-Credentials"] == "true"


def test_handlers_never_import_tornado_into_the_core():
    # Imports point one way: handlers -> sse_gateway (DESIGN.md §2).
    import pathlib

    core = pathlib.Path(__file__).resolve().parents[1] / "sse_gateway"
    for path in core.rglob("*.py"):
        text = path.read_text()
        assert "import tornado" not in text and "from tornado" not in text, path
        assert "from handlers" not in text and "import handlers" not in text, path
    assert issubclass(ApiHandler, tornado.web.RequestHandler)
