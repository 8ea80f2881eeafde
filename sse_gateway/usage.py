"""Usage and cost: tokens per user, model and day, and what they cost (issue: running it for real).

The gateway asks the upstream for usage (`stream_options.include_usage`) and records its figures.
A stream that ends before the usage chunk (stopped, cancelled, failed) is recorded anyway, as an
estimate with its reason: the prompt at four characters a token, one token per content chunk
generated. A usage chunk is relayed only to clients that asked for one themselves, because
a chunk with no choices breaks clients that read `choices[0]`.

Costs come from a price table (USD per million tokens, per model) at the time of use, and are
kept as whole nano-dollars so that sums are exact. The book is SQLite (one file, survives
restarts) by default, Redis when instances share state.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import orjson

__all__ = ["Prices", "UsageBook", "SqliteUsageBook", "RedisUsageBook", "UsageMeter", "UsageRow", "report", "today"]

log = logging.getLogger("sse_gateway.usage")

NANOS = 1_000_000_000
_CONTENT, _NO_CONTENT = b'"content":"', b'"content":""'  # a chunk with a non-empty content delta
WRITE_DELAY = 0.5  # seconds the writer gathers additions into one batch
CLOSE_TIMEOUT = 3.0  # seconds close() gives the database before what is pending is spilled
RETRY_SECONDS = 1.0  # between attempts to write usage while the database is away


def today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def estimate_tokens(text: str) -> int:
    """A rough count (about four characters a token in English), never zero."""
    return max(1, math.ceil(len(text) / 4))


def text_of(messages: Iterable[Any]) -> str:
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


@dataclass(frozen=True)
class Prices:
    """USD per million tokens: model -> (prompt, completion). Unknown models cost 0."""

    table: Mapping[str, tuple[float, float]]

    def cost_nanos(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        prompt, completion = self.table.get(model, (0.0, 0.0))
        # per million tokens -> per token in nano-dollars: price * 1e9 / 1e6
        return round(prompt_tokens * prompt * 1000 + completion_tokens * completion * 1000)


@dataclass(frozen=True)
class UsageRow:
    date: str
    model: str
    reason: str  # "" for the upstream's own figures; else why they are an estimate
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nanos: int


_Key = tuple[str, str, str, str]  # user, date, model, reason
_NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "cost_nanos")


def _merged(rows: Iterable[UsageRow], extra: Iterable[UsageRow]) -> list[UsageRow]:
    totals: dict[tuple[str, str, str], list[int]] = {}
    for row in [*rows, *extra]:
        numbers = totals.setdefault((row.date, row.model, row.reason), [0, 0, 0, 0])
        for i, value in enumerate((row.requests, row.prompt_tokens, row.completion_tokens, row.cost_nanos)):
            numbers[i] += value
    return [UsageRow(date, model, reason, *numbers) for (date, model, reason), numbers in sorted(totals.items())]


class UsageBook(abc.ABC):
    """Totals per user, date, model and reason.

    `add` only adds to totals kept in memory: one writer sends them to the database in
    batches, WRITE_DELAY after the first addition and with one batch in flight (what comes
    meanwhile goes in the next), so no stream ever waits for a disk, and the write of a stream
    that just ended does not compete with the request that comes right after it. Reads include
    what is not written yet. While the database is away, the writer tries again every
    RETRY_SECONDS and logs one line when it goes and one when it is back.

    close() gives what is pending CLOSE_TIMEOUT to be written; what still is not goes to the
    `spill` file, which the next start reads back and writes: an outage and a restart lose no
    usage. A crash loses what was added in the last WRITE_DELAY and the batch in flight.
    """

    def __init__(self, spill: str | None = None) -> None:
        self._pending: dict[_Key, UsageRow] = {}
        self._writer: asyncio.Task[None] | None = None
        self._sleeping = False  # the writer waits: for more to add to its batch, or to try again
        self._failing = False  # the last write failed (logged once, until one succeeds)
        self._spill = Path(spill) if spill else None
        self._spilled = self._read_spill()  # rows from the last run are pending: the file goes once written
        if self._spilled:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # written with the first addition
            self._start_writer()

    def _read_spill(self) -> bool:
        if self._spill is None or not self._spill.exists():
            return False
        rows = 0
        for line in self._spill.read_text().splitlines():
            user, date, model, reason, *numbers = orjson.loads(line)
            self._merge((user, date, model, reason), UsageRow(date, model, reason, *numbers))
            rows += 1
        log.info("usage: %d rows left unwritten by the last run read back from %s", rows, self._spill)
        return True

    def _merge(self, key: _Key, row: UsageRow) -> None:
        before = self._pending.get(key)
        self._pending[key] = _merged([before], [row])[0] if before else row

    async def add(self, user: str, row: UsageRow) -> None:
        self._merge((user, row.date, row.model, row.reason), row)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_pending())

    async def _write_pending(self) -> None:
        try:
            await self._sleep(WRITE_DELAY)
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    await self._write(batch)
                except BaseException as exc:
                    for key, row in batch.items():  # put it back, merged with what came meanwhile
                        self._merge(key, row)
                    if not isinstance(exc, Exception):
                        raise  # cancelled (at close): what was in flight is pending again
                    if not self._failing:
                        self._failing = True
                        log.warning("usage cannot be written (%s); kept in memory, trying again every %gs",
                                    exc.__class__.__name__, RETRY_SECONDS)
                    await self._sleep(RETRY_SECONDS)
                    continue
                self._written()
        finally:
            self._writer = None

    def _written(self) -> None:
        if self._failing:
            self._failing = False
            log.info("usage is written again")
        if self._spilled and self._spill is not None:
            self._spilled = False
            self._spill.unlink(missing_ok=True)  # its rows were in what was just written

    async def _sleep(self, seconds: float) -> None:
        self._sleeping = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self._sleeping = False

    @abc.abstractmethod
    async def _write(self, batch: dict[_Key, UsageRow]) -> None:
        """Add these totals to the database. A writer that can fail part-way removes from
        `batch` what it wrote, so that only the rest is put back and tried again."""

    @abc.abstractmethod
    async def _rows(self, user: str) -> list[UsageRow]:
        """The user's totals in the database."""

    async def rows(self, user: str) -> list[UsageRow]:
        pending = [row for (who, *_), row in self._pending.items() if who == user]
        return _merged(await self._rows(user), pending)

    async def tokens_on(self, user: str, date: str) -> int:
        return sum(r.prompt_tokens + r.completion_tokens for r in await self.rows(user) if r.date == date)

    async def close(self) -> None:
        """Write what is pending, within CLOSE_TIMEOUT; spill what cannot be; release the database."""
        writer = self._writer
        if writer is not None:
            if not self._sleeping:  # a write in flight: let it finish, for a while
                await asyncio.wait([writer], timeout=CLOSE_TIMEOUT)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if self._pending:
            try:
                await asyncio.wait_for(self._write(self._pending), CLOSE_TIMEOUT)
                self._pending = {}
                self._written()
            except Exception as exc:
                self._spill_pending(exc)
        await self._close()

    def _spill_pending(self, exc: BaseException) -> None:
        if self._spill is None:
            log.error("usage lost at shutdown (%s): %s", exc.__class__.__name__, list(self._pending.values()))
            return
        lines = [orjson.dumps([*key, *(getattr(row, f) for f in _NUMBERS)]) for key, row in self._pending.items()]
        self._spill.write_bytes(b"\n".join(lines) + b"\n")  # all of it: what was read back is pending too
        log.warning("usage could not be written at shutdown (%s): %d rows kept in %s for the next start",
                    exc.__class__.__name__, len(lines), self._spill)

    async def _close(self) -> None:  # noqa: B027 (optional)
        """Release the database."""


