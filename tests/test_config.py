"""Command line and environment -> Settings."""

from __future__ import annotations

import pytest

from sse_gateway.config import Settings, parse_settings


def test_defaults_match_the_design():
    settings = parse_settings([], env={})
    assert settings == Settings()
    assert (settings.address, settings.port) == ("127.0.0.1", 8000)
    assert settings.upstream_url is None and settings.redis_url is None and not settings.api_keys
    assert settings.heartbeat_interval == 15
    assert settings.resume_grace == 10
    assert settings.upstream_connect_timeout == 10
    assert settings.upstream_idle_timeout == 300
    assert settings.max_body_size == 1048576
    assert settings.drain_timeout == 30


def test_every_flag_parses():
    settings = parse_settings(
        [
            "--address=0.0.0.0",
            "--port=9001",
            "--upstream-url=https://api.example.com/v1/",
            "--upstream-api-key=sk-up",
            "--redis-url=redis://localhost:6379/0",
            "--api-keys=k1:alice,k2:bob",
            "--admin-keys=a1,a2",
            "--cors-origins=https://App.example.com,http://localhost:5173",
            "--heartbeat-interval=2.5",
            "--resume-grace=0",
            "--mock-token-delay=0",
            "--upstream-connect-timeout=3",
            "--upstream-idle-timeout=60",
            "--max-body-size=2048",
            "--drain-timeout=5",
            "--log-level=DEBUG",
            "--session-secret=s3cret",
            "--session-ttl=60",
            "--ticket-ttl=30",
            "--stream-retention=5",
            "--stream-max-events=100",
            "--retry-ms=500",
            "--events-retention=60",
            "--events-max=10",
        ],
        env={},
    )
    assert settings.address == "0.0.0.0" and settings.port == 9001
    assert settings.upstream_url == "https://api.example.com/v1"
    assert settings.upstream_api_key == "sk-up"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert dict(settings.api_keys) == {"k1": "alice", "k2": "bob"}
    assert settings.admin_keys == ("a1", "a2")
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:5173")
    assert settings.heartbeat_interval == 2.5 and settings.resume_grace == 0
    assert settings.mock_token_delay == 0
    assert settings.upstream_connect_timeout == 3 and settings.upstream_idle_timeout == 60
    assert settings.max_body_size == 2048 and settings.drain_timeout == 5
    assert settings.log_level == "debug"
    assert settings.session_secret == "s3cret" and settings.session_ttl == 60 and settings.ticket_ttl == 30
    assert settings.stream_retention == 5 and settings.stream_max_events == 100 and settings.retry_ms == 500
    assert settings.events_retention == 60 and settings.events_max == 10


def test_environment_fills_in_and_the_command_line_wins():
    env = {"SSE_PORT": "9100", "SSE_HEARTBEAT_INTERVAL": "4", "SSE_API_KEYS": "k:u", "SSE_UPSTREAM_API_KEY": "sk-env"}
    settings = parse_settings(["--port=9200"], env=env)
    assert settings.port == 9200
    assert settings.heartbeat_interval == 4
    assert dict(settings.api_keys) == {"k": "u"}
    assert settings.upstream_api_key == "sk-env"


def test_secrets_from_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nk1:alice\nk2:bob, k3:carol\n\n")
    upstream = tmp_path / "upstream"
    upstream.write_text("sk-from-file\n")
    settings = parse_settings([f"--api-keys=@{keys}", f"--upstream-api-key=@{upstream}", f"--admin-keys=@{upstream}"], env={})
    assert dict(settings.api_keys) == {"k1": "alice", "k2": "bob", "k3": "carol"}
    assert settings.upstream_api_key == "sk-from-file"
    assert settings.admin_keys == ("sk-from-file",)


def test_secrets_never_appear_in_the_repr():
    argv = ["--api-keys=client-secret:alice", "--upstream-api-key=sk-upstream-secret", "--admin-keys=admin-secret",
            "--session-secret=cookie-secret"]
    text = repr(parse_settings(argv, env={}))
    for secret in ("client-secret", "sk-upstream-secret", "admin-secret", "cookie-secret"):
        assert secret not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port=70000"], "is not a TCP port"),
        (["--port=http"], "is not an integer"),
        (["--heartbeat-interval=0"], "must be greater than 0"),
        (["--resume-grace=-1"], "must be at least 0"),
        (["--max-body-size=0"], "must be at least 1"),
        (["--upstream-url=ftp://x/v1"], "is not an http(s) URL"),
        (["--upstream-url=https://api.example.com"], "must be the API's base URL, ending in /v1"),
        (["--api-keys=justakey"], "each API key must be written key:user"),
        (["--api-keys=k:alice,k:bob"], "one API key is given to two users"),
        (["--api-keys=@/nonexistent/keys"], "cannot read /nonexistent/keys"),
        (["--cors-origins=https://app.example.com/path"], "is not an origin"),
        (["--redis-url=http://localhost:6379"], "must start with redis://"),
        (["--log-level=loud"], "is not one of debug"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_values_stop_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, env={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_environment_value_is_reported_too(capsys):
    with pytest.raises(SystemExit):
        parse_settings([], env={"SSE_PORT": "eighty"})
    assert "--port" in capsys.readouterr().err


def test_key_never_echoed_in_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--api-keys=sk-very-secret-no-user"], env={})
    assert "sk-very-secret" not in capsys.readouterr().err


def test_the_shipped_policy_and_price_examples_are_valid():
    from pathlib import Path

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    settings = parse_settings([f"--policy={deploy / 'policy.json'}", f"--prices=@{deploy / 'prices.json'}"], env={})
    assert "alice" in settings.policy["users"]
    assert settings.prices["gpt-4o-mini"] == (0.15, 0.60)


@pytest.mark.parametrize(
    ("document", "message"),
    [('{"m": {"prompt": 1}}', "expected"), ('{"m": {"prompt": -1, "completion": 1}}', "expected"), ("[1]", "prices must be"),
     ("{oops", "is not valid JSON")],
)
def test_a_wrong_price_file_stops_the_start(tmp_path, capsys, document, message):
    path = tmp_path / "prices.json"
    path.write_text(document)
    with pytest.raises(SystemExit):
        parse_settings([f"--prices={path}"], env={})
    assert message in capsys.readouterr().err
