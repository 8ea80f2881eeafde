"""Usage and cost: recorded per user, model and day; exact from the upstream, else estimated."""

from __future__ import annotations

import asyncio
import json

import pytest
from support import EventReader, chat_body, content_of, stream_chat
from test_errors import error_of

from sse_gateway.mock_upstream import split_words
from sse_gateway.usage import UsageBook, UsageRow, today

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE, BOB = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
ADMIN = {"Authorization": "Bearer admin-key"}
PRICES = {"mock-count": (1000.0, 2000.0), "mock-echo": (10.0, 30.0)}  # USD per million tokens


@pytest.fixture
def gateway(start_gateway):
    return start_gateway(api_keys=KEYS, admin_keys=("admin-key",), prices=PRICES)


async def usage_of(http, gateway, headers=ALICE, query: str = "") -> dict:
    await gateway.services.streams.wait_idle(timeout=10)  # every producer has recorded its usage
    response = await http.get(f"{gateway.url}/v1/usage{query}", headers=headers)
    assert response.status == 200, await response.text()
    return await response.json()


def prompt_tokens(text: str) -> int:
    return len(split_words(text))  # how the mock model counts


async def test_a_completed_stream_records_the_upstreams_figures(gateway, http):
    _response, reader = await stream_chat(http, gateway.url, chat_body("count please", model="mock-count", max_tokens=7),
                                          headers=ALICE)
    assert content_of(reader.events) == "0 1 2 3 4 5 6 "
    # The gateway asked for usage, but this client did not: it gets no chunk without choices.
    assert all(json.loads(e.data)["choices"] for e in reader.events[:-1])
    usage = await usage_of(http, gateway)
    assert usage["user"] == "alice" and usage["object"] == "usage"
    [row] = usage["data"]
    assert (row["model"], row["requests"], row["prompt_tokens"], row["completion_tokens"]) == ("mock-count", 1, 2, 7)
    assert row["estimated"] is False and row["reason"] is None
    assert row["cost"] == pytest.approx((2 * 1000 + 7 * 2000) / 1e6)
    assert usage["total"] == {"prompt_tokens": 2, "completion_tokens": 7, "cost": row["cost"]}


async def test_a_client_that_asks_for_usage_gets_the_chunk(gateway, http):
    body = chat_body(model="mock-count", max_tokens=3, stream_options={"include_usage": True})
    _response, reader = await stream_chat(http, gateway.url, body, headers=ALICE)
    assert json.loads(reader.events[-2].data)["usage"]["completion_tokens"] == 3


async def test_a_stopped_stream_records_what_was_generated_as_an_estimate(gateway, http):
    text = " ".join(f"w{i}" for i in range(200))
    created = await (await http.post(f"{gateway.url}/v1/streams", json=chat_body(text, mock_token_delay=0.02),
                                     headers=ALICE)).json()
    reader = EventReader(await http.get(f"{gateway.url}{created['url']}"))
    for _ in range(6):  # the role chunk and five words
        await reader.next_event()
    await http.delete(f"{gateway.url}/v1/streams/{created['id']}", headers=ALICE)
    events = await reader.read_all()
    generated = sum(1 for e in events[:-1] if json.loads(e.data)["choices"][0]["delta"].get("content"))
    [row] = (await usage_of(http, gateway))["data"]
    assert row["estimated"] is True and row["reason"] == "cancelled"
    assert row["completion_tokens"] == generated >= 5
    assert row["prompt_tokens"] == -(-len(text) // 4)  # the prompt at four characters a token
    assert row["cost"] > 0


async def test_a_failed_stream_records_an_estimate_with_its_reason(gateway, http):
    body = chat_body("one two three four five six", mock_fail_after=4)
    await stream_chat(http, gateway.url, body, headers=ALICE)
    [row] = (await usage_of(http, gateway))["data"]
    assert (row["estimated"], row["reason"], row["completion_tokens"]) == (True, "failed", 3)


async def test_a_refused_request_costs_nothing(gateway, http):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body(mock_error_status=400), headers=ALICE)
    assert response.status == 400
    assert (await usage_of(http, gateway))["data"] == []