class SqliteUsageBook(UsageBook):
    """One SQLite file; survives restarts. aiosqlite keeps the blocking calls off the loop."""

    def __init__(self, path: str, spill: str | None = None) -> None:
        super().__init__(spill)
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()

    async def _connection(self) -> aiosqlite.Connection:
        async with self._opening:
            if self._db is None:
                db = await aiosqlite.connect(self.path)
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe against a crash of the process
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS usage (user TEXT NOT NULL, date TEXT NOT NULL, model TEXT NOT NULL,"
                    " reason TEXT NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,"
                    " completion_tokens INTEGER NOT NULL, cost_nanos INTEGER NOT NULL,"
                    " PRIMARY KEY (user, date, model, reason))"
                )
                await db.commit()
                self._db = db
        return self._db

    async def _write(self, batch: dict[_Key, UsageRow]) -> None:
        db = await self._connection()
        await db.executemany(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, date, model, reason) DO UPDATE SET"
            " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens,"
            " cost_nanos = cost_nanos + excluded.cost_nanos",
            [(user, r.date, r.model, r.reason, r.requests, r.prompt_tokens, r.completion_tokens, r.cost_nanos)
             for (user, *_), r in batch.items()],
        )
        await db.commit()

    async def _rows(self, user: str) -> list[UsageRow]:
        db = await self._connection()
        async with db.execute(
            "SELECT date, model, reason, requests, prompt_tokens, completion_tokens, cost_nanos FROM usage"
            " WHERE user = ? ORDER BY date, model, reason",
            (user,),
        ) as cursor:
            return [UsageRow(*record) for record in await cursor.fetchall()]

    async def _close(self) -> None:
        async with self._opening:  # a connection still being opened is closed too
            if self._db is not None:
                await self._db.close()
                self._db = None


