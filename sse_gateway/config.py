"""Settings: one frozen object built from command-line flags and `SSE_*` environment variables.

Every flag `--some-flag` can also be given as `SSE_SOME_FLAG`; the command line wins over the
environment, which wins over the default (DESIGN.md §3). Secrets (`--upstream-api-key`,
`--api-keys`, `--admin-keys`, `--session-secret`) accept `@path` to read them from a file, so that they need not
appear in `ps` output, and are kept out of the settings' repr so that they never reach a log.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .policy import parse_policy

ENV_PREFIX = "SSE_"


@dataclass(frozen=True)
class Settings:
    """Everything the gateway can be told at start-up; see README for what each one does."""

    address: str = "127.0.0.1"
    port: int = 8000
    upstream_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    upstreams: str | None = field(default=None, repr=False)  # the routing table's JSON (routing.py), checked
    redis_url: str | None = field(default=None, repr=False)
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    heartbeat_interval: float = 15.0
    resume_grace: float = 10.0
    mock_token_delay: float = 0.05
    upstream_connect_timeout: float = 10.0
    upstream_idle_timeout: float = 300.0
    max_body_size: int = 1_048_576
    drain_timeout: float = 30.0
    header_timeout: float = 20.0
    instance_lease: float = 10.0
    body_timeout: float = 60.0
    session_secret: str | None = field(default=None, repr=False)
    session_ttl: float = 43_200.0
    ticket_ttl: float = 600.0
    stream_retention: float = 600.0
    stream_retention_bytes: int = 256 * 1024 * 1024
    stream_max_events: int = 100_000
    events_retention: float = 86_400.0
    events_max: int = 1000
    system_prompt: str | None = None
    trust_proxy: bool = False
    models: tuple[str, ...] = ()  # the models users may ask for; empty: any
    requests_per_minute: int = 0
    tokens_per_day: int = 0
    concurrent_streams: int = 0
    policy: Mapping[str, Any] | None = None
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    usage_db: str = "usage.sqlite3"
    usage_spill: str = ""  # unset: next to --usage-db
    max_connections: int = 10_000
    max_stream_lifetime: float = 3600.0
    max_messages: int = 1000
    max_message_size: int = 1_000_000
    max_tokens: int = 0
    write_timeout: float = 30.0
    processes: int = 1
    retry_ms: int = 3000
    log_level: str = "info"
    log_format: str = "text"

    @property
    def usage_spill_path(self) -> str:
        """Where usage that could not be written at shutdown waits for the next start."""
        return self.usage_spill or f"{self.usage_db}.unwritten"


def _read_secret(value: str) -> str:
    """`@path` means the file's contents; anything else is the value itself."""
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value[1:]}: {exc.strerror}") from None
    return value


def _split_list(text: str) -> list[str]:
    """Items separated by commas or newlines; blank items and `#` comment lines dropped."""
    items: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        items.extend(part.strip() for part in line.split(","))
    return [item for item in items if item]


def parse_api_keys(value: str) -> dict[str, str]:
    """`key:user,key:user` (or `@file` holding such items) -> {key: user}."""
    keys: dict[str, str] = {}
    for item in _split_list(_read_secret(value)):
        key, sep, user = item.partition(":")
        key, user = key.strip(), user.strip()
        if not sep or not key or not user:
            # Never echo the item: it holds a key.
            raise argparse.ArgumentTypeError("each API key must be written key:user")
        if keys.get(key, user) != user:
            raise argparse.ArgumentTypeError(f"one API key is given to two users ({keys[key]!r}, {user!r})")
        keys[key] = user
    return keys


def parse_admin_keys(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_split_list(_read_secret(value))))


def parse_upstream_url(value: str) -> str:
    url = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("the upstream URL takes no query or fragment")
    if not parts.path.endswith("/v1"):
        raise argparse.ArgumentTypeError(f"{value!r} must be the API's base URL, ending in /v1")
    return url


def _routing_table(value: str) -> str:
    """--upstreams: `@path` to a JSON routing table (or the JSON itself); checked here, so that a
    mistake stops the start with a message (routing.parse_routes)."""
    from .routing import parse_routes

    text = value if value.lstrip().startswith("[") else _read_secret(value if value.startswith("@") else "@" + value)
    try:
        parse_routes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _secret_url(value: str) -> str:
    """A redis://, rediss:// or unix:// URL, or redis+cluster://host:port[,host:port…] for a Redis
    Cluster (it may hold a password: never echoed)."""
    url = _read_secret(value)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        raise argparse.ArgumentTypeError(
            "the Redis URL must start with redis://, rediss://, unix:// or redis+cluster://")
    if parts.scheme.endswith("+cluster"):
        for seed in parts.netloc.rpartition("@")[2].split(","):
            if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\[\]]+):[0-9]{1,5}", seed.strip()):
                raise argparse.ArgumentTypeError("a Redis Cluster URL lists its seed nodes as host:port[,host:port…]")
        if parts.path.strip("/") not in ("", "0"):
            raise argparse.ArgumentTypeError("a Redis Cluster has no databases but 0")
    return url