async def test_a_non_streamed_completion_is_recorded(gateway, http):
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=chat_body("a b c", stream=False), headers=ALICE)
    assert response.status == 200
    [row] = (await usage_of(http, gateway))["data"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (3, 3, False)


async def test_rows_are_per_model_and_reason_and_totals_add_up(gateway, http):
    await stream_chat(http, gateway.url, chat_body("x", model="mock-count", max_tokens=2), headers=ALICE)
    await stream_chat(http, gateway.url, chat_body("x", model="mock-count", max_tokens=3), headers=ALICE)
    await stream_chat(http, gateway.url, chat_body("hello there"), headers=ALICE)
    usage = await usage_of(http, gateway)
    by_model = {row["model"]: row for row in usage["data"]}
    assert by_model["mock-count"]["requests"] == 2 and by_model["mock-count"]["completion_tokens"] == 5
    assert by_model["mock-echo"]["completion_tokens"] == 2
    assert usage["total"]["completion_tokens"] == 7
    assert usage["total"]["cost"] == pytest.approx(sum(row["cost"] for row in usage["data"]))


async def test_each_user_sees_their_own_and_an_admin_sees_anyones(gateway, http):
    await stream_chat(http, gateway.url, chat_body("alice asks"), headers=ALICE)
    assert (await usage_of(http, gateway, BOB))["data"] == []
    as_admin = await usage_of(http, gateway, ADMIN, "?user=alice")
    assert as_admin["user"] == "alice" and as_admin["data"][0]["requests"] == 1
    response = await http.get(f"{gateway.url}/v1/usage?user=alice", headers=BOB)
    assert (await error_of(response, 403))["code"] == "admin_key_required"
    response = await http.get(f"{gateway.url}/v1/usage")
    assert (await error_of(response, 401))["code"] == "missing_api_key"


async def test_totals_survive_a_restart(start_gateway, http, tmp_path):
    path = str(tmp_path / "kept.sqlite3")
    first = start_gateway(api_keys=KEYS, usage_db=path)
    await stream_chat(http, first.url, chat_body("before the restart"), headers=ALICE)
    await first.services.streams.wait_idle(timeout=5)
    await first.close()  # writes what is pending, closes the file
    second = start_gateway(api_keys=KEYS, usage_db=path)
    [row] = (await usage_of(http, second))["data"]
    assert (row["requests"], row["completion_tokens"]) == (1, 3)


async def test_totals_are_shared_by_instances_on_redis(start_gateway, redis_url, http):
    a = start_gateway(api_keys=KEYS, redis_url=redis_url)
    b = start_gateway(api_keys=KEYS, redis_url=redis_url)
    await stream_chat(http, a.url, chat_body("on a"), headers=ALICE)
    await stream_chat(http, b.url, chat_body("on b", model="mock-count", max_tokens=4), headers=ALICE)
    await asyncio.gather(a.services.streams.wait_idle(5), b.services.streams.wait_idle(5))
    for gateway in (a, b):
        await gateway.services.usage.close()  # written through, not only pending here
    usage = await usage_of(http, a)
    assert sorted((r["model"], r["requests"]) for r in usage["data"]) == [("mock-count", 1), ("mock-echo", 1)]
    assert usage == await usage_of(http, b)


class _Unwritable(UsageBook):
    """A usage database that is away for good."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = asyncio.Event()

    async def _write(self, batch):
        self.attempts.set()
        raise ConnectionError("the usage database is away")

    async def _rows(self, user):
        return []


async def test_usage_is_written_in_batches_and_close_does_not_wait_for_an_absent_database(caplog):
    book = _Unwritable()
    for _ in range(3):
        await book.add("alice", UsageRow(today(), "mock-echo", "completed", 1, 2, 3, 0))
    assert [row.requests for row in await book.rows("alice")] == [3]  # merged, readable before it is written
    await asyncio.wait_for(book.attempts.wait(), 5)  # the writer tried, failed, and waits to try again
    await asyncio.wait_for(book.close(), 5)  # one last try, then the loss is logged: no hang
    assert "usage lost at shutdown" in caplog.text