_ADD_USAGE = """
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class RedisUsageBook(UsageBook):
    """A hash per user in the shared Redis: every instance adds to the same totals."""

    _FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_nanos")

    def __init__(self, client: Any, prefix: str = "sse:", spill: str | None = None) -> None:
        super().__init__(spill)
        self._client = client
        self._prefix = prefix
        from .store.redis.connection import (
            Script,  # only deployments with Redis load redis-py
        )

        self._add = Script(client, _ADD_USAGE)

    def _key(self, user: str) -> str:
        return f"{self._prefix}usage:{user}"

    async def _write(self, batch: dict[_Key, UsageRow]) -> None:
        # One script per user (one key, so one slot of a cluster): a user's rows are added all
        # at once or not at all, and the users written leave the batch even if another fails.
        by_user: dict[str, list[_Key]] = defaultdict(list)
        for key in batch:
            by_user[key[0]].append(key)
        users = list(by_user)
        results = await asyncio.gather(*(self._add(keys=[self._key(user)], args=self._fields(batch, by_user[user]))
                                         for user in users), return_exceptions=True)
        failure: BaseException | None = None
        for user, result in zip(users, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                for key in by_user[user]:
                    del batch[key]
        if failure is not None:
            raise failure

    def _fields(self, batch: dict[_Key, UsageRow], keys: list[_Key]) -> list[Any]:
        """HINCRBY's field, amount pairs for these rows of one user."""
        args: list[Any] = []
        for key in keys:
            row = batch[key]
            base = f"{row.date}\t{row.model}\t{row.reason}"
            for name in self._FIELDS:
                args += [f"{base}\t{name}", getattr(row, name)]
        return args

    async def _rows(self, user: str) -> list[UsageRow]:
        fields = await self._client.hgetall(self._key(user))
        grouped: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
        for field, value in fields.items():
            date, model, reason, name = field.decode().split("\t")
            grouped[(date, model, reason)][name] = int(value)
        return [
            UsageRow(date, model, reason, *(numbers.get(name, 0) for name in self._FIELDS))
            for (date, model, reason), numbers in sorted(grouped.items())
        ]