def parse_origins(value: str) -> tuple[str, ...]:
    """Exact origins (`scheme://host[:port]`) or `*`; anything else is a mistake worth stopping for."""
    origins = []
    for item in _split_list(value):
        if item != "*":
            parts = urllib.parse.urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                raise argparse.ArgumentTypeError(f"{item!r} is not an origin like https://app.example.com")
            item = f"{parts.scheme}://{parts.netloc.lower()}"
        origins.append(item)
    return tuple(dict.fromkeys(origins))


def _number(kind: type, *, minimum: float, exclusive: bool = False) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            number = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if number < minimum or (exclusive and number == minimum):
            bound = "greater than" if exclusive else "at least"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound} {minimum}")
        return number

    return convert


def _json_file(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """A converter that reads a JSON file (given as a path, with or without @) and checks it."""

    def convert(value: str) -> Any:
        path = Path(value.removeprefix("@"))
        try:
            document = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {exc}") from None
        try:
            return parse(document)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc}") from None

    return convert


def parse_policy_document(document: Any) -> Mapping[str, Any]:
    parse_policy(document)  # raises PolicyError (a ValueError) on any mistake
    return document  # type: ignore[no-any-return]


def parse_prices(document: Any) -> dict[str, tuple[float, float]]:
    if not isinstance(document, dict):
        raise ValueError('prices must be {"model": {"prompt": <USD per million>, "completion": <USD per million>}}')
    prices = {}
    for model, entry in document.items():
        if not isinstance(entry, dict) or set(entry) != {"prompt", "completion"} or not all(
            isinstance(entry[k], (int, float)) and not isinstance(entry[k], bool) and entry[k] >= 0 for k in entry
        ):
            raise ValueError(f'{model}: expected {{"prompt": <number>, "completion": <number>}}')
        prices[model] = (float(entry["prompt"]), float(entry["completion"]))
    return prices


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _port(text: str) -> int:
    port = _number(int, minimum=0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return port


# flag -> (type, help). Defaults come from Settings so that they are written down once.
_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "address": (str, "interface to listen on"),
    "port": (_port, "TCP port to listen on (0 picks a free one)"),
    "upstream-url": (parse_upstream_url, "OpenAI-compatible base URL ending in /v1; unset: built-in mock model"),
    "upstream-api-key": (_read_secret, "key sent to the upstream as a Bearer token (or @file)"),
    "upstreams": (_routing_table, ("@file: JSON routing table of several upstreams (by model, with fallback); "
                                   "instead of --upstream-url")),
    "redis-url": (_secret_url, "redis:// URL (or redis+cluster://host:port[,host:port…] for a Redis Cluster) for shared state, as several instances need; unset: in-memory"),
    "api-keys": (parse_api_keys, "client keys as key:user,key:user (or @file); unset: open dev mode"),
    "admin-keys": (parse_admin_keys, "admin keys, comma-separated (or @file)"),
    "cors-origins": (parse_origins, "browser origins allowed to call the API, comma-separated"),
    "heartbeat-interval": (_number(float, minimum=0, exclusive=True), "longest silence on a stream, seconds"),
    "resume-grace": (_number(float, minimum=0), "seconds a stream keeps generating with no reader"),
    "mock-token-delay": (_number(float, minimum=0), "built-in mock model: seconds between tokens"),
    "upstream-connect-timeout": (_number(float, minimum=0, exclusive=True), "seconds to connect to the upstream"),
    "upstream-idle-timeout": (_number(float, minimum=0, exclusive=True), "longest upstream silence, seconds"),
    "max-body-size": (_number(int, minimum=1), "largest request body, bytes"),
    "drain-timeout": (_number(float, minimum=0), "seconds running streams may finish after SIGTERM"),
    "instance-lease": (_number(float, minimum=0, exclusive=True), "with --redis-url: seconds after which an instance that stopped renewing its lease is taken for dead, and its streams end"),
    "header-timeout": (_number(float, minimum=0, exclusive=True), "seconds a connection may take to send a request's head, or stay idle between requests"),
    "body-timeout": (_number(float, minimum=0, exclusive=True), "seconds a client may take to send a request's body"),
    "session-secret": (_read_secret, "key that signs session cookies (or @file); unset: random at each start"),
    "session-ttl": (_number(float, minimum=0, exclusive=True), "seconds a session cookie stays valid"),
    "ticket-ttl": (_number(float, minimum=0, exclusive=True), "seconds a stream's read token stays valid"),
    "stream-retention": (_number(float, minimum=0), "seconds a finished stream stays readable for resume"),
    "stream-retention-bytes": (_number(int, minimum=0), "bytes of finished streams the memory store keeps at most, the oldest dropped first; 0: no cap"),
    "stream-max-events": (_number(int, minimum=3), "most events one stream may hold"),
    "events-retention": (_number(float, minimum=0, exclusive=True), "seconds a push message waits for its user"),
    "events-max": (_number(int, minimum=1), "push messages kept per user at most"),
    "system-prompt": (_read_secret, "system message the gateway puts first in every chat request (or @file)"),
    "trust-proxy": (_boolean, "true behind nginx: take client address and scheme from X-Forwarded-* headers"),
    "models": (lambda v: tuple(_split_list(v)), "models users may ask for, comma-separated; unset: any"),
    "requests-per-minute": (_number(int, minimum=0), "requests a user may make per minute; 0: no limit"),
    "tokens-per-day": (_number(int, minimum=0), "tokens a user may use per day (UTC); 0: no limit"),
    "concurrent-streams": (_number(int, minimum=0), "answers a user may stream at once; 0: no limit"),
    "policy": (_json_file(parse_policy_document), "JSON file of per-user limits and models, per-model system prompts"),
    "prices": (_json_file(parse_prices), 'JSON file of USD per million tokens: {"model": {"prompt": 2.5, "completion": 10}}'),
    "usage-db": (str, "SQLite file that keeps usage (without --redis-url)"),
    "usage-spill": (str, "file for usage that could not be written at shutdown, written at the next start; unset: <usage-db>.unwritten"),
    "max-connections": (_number(int, minimum=1), "requests served at once; more get 503"),
    "max-stream-lifetime": (_number(float, minimum=0, exclusive=True), "seconds one answer may stream at most"),
    "max-messages": (_number(int, minimum=1), "messages one chat request may carry"),
    "max-message-size": (_number(int, minimum=1), "characters one message may hold"),
    "max-tokens": (_number(int, minimum=0), "largest max_tokens a request may ask for; 0: no cap"),
    "write-timeout": (_number(float, minimum=0, exclusive=True), "seconds a client may take to accept a write"),
    "processes": (_number(int, minimum=1), "worker processes sharing the port (more than 1 needs --redis-url)"),
    "retry-ms": (_number(int, minimum=0), "reconnection delay sent to EventSource clients (retry:), ms"),
    "log-level": (str, "debug, info, warning or error"),
    "log-format": (str, "text, or json: one JSON object per line"),
}