def report(user: str, rows: list[UsageRow]) -> dict[str, Any]:
    """The body of GET /v1/usage (DESIGN.md §4.4)."""
    data = [
        {
            "date": r.date,
            "model": r.model,
            "requests": r.requests,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cost": r.cost_nanos / NANOS,
            "estimated": bool(r.reason),
            "reason": r.reason or None,
        }
        for r in rows
    ]
    total = {
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "cost": sum(r.cost_nanos for r in rows) / NANOS,
    }
    return {"object": "usage", "user": user, "data": data, "total": total}


def carries_content(payload: bytes, chunk: dict[str, Any] | None) -> bool:
    """Whether a streamed chunk has a non-empty content delta: from its parsed JSON when it was
    parsed (`chunk`), else from its bytes (compact JSON, which is what was left unparsed)."""
    if chunk is None:
        return _CONTENT in payload and _NO_CONTENT not in payload
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and isinstance(c.get("delta"), dict) and bool(c["delta"].get("content")) for c in choices)


class Settles(Protocol):
    """A reservation of tokens (limits.Reservation), told what its request used."""

    async def settle(self, used: int) -> None: ...


class UsageMeter:
    """What one request consumed: the upstream's figures when it gives them, else an estimate.

    Streamed chunks are seen as bytes, parsed only when the upstream layer had to parse them
    (usage, a finish reason); the prompt's estimate is taken at the start, so that the request
    itself is not kept for the stream's life.
    """

    __slots__ = ("book", "reservation", "prices", "user", "model", "client_wants_usage", "_prompt_estimate", "content_chunks",
                 "reported")

    def __init__(self, book: UsageBook, prices: Prices, user: str, model: str, messages: list[Any],
                 client_wants_usage: bool = False, reservation: Settles | None = None) -> None:
        self.book = book
        self.reservation = reservation  # the request's tokens of the day, settled when recorded
        self.prices = prices
        self.user = user
        self.model = model
        self.client_wants_usage = client_wants_usage
        self._prompt_estimate = estimate_tokens(text_of(messages))
        self.content_chunks = 0
        self.reported: dict[str, Any] | None = None

    def see(self, payload: bytes, chunk: dict[str, Any] | None) -> bool:
        """Note a streamed chunk (`chunk` is its parsed JSON when it was parsed); False when it
        is a usage chunk this client did not ask for."""
        if carries_content(payload, chunk):
            self.content_chunks += 1
        if chunk is None:  # nothing but content or tool deltas
            return True
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.reported = usage
        return self.client_wants_usage or not (isinstance(usage, dict) and not chunk.get("choices"))

    def see_completion(self, completion: dict[str, Any]) -> None:
        """Note a whole (non-streamed) completion."""
        usage = completion.get("usage")
        if isinstance(usage, dict):
            self.reported = usage
        text = text_of(c.get("message", {}) for c in completion.get("choices") or [] if isinstance(c, dict))
        self.content_chunks = estimate_tokens(text) if text else 0

    def _reported(self, name: str) -> int | None:
        value = (self.reported or {}).get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    async def record(self, ended_early: str | None = None) -> None:
        """Add this request to the book. `ended_early` says why the answer stopped short, if it did."""
        prompt, completion = self._reported("prompt_tokens"), self._reported("completion_tokens")
        if ended_early is None and prompt is not None and completion is not None:
            reason = ""
        else:
            reason = ended_early or "upstream_reported_no_usage"
            prompt = prompt if prompt is not None else self._prompt_estimate
            completion = self.content_chunks
        row = UsageRow(today(), self.model, reason, 1, prompt, completion,
                       self.prices.cost_nanos(self.model, prompt, completion))
        await self.book.add(self.user, row)
        if self.reservation is not None:
            await self.reservation.settle(prompt + completion)

    async def nothing_used(self) -> None:
        """The request never reached the model: its reservation goes back whole."""
        if self.reservation is not None:
            await self.reservation.settle(0)