def _attr(flag: str) -> str:
    return flag.replace("-", "_")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="sse_server.py",
        description="Server-Sent Events gateway that streams LLM answers token by token.",
        epilog=f"Each flag can also be set as an environment variable: --some-flag -> {ENV_PREFIX}SOME_FLAG.",
    )
    for flag, (convert, help_text) in _FLAGS.items():
        env_name = ENV_PREFIX + _attr(flag).upper()
        default = env.get(env_name)
        if default is None:
            default = getattr(defaults, _attr(flag))
        parser.add_argument(
            f"--{flag}",
            type=convert,
            default=default,
            metavar=_attr(flag).upper(),
            help=f"{help_text} [env {env_name}]",
        )
    return parser


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags and environment; exits with a usage error on a bad value."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    level = values["log_level"].lower()
    if level not in ("debug", "info", "warning", "error"):
        parser.error(f"--log-level: {values['log_level']!r} is not one of debug, info, warning, error")
    values["log_level"] = level
    if values["log_format"] not in ("text", "json"):
        parser.error(f"--log-format: {values['log_format']!r} is not text or json")
    if values["upstreams"] and (values["upstream_url"] or values["upstream_api_key"]):
        parser.error("--upstreams replaces --upstream-url and --upstream-api-key: give one or the other")
    if values["processes"] > 1 and not values["redis_url"]:
        parser.error("--processes above 1 needs --redis-url: processes share streams and sessions through Redis")
    return Settings(**values)
